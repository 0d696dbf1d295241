//! Cuts a stream of audio into speech chunks of at most `max_chunk_s`, on the fly.
//!
//! Why here and like this: Whisper sees 30 s windows, so audio must be cut; a cut inside a word loses
//! it, so cuts go where the VAD hears silence; long silences are skipped (no ASR cost, no
//! hallucinated text); and the stream is never held whole: the chunker buffers at most the current
//! chunk plus a short pre-roll, then hands each finished chunk on (with its absolute offset, so that
//! Whisper's timestamps map back to the video's clock) through a bounded channel.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

use super::vad::{FRAME, VadRequest, VadRunner, VadState};
use crate::engine::ModelHandle;
use crate::error::TaskError;
use crate::media::audio::{PcmStream, SAMPLE_RATE};

/// Frames sent to the VAD per request (about 2 s).
const WINDOW_FRAMES: usize = 64;

/// A contiguous span of the audio that holds speech.
#[derive(Clone, Debug)]
pub struct SpeechChunk {
    /// Position in the chunk sequence of the stream.
    pub index: usize,
    /// Absolute start in the audio, seconds.
    pub offset_s: f64,
    /// 16 kHz mono samples, at most `max_chunk_s` long.
    pub samples: Vec<f32>,
    /// Where the VAD heard speech: (start, end) seconds from the chunk's start, in order. Tells the
    /// decoder whether speech remains after the point where a window's output stopped (see `asr`).
    pub speech: Vec<(f64, f64)>,
}

impl SpeechChunk {
    pub fn duration_s(&self) -> f64 {
        self.samples.len() as f64 / f64::from(SAMPLE_RATE)
    }

    /// Seconds of speech after `t` (seconds from the chunk's start).
    pub fn speech_after(&self, t: f64) -> f64 {
        self.speech.iter().map(|&(a, b)| (b - a.max(t)).max(0.0)).sum()
    }
}

/// How speech is found and grouped.
#[derive(Clone, Copy, Debug)]
pub struct ChunkParams {
    /// Speech probability that starts speech.
    pub threshold: f32,
    /// Longest chunk, seconds (≤ 30 for Whisper).
    pub max_chunk_s: f32,
    /// Silence that ends a chunk; shorter pauses stay inside one chunk (fewer, fuller 30 s windows:
    /// the encoder costs the same for 3 s of speech as for 30 s).
    pub max_gap_s: f32,
    /// Audio kept before the first speech frame and after the last one.
    pub pad_s: f32,
    /// Chunks with less speech than this are dropped (clicks, breaths).
    pub min_speech_s: f32,
}

impl ChunkParams {
    /// Defaults around a speech threshold (Silero's usual 0.5).
    pub fn new(threshold: f32, max_chunk_s: f32) -> Self {
        Self { threshold, max_chunk_s: max_chunk_s.clamp(1.0, 30.0), max_gap_s: 3.0, pad_s: 0.2, min_speech_s: 0.25 }
    }
}

/// Frame-level chunking state machine. Feed it frames (samples + probability) in order.
#[derive(Debug)]
pub struct Chunker {
    params: ChunkParams,
    neg_threshold: f32,
    max_frames: usize,
    gap_frames: usize,
    pad_frames: usize,
    min_speech_frames: usize,
    /// Samples from absolute frame `buf_frame` on; frame-aligned.
    buf: Vec<f32>,
    probs: Vec<f32>,
    buf_frame: usize,
    /// Inside a chunk: (last speech frame, currently in speech).
    chunk: Option<(usize, bool)>,
    next_index: usize,
    peak: Arc<AtomicUsize>,
}

impl Chunker {
    /// `peak` receives the largest number of samples ever buffered (bounded-memory evidence).
    pub fn new(params: ChunkParams, peak: Arc<AtomicUsize>) -> Self {
        let fps = SAMPLE_RATE as f32 / FRAME as f32;
        Self {
            params,
            neg_threshold: (params.threshold - 0.15).max(0.01),
            max_frames: ((params.max_chunk_s * SAMPLE_RATE as f32) as usize / FRAME).max(1),
            gap_frames: (params.max_gap_s * fps).ceil() as usize,
            pad_frames: (params.pad_s * fps).ceil() as usize,
            min_speech_frames: (params.min_speech_s * fps).ceil() as usize,
            buf: Vec::new(),
            probs: Vec::new(),
            buf_frame: 0,
            chunk: None,
            next_index: 0,
            peak,
        }
    }

    /// Adds one frame (`samples.len() <= FRAME`; shorter only at the end) and its speech probability;
    /// returns a chunk when one is complete.
    pub fn push(&mut self, samples: &[f32], prob: f32) -> Option<SpeechChunk> {
        let t = self.buf_frame + self.probs.len();
        self.buf.extend_from_slice(samples);
        self.buf.resize(self.buf.len() + FRAME - samples.len(), 0.0);
        self.probs.push(prob);
        self.peak.fetch_max(self.buf.len(), Ordering::Relaxed);
        match self.chunk {
            None => {
                if prob >= self.params.threshold {
                    self.chunk = Some((t, true));
                } else {
                    self.keep_last(self.pad_frames);
                }
                None
            }
            Some((last, in_speech)) => {
                let speaking = prob >= self.params.threshold || (in_speech && prob >= self.neg_threshold);
                let last = if speaking { t } else { last };
                self.chunk = Some((last, speaking));
                if t - last > self.gap_frames {
                    let end = (last + 1 + self.pad_frames).min(t + 1);
                    let out = self.emit(end);
                    self.chunk = None;
                    self.keep_last(self.pad_frames);
                    out
                } else if self.probs.len() >= self.max_frames {
                    let cut = self.best_cut();
                    let out = self.emit(cut);
                    let last = self.buf_frame + self.probs.iter().rposition(|&p| p >= self.params.threshold).unwrap_or(0);
                    self.chunk = self.probs.iter().any(|&p| p >= self.params.threshold).then_some((last, false));
                    if self.chunk.is_none() {
                        self.keep_last(self.pad_frames);
                    }
                    out
                } else {
                    None
                }
            }
        }
    }

    /// Ends the stream: `samples_total` trims the zero padding of the last frame.
    pub fn finish(&mut self, samples_total: u64) -> Option<SpeechChunk> {
        let (last, _) = self.chunk.take()?;
        let end_frame = (last + 1 + self.pad_frames).min(self.buf_frame + self.probs.len());
        let mut out = self.emit(end_frame)?;
        let start = (out.offset_s * f64::from(SAMPLE_RATE)) as u64;
        out.samples.truncate(samples_total.saturating_sub(start) as usize);
        let end = out.duration_s();
        out.speech.retain(|s| s.0 < end);
        if let Some(last) = out.speech.last_mut() {
            last.1 = last.1.min(end);
        }
        (!out.samples.is_empty()).then_some(out)
    }

    /// Where to cut a chunk that reached the maximum length: the middle of the longest pause in its
    /// second half (the latest on ties), else its quietest frame there.
    fn best_cut(&self) -> usize {
        let from = self.probs.len() / 2;
        let (mut best, mut best_len, mut run) = (None, 0usize, 0usize);
        for (i, &p) in self.probs.iter().enumerate().skip(from) {
            run = if p < self.neg_threshold { run + 1 } else { 0 };
            if run > 0 && run >= best_len {
                best_len = run;
                best = Some(i + 1 - run / 2);
            }
        }
        let rel = best.unwrap_or_else(|| {
            (from..self.probs.len()).min_by(|&a, &b| self.probs[a].total_cmp(&self.probs[b])).map_or(self.probs.len(), |i| i + 1)
        });
        self.buf_frame + rel.clamp(1, self.probs.len())
    }

    /// Emits frames `[buf_frame, end)` as a chunk (unless it holds too little speech) and drops them.
    fn emit(&mut self, end: usize) -> Option<SpeechChunk> {
        let n = end.saturating_sub(self.buf_frame).min(self.probs.len());
        // Runs of speech frames, [first, end).
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for i in (0..n).filter(|&i| self.probs[i] >= self.params.threshold) {
            match runs.last_mut() {
                Some(run) if run.1 == i => run.1 = i + 1,
                _ => runs.push((i, i + 1)),
            }
        }
        let speech: usize = runs.iter().map(|(a, b)| b - a).sum();
        let seconds = |f: usize| (f * FRAME) as f64 / f64::from(SAMPLE_RATE);
        let spans = runs.into_iter().map(|(a, b)| (seconds(a), seconds(b))).collect();
        let samples: Vec<f32> = self.buf.drain(..n * FRAME).collect();
        self.probs.drain(..n);
        let offset_s = (self.buf_frame * FRAME) as f64 / f64::from(SAMPLE_RATE);
        self.buf_frame += n;
        (speech >= self.min_speech_frames).then(|| {
            self.next_index += 1;
            SpeechChunk { index: self.next_index - 1, offset_s, samples, speech: spans }
        })
    }

    fn keep_last(&mut self, frames: usize) {
        let drop = self.probs.len().saturating_sub(frames);
        self.buf.drain(..drop * FRAME);
        self.probs.drain(..drop);
        self.buf_frame += drop;
    }
}

/// What streaming the audio found.
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamStats {
    /// Length of the decoded audio, seconds.
    pub audio_s: f64,
    /// Chunks sent on.
    pub chunks: usize,
}

/// Decodes `stream` and sends its speech chunks to `tx` as they complete; returns when the audio ends.
/// Memory: one VAD window plus the chunker's buffer (≤ `max_chunk_s` + pre-roll), whatever the length.
///
/// # Errors
/// Decoding errors ([`TaskError::Permanent`]), VAD failures ([`TaskError::Retryable`]); a closed
/// receiver ends the stream early without error.
pub async fn stream_chunks(
    mut stream: PcmStream,
    vad: &ModelHandle<VadRunner>,
    params: ChunkParams,
    peak: Arc<AtomicUsize>,
    tx: mpsc::Sender<SpeechChunk>,
) -> Result<StreamStats, TaskError> {
    let mut chunker = Chunker::new(params, peak);
    let mut state = VadState::default();
    let mut stats = StreamStats::default();
    let mut pending: Vec<f32> = Vec::with_capacity(WINDOW_FRAMES * FRAME);
    loop {
        let want = WINDOW_FRAMES * FRAME - pending.len();
        let n = stream.read(&mut pending, want).await?;
        let at_end = n == 0;
        if pending.len() < WINDOW_FRAMES * FRAME && !at_end {
            continue;
        }
        let real = pending.len();
        if real == 0 {
            break;
        }
        pending.resize(real.div_ceil(FRAME) * FRAME, 0.0);
        let window = std::mem::take(&mut pending);
        let response = vad.infer(VadRequest { samples: window, state }).await?;
        state = response.state;
        for (i, prob) in response.probs.iter().enumerate() {
            let frame = &response.samples[i * FRAME..((i + 1) * FRAME).min(real)];
            if let Some(chunk) = chunker.push(frame, *prob) {
                stats.chunks += 1;
                if tx.send(chunk).await.is_err() {
                    return Ok(stats);
                }
            }
        }
        pending = response.samples;
        pending.clear();
        if at_end {
            break;
        }
    }
    let total = stream.samples_read();
    stats.audio_s = total as f64 / f64::from(SAMPLE_RATE);
    if let Some(chunk) = chunker.finish(total) {
        stats.chunks += 1;
        let _ = tx.send(chunk).await;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_knows_where_its_speech_is() {
        let params = ChunkParams::new(0.5, 30.0);
        let mut chunker = Chunker::new(params, Arc::default());
        let frame = vec![0.1f32; FRAME];
        // 20 frames of silence, 30 of speech, 10 of pause, 20 of speech, then silence until the gap ends it.
        let probs = [(20, 0.0), (30, 0.9), (10, 0.1), (20, 0.9), (200, 0.0)];
        let mut chunks = Vec::new();
        for (n, p) in probs {
            for _ in 0..n {
                chunks.extend(chunker.push(&frame, p));
            }
        }
        assert_eq!(chunks.len(), 1);
        let c = &chunks[0];
        // The chunk starts one pre-roll (7 frames) before the first speech frame.
        let f = FRAME as f64 / f64::from(SAMPLE_RATE);
        assert!((c.offset_s - 13.0 * f).abs() < 1e-9, "{}", c.offset_s);
        let want = [(7.0 * f, 37.0 * f), (47.0 * f, 67.0 * f)];
        assert_eq!(c.speech.len(), 2, "{:?}", c.speech);
        for (got, want) in c.speech.iter().zip(want) {
            assert!((got.0 - want.0).abs() < 1e-9 && (got.1 - want.1).abs() < 1e-9, "{:?}", c.speech);
        }
        assert!((c.speech_after(0.0) - 50.0 * f).abs() < 1e-9);
        assert!((c.speech_after(57.0 * f) - 10.0 * f).abs() < 1e-9);
        assert_eq!(c.speech_after(c.duration_s()), 0.0);
    }
}
