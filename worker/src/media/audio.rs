//! Audio for the index pipeline: ffmpeg decodes any container to 16 kHz mono `f32le` on its stdout,
//! and [`PcmStream`] hands the samples out in blocks as they arrive.
//!
//! Why the CLI through `tokio::process` and not libav bindings: it keeps the build free of the system
//! libav ABI, and RECIPE.md measured it fast enough. Why streamed: a three-hour file is 690 MB of f32
//! samples; the pipeline chunks it on the fly and never holds more than a window of it.

use std::process::Stdio;

use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStdout, Command};

/// Whisper's and Silero's sample rate.
pub const SAMPLE_RATE: u32 = 16_000;

/// Why audio could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    /// The media has no audio stream at all.
    #[error("{uri} has no audio track")]
    NoAudio { uri: String },
    /// ffmpeg could not decode the stream (corrupt or unsupported media).
    #[error("cannot decode the audio of {uri}: {reason}")]
    Corrupt { uri: String, reason: String },
    /// The audio is longer than `index.max_duration_s`.
    #[error("audio of {uri} is longer than the limit of {limit_s:.0} s")]
    TooLong { uri: String, limit_s: f64 },
    /// ffmpeg itself could not be run, or its pipe failed.
    #[error("cannot run ffmpeg: {0} (install ffmpeg)")]
    Tool(String),
}

/// Decoded samples as they stream out of ffmpeg.
#[derive(Debug)]
pub struct PcmStream {
    uri: String,
    child: Child,
    stdout: ChildStdout,
    stderr: tokio::task::JoinHandle<std::collections::VecDeque<String>>,
    /// Bytes of a sample split across two reads.
    carry: Vec<u8>,
    raw: Vec<u8>,
    samples: u64,
    max_samples: u64,
    limit_s: f64,
    finished: bool,
}

impl PcmStream {
    /// Starts ffmpeg on `uri` (a local path or an http(s) URL) decoding its first audio stream.
    /// Audio longer than `max_duration_s` fails the read that crosses the limit.
    ///
    /// # Errors
    /// [`AudioError::Tool`] when ffmpeg cannot be started.
    pub fn open(uri: &str, max_duration_s: f64) -> Result<Self, AudioError> {
        let mut child = Command::new("ffmpeg")
            .args(["-nostdin", "-hide_banner", "-v", "error", "-xerror"])
            .args(heimdex_shared::media::INPUT_FENCE)
            .args(["-i", uri])
            .args(["-map", "0:a:0", "-vn", "-sn", "-dn", "-ac", "1", "-ar", "16000", "-f", "f32le", "-"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| AudioError::Tool(e.to_string()))?;
        let stdout = child.stdout.take().ok_or_else(|| AudioError::Tool("no stdout pipe".into()))?;
        let stderr = child.stderr.take().ok_or_else(|| AudioError::Tool("no stderr pipe".into()))?;
        let stderr = tokio::spawn(super::stderr_tail(stderr));
        let max_samples = (max_duration_s.max(0.0) * f64::from(SAMPLE_RATE)).ceil() as u64;
        Ok(Self {
            uri: uri.to_string(),
            child,
            stdout,
            stderr,
            carry: Vec::new(),
            raw: vec![0; 256 * 1024],
            samples: 0,
            max_samples,
            limit_s: max_duration_s,
            finished: false,
        })
    }

    /// Samples decoded so far.
    pub fn samples_read(&self) -> u64 {
        self.samples
    }

    /// Appends up to `max` samples to `out`; returns how many were appended, 0 at the end of the
    /// stream (after ffmpeg exited successfully).
    ///
    /// # Errors
    /// [`AudioError::NoAudio`], [`AudioError::Corrupt`] with ffmpeg's reason, [`AudioError::TooLong`].
    pub async fn read(&mut self, out: &mut Vec<f32>, max: usize) -> Result<usize, AudioError> {
        let before = out.len();
        while out.len() - before < max && !self.finished {
            let want = ((max - (out.len() - before)) * 4).min(self.raw.len());
            let n = self.stdout.read(&mut self.raw[..want]).await.map_err(|e| AudioError::Tool(e.to_string()))?;
            if n == 0 {
                self.finish().await?;
                break;
            }
            self.carry.extend_from_slice(&self.raw[..n]);
            let whole = self.carry.len() / 4 * 4;
            out.extend(self.carry[..whole].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
            self.carry.drain(..whole);
            self.samples = self.samples.saturating_add((whole / 4) as u64);
            if self.samples > self.max_samples {
                return Err(AudioError::TooLong { uri: self.uri.clone(), limit_s: self.limit_s });
            }
        }
        Ok(out.len() - before)
    }

    async fn finish(&mut self) -> Result<(), AudioError> {
        self.finished = true;
        let status = self.child.wait().await.map_err(|e| AudioError::Tool(e.to_string()))?;
        let stderr = (&mut self.stderr).await.unwrap_or_default();
        if status.success() {
            return Ok(());
        }
        if stderr.iter().any(|l| l.contains("matches no streams")) {
            return Err(AudioError::NoAudio { uri: self.uri.clone() });
        }
        let reason = stderr.back().cloned().unwrap_or_else(|| format!("ffmpeg exited with {status}"));
        Err(AudioError::Corrupt { uri: self.uri.clone(), reason })
    }
}

/// Decodes a whole (short) file into memory: for tests, warm-up and the benchmark, never for tasks.
///
/// # Errors
/// As [`PcmStream::read`].
pub async fn decode_all(uri: &str, max_duration_s: f64) -> Result<Vec<f32>, AudioError> {
    let mut stream = PcmStream::open(uri, max_duration_s)?;
    let mut out = Vec::new();
    while stream.read(&mut out, 1 << 16).await? > 0 {}
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::error::TaskError;

    fn media(rel: &str) -> String {
        heimdex_shared::config::ModelSettings::default().dir.join("media").join(rel).display().to_string()
    }

    #[tokio::test]
    async fn decodes_aac_stereo_48k_to_16k_mono() {
        let pcm = decode_all(&media("video/sample.mp4"), 60.0).await.unwrap();
        let secs = pcm.len() as f64 / 16_000.0;
        assert!((secs - 25.0).abs() < 0.1, "{secs}");
        assert!(pcm.iter().any(|s| s.abs() > 0.05), "speech is not silent");
    }

    #[tokio::test]
    async fn missing_audio_and_corrupt_streams_are_named() {
        let e = decode_all(&media("video/silent.mp4"), 60.0).await.unwrap_err();
        assert!(matches!(e, AudioError::NoAudio { .. }), "{e}");
        let e = decode_all(&media("video/corrupt.mp4"), 60.0).await.unwrap_err();
        assert!(e.to_string().contains("Invalid data") || e.to_string().contains("moov"), "{e}");
        assert_eq!(TaskError::from(e).disposition(), heimdex_shared::error::Disposition::Permanent);
    }

    #[tokio::test]
    async fn too_long_audio_is_refused() {
        let e = decode_all(&media("video/sample.mp4"), 5.0).await.unwrap_err();
        assert!(matches!(e, AudioError::TooLong { .. }), "{e}");
    }
}
