//! Packs the speech of consecutive chunks densely into Whisper windows.
//!
//! Why: the encoder costs the same for a window of 30 s of speech as for one that is half pauses, and
//! it is most of a window's cost on a CPU. The chunker cuts the audio at silences into chunks of at most
//! 30 s that still hold their inner pauses (up to `max_gap_s`), so a recording with pauses between
//! sentences fills twice the windows its speech needs. Here each chunk's speech is cut into islands
//! (VAD speech runs with `pad_s` of audio either side, merged when they touch), every pause between
//! islands shrinks to the two pads (0.4 s by default: Whisper still hears a sentence end), and islands
//! of consecutive chunks fill a window up to `max_chunk_s`. A map from window time to audio time puts
//! every segment back on the recording's clock.

use super::chunker::{ChunkParams, SpeechChunk};
use crate::media::audio::SAMPLE_RATE;

/// Where a run of a packed window's samples came from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Piece {
    /// Start in the window, seconds.
    pub window_s: f64,
    /// Start in the recording, seconds.
    pub audio_s: f64,
    pub len_s: f64,
}

/// A packed window: a [`SpeechChunk`] in window time (offset 0, speech spans in window time) and the
/// map back to the recording.
#[derive(Clone, Debug)]
pub struct Packed {
    pub chunk: SpeechChunk,
    pub pieces: Vec<Piece>,
}

impl Packed {
    /// A chunk as it is, one window (packing off).
    pub fn whole(chunk: SpeechChunk) -> Self {
        let pieces = vec![Piece { window_s: 0.0, audio_s: chunk.offset_s, len_s: chunk.duration_s() }];
        Self { chunk: SpeechChunk { offset_s: 0.0, ..chunk }, pieces }
    }

    /// Where the window's audio starts in the recording, seconds.
    pub fn start_s(&self) -> f64 {
        self.pieces.first().map_or(0.0, |p| p.audio_s)
    }

    /// Recording time of window time `t` (see [`audio_time`]).
    pub fn audio_time(&self, t: f64, end: bool) -> f64 {
        audio_time(&self.pieces, t, end)
    }
}

/// Recording time of window time `t` under `pieces`. `end` maps a time that falls on the border of two
/// pieces to the end of the earlier one (a segment's end), else to the start of the later one (a
/// segment's start); times in no piece (after the last) clamp to the nearest piece edge.
pub fn audio_time(pieces: &[Piece], t: f64, end: bool) -> f64 {
    let inside = |p: &Piece| if end { t > p.window_s && t <= p.window_s + p.len_s } else { t >= p.window_s && t < p.window_s + p.len_s };
    if let Some(p) = pieces.iter().find(|p| inside(p)) {
        return p.audio_s + (t - p.window_s);
    }
    match pieces.iter().rev().find(|p| p.window_s <= t) {
        Some(p) => p.audio_s + (t - p.window_s).min(p.len_s),
        None => pieces.first().map_or(t, |p| p.audio_s),
    }
}

/// Longest silence on the recording's clock that two islands of one window may have between them.
/// Whisper may run one segment across islands, and a segment's times are mapped back from its two
/// ends: islands far apart would give it a time range spanning the silence (the last words of a
/// recording filed under a sentence an hour earlier). Silence longer than this starts a new window.
pub const MAX_JOINED_SILENCE_S: f64 = 10.0;

/// Accumulates islands of speech until the next one would overflow the window.
pub struct Packer {
    params: ChunkParams,
    max_samples: usize,
    samples: Vec<f32>,
    speech: Vec<(f64, f64)>,
    pieces: Vec<Piece>,
    index: usize,
}

impl Packer {
    pub fn new(params: ChunkParams) -> Self {
        let max_samples = (f64::from(params.max_chunk_s) * f64::from(SAMPLE_RATE)) as usize;
        Self { params, max_samples, samples: Vec::new(), speech: Vec::new(), pieces: Vec::new(), index: 0 }
    }

    /// Adds a chunk's speech; returns the windows that are full.
    pub fn push(&mut self, chunk: &SpeechChunk) -> Vec<Packed> {
        let rate = f64::from(SAMPLE_RATE);
        let pad = f64::from(self.params.pad_s);
        let mut out = Vec::new();
        for (from, to) in islands(&chunk.speech, pad, chunk.duration_s()) {
            let (a, b) = ((from * rate).round() as usize, ((to * rate).round() as usize).min(chunk.samples.len()));
            if b <= a {
                continue;
            }
            let audio_s = chunk.offset_s + a as f64 / rate;
            let silence = self.pieces.last().map_or(0.0, |p| audio_s - (p.audio_s + p.len_s));
            if !self.samples.is_empty() && (self.samples.len() + (b - a) > self.max_samples || silence > MAX_JOINED_SILENCE_S) {
                out.extend(self.flush());
            }
            let window_s = self.samples.len() as f64 / rate;
            // This island's speech spans, in window time.
            for &(s, e) in &chunk.speech {
                let (s, e) = (s.max(from), e.min(to));
                if e > s {
                    self.speech.push((window_s + s - from, window_s + e - from));
                }
            }
            self.pieces.push(Piece { window_s, audio_s, len_s: (b - a) as f64 / rate });
            self.samples.extend_from_slice(&chunk.samples[a..b]);
        }
        out
    }

    /// The window being filled, if any (the end of the stream).
    pub fn flush(&mut self) -> Option<Packed> {
        if self.samples.is_empty() {
            return None;
        }
        let chunk = SpeechChunk {
            index: self.index,
            offset_s: 0.0,
            samples: std::mem::take(&mut self.samples),
            speech: std::mem::take(&mut self.speech),
        };
        self.index += 1;
        Some(Packed { chunk, pieces: std::mem::take(&mut self.pieces) })
    }
}

/// Speech spans widened by `pad` on each side (within `[0, len]`) and merged where they touch.
fn islands(speech: &[(f64, f64)], pad: f64, len: f64) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    for &(s, e) in speech {
        let (s, e) = ((s - pad).max(0.0), (e + pad).min(len));
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(offset_s: f64, len_s: f64, speech: &[(f64, f64)]) -> SpeechChunk {
        let n = (len_s * 16_000.0) as usize;
        SpeechChunk { index: 0, offset_s, samples: (0..n).map(|i| i as f32).collect(), speech: speech.to_vec() }
    }

    /// Speech an hour apart never shares a window, so no segment spans the hour.
    #[test]
    fn long_silences_start_a_new_window() {
        let mut p = Packer::new(ChunkParams::new(0.5, 30.0));
        assert!(p.push(&chunk(10.0, 10.0, &[(1.0, 4.0)])).is_empty());
        let full = p.push(&chunk(3600.0, 10.0, &[(1.0, 3.0)]));
        assert_eq!(full.len(), 1, "the first island's window is closed");
        assert!((full[0].start_s() - 10.8).abs() < 1e-6, "{:?}", full[0].pieces);
        let last = p.flush().expect("the second window");
        assert!((last.start_s() - 3600.8).abs() < 1e-6, "{:?}", last.pieces);
        assert_eq!((full[0].chunk.index, last.chunk.index), (0, 1));
    }

    /// Two sentences with a 2 s pause become one window with a 0.4 s pause; times map back.
    #[test]
    fn pauses_shrink_and_times_map_back() {
        let mut p = Packer::new(ChunkParams::new(0.5, 30.0));
        assert!(p.push(&chunk(100.0, 10.0, &[(1.0, 4.0), (6.0, 9.0)])).is_empty());
        let w = p.flush().unwrap();
        assert_eq!(w.pieces.len(), 2);
        assert!((w.chunk.duration_s() - 6.8).abs() < 1e-3, "{}", w.chunk.duration_s());
        assert!((w.audio_time(0.2, false) - 101.0).abs() < 1e-3);
        // The second sentence starts 0.4 s after the first ends in the window.
        assert!((w.audio_time(3.6, false) - 106.0).abs() < 1e-3, "{}", w.audio_time(3.6, false));
        assert!((w.audio_time(3.4, true) - 104.2).abs() < 1e-3, "{}", w.audio_time(3.4, true));
        assert!((w.chunk.speech[1].0 - 3.6).abs() < 1e-3);
    }

    /// A window never exceeds `max_chunk_s`; islands of later chunks start new windows.
    #[test]
    fn windows_fill_up_to_the_limit() {
        let mut p = Packer::new(ChunkParams::new(0.5, 30.0));
        let mut windows = Vec::new();
        for k in 0..5 {
            windows.extend(p.push(&chunk(k as f64 * 20.0, 12.0, &[(1.0, 11.0)])));
        }
        windows.extend(p.flush());
        assert_eq!(windows.len(), 3);
        assert!(windows.iter().all(|w| w.chunk.duration_s() <= 30.0));
        assert!((windows[1].audio_time(0.0, false) - 40.8).abs() < 1e-3);
    }
}
