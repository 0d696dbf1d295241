//! Video frames from ffmpeg, decoded once, sampled at a fixed rate and scaled once, read one frame at a
//! time so that a video of any length is never held whole.
//!
//! ffmpeg runs as a child process writing `rgb24` frames to a pipe; [`FrameStream::next`] reads exactly
//! one frame from it when the caller asks. The pipe (64 KiB) is the only buffer between the decoder and
//! the pipeline, so memory is bounded by the frames the *caller* keeps alive; [`FrameGauge`] counts those
//! (every [`Frame`] registers itself and unregisters on drop) so tests can assert the bound.
//!
//! **Working size.** Frames are scaled by ffmpeg to a long side of at most [`DEFAULT_WORK_SIDE`] = 640
//! pixels, aspect kept, never upscaled. 640 is YuNet's input side, so a letterboxed frame reaches the
//! face detector without a second resize and loses no detection resolution; SigLIP's 224×224 input is a
//! further downscale of it. Larger working frames would cost memory and copies and add nothing either
//! model can see. Boxes are mapped back to source pixels with the ratio of source to working size.
//!
//! **Refusals (all permanent).** No video stream; a side below [`MIN_SIDE`] (a 1×1 video carries no
//! picture); a side above `vision.max_side` (refused rather than downscaled: such input is almost
//! always a mistake or an attack on memory, and the limit is configurable); a decoder error anywhere
//! in the stream (`-xerror`: a truncated file decodes half its frames with "partial file" errors while
//! plain ffmpeg exits 0); a short final frame; zero frames.

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use heimdex_shared::media::Probe;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStdout};
use tokio::task::JoinHandle;

/// Long side of the working frames (pixels); see the module docs for why 640.
pub const DEFAULT_WORK_SIDE: u32 = 640;
/// Smallest accepted source side (pixels).
pub const MIN_SIDE: u32 = 16;
/// Highest accepted sampling rate (frames per second).
pub const MAX_RATE: f32 = 60.0;

/// Why frames could not be read. Every variant but [`FrameError::Tool`] is about the input, so the
/// vision pipeline turns them into permanent task errors.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("no video stream in {0}")]
    NoVideo(String),
    #[error("video is {width}x{height}: too small to index (each side must be at least {MIN_SIDE} px)")]
    TooSmall { width: u32, height: u32 },
    #[error("video is {width}x{height}: larger than the accepted maximum side of {max_side} px (vision.max_side)")]
    TooLarge { width: u32, height: u32, max_side: u32 },
    #[error("invalid frame rate {0} (must be > 0 and <= {MAX_RATE})")]
    Rate(f32),
    #[error("corrupt or truncated video after {frames} frame(s): {reason}")]
    Corrupt { frames: u32, reason: String },
    #[error("no frames could be decoded from {media}{}", if reason.is_empty() { String::new() } else { format!(": {reason}") })]
    NoFrames { media: String, reason: String },
    #[error("cannot run ffmpeg: {0} (install ffmpeg)")]
    Tool(String),
}

/// Counts the frames alive at once, and the peak, across every stream that shares it.
#[derive(Debug, Default)]
pub struct FrameGauge {
    live: AtomicUsize,
    peak: AtomicUsize,
}

impl FrameGauge {
    /// Frames alive now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Most frames alive at any one time.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    fn enter(self: &Arc<Self>) -> LiveToken {
        let now = self.live.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
        LiveToken(self.clone())
    }
}

/// Unregisters a frame from its gauge when the frame is dropped.
#[derive(Debug)]
struct LiveToken(Arc<FrameGauge>);

impl Drop for LiveToken {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One decoded frame at working size, `rgb24`, row-major.
#[derive(Debug)]
pub struct Frame {
    /// 0-based index among the sampled frames.
    pub index: u32,
    /// Presentation time in seconds (index / rate for sampled streams).
    pub ts: f64,
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
    _live: Option<LiveToken>,
}

impl Frame {
    /// A frame built from pixels already in memory (stills, warm-up inputs); not counted by a gauge.
    pub fn from_rgb(index: u32, ts: f64, width: u32, height: u32, rgb: Vec<u8>) -> Self {
        Self { index, ts, width, height, rgb, _live: None }
    }
}

/// How to sample and scale.
#[derive(Clone, Copy, Debug)]
pub struct FrameOptions {
    /// Frames per second to sample; `None` keeps every decoded frame (a still image gives one).
    pub rate: Option<f32>,
    /// Largest accepted source side.
    pub max_side: u32,
    /// Long side of the working frames.
    pub work_side: u32,
}

/// Working size for a source size: long side at most `work_side`, aspect kept, never upscaled.
pub fn working_size(width: u32, height: u32, work_side: u32) -> (u32, u32) {
    let long = width.max(height);
    if long <= work_side {
        return (width, height);
    }
    let scale = f64::from(work_side) / f64::from(long);
    let w = ((f64::from(width) * scale).round() as u32).max(1);
    let h = ((f64::from(height) * scale).round() as u32).max(1);
    (w, h)
}

/// How ffmpeg decodes a task's video (before its input fence and `-i`): errors fail the stream
/// (`-xerror`), the picture is not rotated, and one decoder thread: the models keep every core busy,
/// and frame threading costs a third more CPU for the same frames (sample.mp4: 1.3 CPU-s
/// single-threaded, 1.7 with the default three threads), CPU the image model then lacks (measured by
/// bench-vision).
pub const DECODER_ARGS: [&str; 8] = ["-nostdin", "-hide_banner", "-v", "error", "-xerror", "-noautorotate", "-threads", "1"];

/// The ffmpeg filter that samples a decoded stream at `rate` (every frame when `None`) and scales it to
/// `size`.
pub fn sampling_filter(rate: Option<f32>, (w, h): (u32, u32)) -> String {
    // `round=up`: frame i is the picture on screen at i / rate (the last one at or before it).
    let sample = rate.map(|rate| format!("fps={rate}:round=up,")).unwrap_or_default();
    // `area` averages every source pixel into the smaller frame (no aliasing on downscale).
    format!("{sample}scale={w}:{h}:flags=area")
}

/// A running ffmpeg decode, read one frame at a time.
#[derive(Debug)]
pub struct FrameStream {
    child: Child,
    stdout: ChildStdout,
    stderr: Option<JoinHandle<VecDeque<String>>>,
    source: String,
    rate: Option<f32>,
    /// Source size (ffprobe's), for mapping coordinates back.
    pub source_size: (u32, u32),
    /// Size of every frame this stream yields.
    pub size: (u32, u32),
    next_index: u32,
    gauge: Arc<FrameGauge>,
    done: bool,
}

impl FrameStream {
    /// Checks the probe and starts ffmpeg on `media` (a local path or URL).
    ///
    /// # Errors
    /// [`FrameError`] for no video stream, a size outside the accepted range, a bad rate, or a
    /// missing ffmpeg.
    pub fn open(media: &str, probe: &Probe, options: FrameOptions, gauge: Arc<FrameGauge>) -> Result<Self, FrameError> {
        let (stream, width, height) = match (probe.has_video, probe.video_stream, probe.width, probe.height) {
            (true, Some(i), Some(w), Some(h)) => (i, w, h),
            _ => return Err(FrameError::NoVideo(media.to_string())),
        };
        if width < MIN_SIDE || height < MIN_SIDE {
            return Err(FrameError::TooSmall { width, height });
        }
        if width.max(height) > options.max_side {
            return Err(FrameError::TooLarge { width, height, max_side: options.max_side });
        }
        if let Some(rate) = options.rate
            && !(rate.is_finite() && rate > 0.0 && rate <= MAX_RATE)
        {
            return Err(FrameError::Rate(rate));
        }
        let (w, h) = working_size(width, height, options.work_side);
        let filter = sampling_filter(options.rate, (w, h));
        let input = format!("file:{media}");
        // The probed stream, not `0:v:0`: a cover-art picture listed first would be decoded
        // instead, unchecked against `max_side`.
        let map = format!("0:{stream}");
        let mut child = tokio::process::Command::new("ffmpeg")
            .args(DECODER_ARGS)
            .args(heimdex_shared::media::INPUT_FENCE)
            .args(["-i", &input])
            .args(["-map", &map, "-an", "-sn", "-dn", "-vf", &filter, "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| FrameError::Tool(e.to_string()))?;
        let stdout = child.stdout.take().ok_or_else(|| FrameError::Tool("no stdout pipe".into()))?;
        let stderr = child.stderr.take().map(|err| tokio::spawn(super::stderr_tail(err)));
        Ok(Self {
            child,
            stdout,
            stderr,
            source: media.to_string(),
            rate: options.rate,
            source_size: (width, height),
            size: (w, h),
            next_index: 0,
            gauge,
            done: false,
        })
    }

    /// Reads the next frame; `Ok(None)` at a clean end of the stream.
    ///
    /// # Errors
    /// [`FrameError::Corrupt`] when ffmpeg reports a decoding error or the last frame is short,
    /// [`FrameError::NoFrames`] when the stream ended before its first frame.
    pub async fn next(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.done {
            return Ok(None);
        }
        let (w, h) = self.size;
        let frame_bytes = w as usize * h as usize * 3;
        // Register before allocating, so the gauge covers the buffer's whole life.
        let token = self.gauge.enter();
        let mut rgb = vec![0u8; frame_bytes];
        let mut filled = 0;
        while filled < frame_bytes {
            let n = self.stdout.read(&mut rgb[filled..]).await.map_err(|e| self.corrupt(e.to_string()))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == frame_bytes {
            let index = self.next_index;
            self.next_index += 1;
            let ts = self.rate.map_or(0.0, |r| f64::from(index) / f64::from(r));
            return Ok(Some(Frame { index, ts, width: w, height: h, rgb, _live: Some(token) }));
        }
        drop(rgb);
        drop(token);
        self.done = true;
        self.finish(filled).await
    }

    /// Frames read so far.
    pub fn frames_read(&self) -> u32 {
        self.next_index
    }

    async fn finish(&mut self, partial: usize) -> Result<Option<Frame>, FrameError> {
        let status = self.child.wait().await.map_err(|e| FrameError::Tool(e.to_string()))?;
        let stderr = match self.stderr.take() {
            Some(task) => task.await.unwrap_or_default(),
            None => VecDeque::new(),
        };
        let reason = stderr.iter().map(String::as_str).collect::<Vec<_>>().join("; ");
        if self.next_index == 0 {
            let reason = if status.success() || !reason.is_empty() { reason } else { format!("ffmpeg exited with {status}") };
            return Err(FrameError::NoFrames { media: self.source.clone(), reason });
        }
        if !status.success() {
            let reason = if reason.is_empty() { format!("ffmpeg exited with {status}") } else { reason };
            return Err(self.corrupt(reason));
        }
        if partial > 0 {
            return Err(self.corrupt(format!("stream ended inside a frame ({partial} bytes)")));
        }
        Ok(None)
    }

    fn corrupt(&self, reason: String) -> FrameError {
        FrameError::Corrupt { frames: self.next_index, reason }
    }
}

/// Decodes the first frame of a still image (or video) at working size, e.g. a photo for tests.
///
/// # Errors
/// As [`heimdex_shared::media::probe`] and [`FrameStream::next`].
pub async fn decode_still(path: &str, max_side: u32, work_side: u32) -> Result<Frame, FrameError> {
    let probe = heimdex_shared::media::probe(path).await.map_err(|e| FrameError::Corrupt { frames: 0, reason: e.to_string() })?;
    let options = FrameOptions { rate: None, max_side, work_side };
    let mut stream = FrameStream::open(path, &probe, options, Arc::new(FrameGauge::default()))?;
    let frame = stream.next().await?.ok_or_else(|| FrameError::NoFrames { media: path.to_string(), reason: String::new() })?;
    Ok(Frame { _live: None, ..frame })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_size_keeps_aspect_and_never_upscales() {
        assert_eq!(working_size(1280, 720, 640), (640, 360));
        assert_eq!(working_size(720, 1280, 640), (360, 640));
        assert_eq!(working_size(512, 512, 640), (512, 512));
        assert_eq!(working_size(7680, 4320, 640), (640, 360));
        assert_eq!(working_size(5000, 3, 640), (640, 1));
    }

    #[test]
    fn gauge_tracks_live_and_peak() {
        let gauge = Arc::new(FrameGauge::default());
        let a = gauge.enter();
        let b = gauge.enter();
        drop(a);
        let _c = gauge.enter();
        drop(b);
        assert_eq!((gauge.live(), gauge.peak()), (1, 2));
    }
}
