//! Media checks shared by the producer (validate before enqueuing) and the workers (validate before
//! decoding): where a URI may point, and what ffprobe says about it.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};

/// Why media was refused. Every variant is permanent: the same file will fail the same way.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("media file not found: {0}")]
    NotFound(String),
    #[error("media path {path} is outside the media root {root}")]
    OutsideRoot { path: String, root: String },
    #[error("media file is empty: {0}")]
    Empty(String),
    #[error("http(s) media URIs are disabled (media.allow_http = false): {0}")]
    HttpDisabled(String),
    #[error("remote media {uri} refused: {reason}")]
    RemoteRefused { uri: String, reason: String },
    #[error("remote media {uri} is larger than media.max_remote_bytes ({limit} bytes)")]
    RemoteTooLarge { uri: String, limit: u64 },
    #[error("remote media {uri} unavailable: {reason}")]
    RemoteUnavailable { uri: String, reason: String },
    #[error("s3:// media URIs are off (s3.endpoint is not set): {0}")]
    S3Disabled(String),
    #[error("unsupported media URI scheme: {0}")]
    Scheme(String),
    #[error("ffprobe cannot read {uri}: {reason}")]
    Unreadable { uri: String, reason: String },
    #[error("cannot run ffprobe: {0} (install ffmpeg)")]
    Tool(String),
}

/// Containers ffmpeg may open (`-format_whitelist`): the audio and video files Heimdex indexes and
/// still images (`image2` reads only files named like the input, beside it), and no playlist or
/// concat format, whose entries could name files outside the media root or hosts nobody allowed.
pub const FORMATS: &str = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,flv,mpegts,mpeg,asf,wav,w64,aiff,caf,mp3,ogg,flac,aac,\
                           image2,png_pipe,jpeg_pipe,webp_pipe,bmp_pipe";

/// The arguments that fence every ffmpeg and ffprobe input, put before `-i`: local files only
/// (remote media is downloaded first, see [`crate::remote`]) and only [`FORMATS`].
pub const INPUT_FENCE: [&str; 4] = ["-protocol_whitelist", "file", "-format_whitelist", FORMATS];

impl MediaError {
    /// A missing ffprobe or a remote server that does not answer may pass (retryable); the rest is
    /// about the media.
    pub fn disposition(&self) -> crate::error::Disposition {
        match self {
            MediaError::Tool(_) | MediaError::RemoteUnavailable { .. } => crate::error::Disposition::Retryable,
            _ => crate::error::Disposition::Permanent,
        }
    }
}

/// Resolves a media URI against the media root: local paths must exist, be non-empty and lie under
/// `root` after resolving `..` and symlinks; http(s) URLs, when allowed, become their canonical form
/// ([`crate::remote::canonical`]; [`crate::remote::check`] then checks where they point and
/// [`crate::remote::fetch`] downloads them under its rules); `s3://bucket/key` URIs are checked for
/// syntax ([`crate::s3::canonical`]; [`crate::s3::fetch`] reads them from the configured store).
///
/// # Errors
/// [`MediaError`] naming the problem.
pub fn resolve(uri: &str, root: &Path, allow_http: bool) -> Result<String, MediaError> {
    if let Some((scheme, _)) = uri.split_once("://") {
        return match scheme.to_ascii_lowercase().as_str() {
            "http" | "https" if allow_http => crate::remote::canonical(uri),
            "http" | "https" => Err(MediaError::HttpDisabled(crate::remote::redact(uri))),
            "s3" => crate::s3::canonical(uri),
            "file" => resolve(&uri[scheme.len() + "://".len()..], root, allow_http),
            _ => Err(MediaError::Scheme(scheme.to_string())),
        };
    }
    let path = Path::new(uri);
    let path: PathBuf = if path.is_absolute() { path.to_path_buf() } else { root.join(path) };
    let real_root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let outside = || MediaError::OutsideRoot { path: path.display().to_string(), root: root.display().to_string() };
    // A name outside the root is refused before the file system is asked, so that the answer never
    // tells whether a file outside the root exists.
    let named = lexical(&path);
    if !named.starts_with(lexical(root)) && !named.starts_with(&real_root) {
        return Err(outside());
    }
    let real = path.canonicalize().map_err(|_| MediaError::NotFound(path.display().to_string()))?;
    if !real.starts_with(&real_root) {
        return Err(outside());
    }
    let meta = std::fs::metadata(&real).map_err(|_| MediaError::NotFound(path.display().to_string()))?;
    if !meta.is_file() {
        return Err(MediaError::NotFound(format!("{} (not a regular file)", path.display())));
    }
    if meta.len() == 0 {
        return Err(MediaError::Empty(path.display().to_string()));
    }
    Ok(real.display().to_string())
}

/// `path` with `.` and `..` resolved by name (a `..` above `/` stays at `/`), without asking the
/// file system.
fn lexical(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// What ffprobe reports about a media file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub duration_s: Option<f64>,
    pub has_video: bool,
    pub has_audio: bool,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub fps: Option<f64>,
    /// The container's index of the video stream described here (the first that is not cover art):
    /// frames are decoded from exactly this stream, so the size checked is the size decoded.
    pub video_stream: Option<u32>,
    pub video_codec: Option<String>,
    pub audio_codec: Option<String>,
    pub audio_sample_rate: Option<u32>,
    pub audio_channels: Option<u32>,
}

/// Runs ffprobe on a local path or URL.
///
/// # Errors
/// [`MediaError::Unreadable`] with ffprobe's own message (e.g. "moov atom not found") when the input is
/// not media; [`MediaError::Tool`] when ffprobe itself is missing.
pub async fn probe(uri: &str) -> Result<Probe, MediaError> {
    let output = tokio::process::Command::new("ffprobe")
        .args(["-v", "error"])
        .args(INPUT_FENCE)
        .args(["-print_format", "json", "-show_format", "-show_streams", "--", uri])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| MediaError::Tool(e.to_string()))?;
    let unreadable = |reason: String| MediaError::Unreadable { uri: uri.to_string(), reason };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let reason = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("unknown error");
        return Err(unreadable(reason.trim().to_string()));
    }
    let raw: RawProbe = serde_json::from_slice(&output.stdout).map_err(|e| unreadable(format!("unexpected ffprobe output: {e}")))?;
    let mut probe = Probe { duration_s: raw.format.and_then(|f| f.duration).and_then(|d| d.parse().ok()), ..Probe::default() };
    for s in raw.streams {
        match s.codec_type.as_deref() {
            // Cover art is a video stream with a single picture; it is not video.
            Some("video") if s.disposition.is_none_or(|d| d.attached_pic != 1) && !probe.has_video => {
                probe.has_video = true;
                probe.video_stream = s.index;
                probe.width = s.width;
                probe.height = s.height;
                probe.fps = s.avg_frame_rate.as_deref().and_then(parse_rate).or_else(|| s.r_frame_rate.as_deref().and_then(parse_rate));
                probe.video_codec = s.codec_name;
            }
            Some("audio") if !probe.has_audio => {
                probe.has_audio = true;
                probe.audio_codec = s.codec_name;
                probe.audio_sample_rate = s.sample_rate.and_then(|r| r.parse().ok());
                probe.audio_channels = s.channels;
            }
            _ => {}
        }
    }
    if !probe.has_video && !probe.has_audio {
        return Err(unreadable("no audio or video stream".into()));
    }
    Ok(probe)
}

fn parse_rate(rate: &str) -> Option<f64> {
    let (n, d) = rate.split_once('/')?;
    let (n, d): (f64, f64) = (n.parse().ok()?, d.parse().ok()?);
    (d > 0.0 && n > 0.0).then(|| n / d)
}

#[derive(Deserialize)]
struct RawProbe {
    #[serde(default)]
    streams: Vec<RawStream>,
    format: Option<RawFormat>,
}

#[derive(Deserialize)]
struct RawFormat {
    duration: Option<String>,
}

#[derive(Deserialize)]
struct RawStream {
    index: Option<u32>,
    codec_type: Option<String>,
    codec_name: Option<String>,
    width: Option<u32>,
    height: Option<u32>,
    avg_frame_rate: Option<String>,
    r_frame_rate: Option<String>,
    sample_rate: Option<String>,
    channels: Option<u32>,
    disposition: Option<RawDisposition>,
}

#[derive(Deserialize)]
struct RawDisposition {
    #[serde(default)]
    attached_pic: u8,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_under_the_root() {
        let dir = std::env::temp_dir().join(format!("heimdex-media-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("root")).unwrap();
        std::fs::write(dir.join("root/a.mp4"), b"x").unwrap();
        std::fs::write(dir.join("root/empty.mp4"), b"").unwrap();
        std::fs::write(dir.join("outside.mp4"), b"x").unwrap();
        let root = dir.join("root");
        assert!(resolve("a.mp4", &root, false).unwrap().ends_with("root/a.mp4"));
        assert!(matches!(resolve("../outside.mp4", &root, false), Err(MediaError::OutsideRoot { .. })));
        assert!(matches!(resolve(dir.join("outside.mp4").to_str().unwrap(), &root, false), Err(MediaError::OutsideRoot { .. })));
        assert!(matches!(resolve("missing.mp4", &root, false), Err(MediaError::NotFound(_))));
        // Outside the root, a file that exists and one that does not get the same answer.
        for outside in ["../missing.mp4", "a/../../outside.mp4", "/etc/passwd", "/etc/no-such-file-4f1c"] {
            let e = resolve(outside, &root, false).unwrap_err();
            assert!(matches!(e, MediaError::OutsideRoot { .. }), "{outside}: {e}");
        }
        assert!(matches!(resolve("empty.mp4", &root, false), Err(MediaError::Empty(_))));
        assert!(matches!(resolve("http://h/v.mp4", &root, false), Err(MediaError::HttpDisabled(_))));
        assert!(matches!(resolve("ftp://h/v.mp4", &root, true), Err(MediaError::Scheme(_))));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn frame_rates_parse() {
        assert_eq!(parse_rate("25/1"), Some(25.0));
        assert_eq!(parse_rate("0/0"), None);
    }
}
