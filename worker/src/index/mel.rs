//! Whisper's log-mel front end, bit-for-bit the recipe of `openai-whisper` (`log_mel_spectrogram`):
//! pad or trim to 30 s, centred STFT (n_fft 400, hop 160, periodic Hann, reflect padding), power,
//! the bundle's 80×201 Slaney filter bank, `log10(max(mel, 1e-10))`, clamp to `max − 8`, `(x + 4) / 4`.
//!
//! Why our own and not a crate: the model was trained on exactly these numbers; any other window,
//! padding or filter bank degrades recognition silently. A parity test checks it against a direct DFT.

use std::path::Path;
use std::sync::Arc;

use rustfft::num_complex::Complex32;
use rustfft::{Fft, FftPlanner};

/// Samples in one Whisper window (30 s at 16 kHz).
pub const N_SAMPLES: usize = 480_000;
/// STFT size.
pub const N_FFT: usize = 400;
/// STFT hop.
pub const HOP: usize = 160;
/// Frames in one window.
pub const N_FRAMES: usize = 3000;
/// Mel bins.
pub const N_MELS: usize = 80;
/// rFFT bins (`N_FFT / 2 + 1`).
pub const N_BINS: usize = N_FFT / 2 + 1;

/// Why the filter bank cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum MelError {
    #[error("mel filter bank {path}: {message}")]
    Filters { path: String, message: String },
}

/// The front end: the filter bank, the window and a planned FFT, built once and shared.
#[derive(Clone)]
pub struct LogMel {
    filters: Arc<Vec<f32>>,
    window: Arc<Vec<f32>>,
    fft: Arc<dyn Fft<f32>>,
}

impl std::fmt::Debug for LogMel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogMel").field("n_mels", &N_MELS).finish()
    }
}

impl LogMel {
    /// Loads `mel_filters.f32` (little-endian f32, [80, 201], row-major).
    ///
    /// # Errors
    /// The file is missing or has the wrong size.
    pub fn load(path: &Path) -> Result<Self, MelError> {
        let err = |message: String| MelError::Filters { path: path.display().to_string(), message };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        if bytes.len() != N_MELS * N_BINS * 4 {
            return Err(err(format!("{} bytes, expected {} ([80, 201] f32)", bytes.len(), N_MELS * N_BINS * 4)));
        }
        let filters = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        Ok(Self::from_filters(filters))
    }

    fn from_filters(filters: Vec<f32>) -> Self {
        // Periodic Hann, as torch.hann_window(400): the denominator is N, not N − 1.
        let window = (0..N_FFT).map(|i| (0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / N_FFT as f64).cos()) as f32).collect();
        let fft = FftPlanner::<f32>::new().plan_fft_forward(N_FFT);
        Self { filters: Arc::new(filters), window: Arc::new(window), fft }
    }

    /// The filter bank, [80 × 201] row-major.
    pub fn filters(&self) -> &[f32] {
        &self.filters
    }

    /// Log-mel features of `audio` (16 kHz mono), padded or trimmed to 30 s: [80 × 3000] row-major.
    pub fn compute(&self, audio: &[f32]) -> Vec<f32> {
        let padded = reflect_pad(audio);
        // Power spectrum, frame-major [3000 × 201].
        let mut power = vec![0f32; N_FRAMES * N_BINS];
        let mut buf = vec![Complex32::new(0.0, 0.0); N_FFT];
        let mut scratch = vec![Complex32::new(0.0, 0.0); self.fft.get_inplace_scratch_len()];
        for (frame, row) in power.chunks_exact_mut(N_BINS).enumerate() {
            let start = frame * HOP;
            for ((c, &x), &w) in buf.iter_mut().zip(&padded[start..start + N_FFT]).zip(self.window.iter()) {
                *c = Complex32::new(x * w, 0.0);
            }
            self.fft.process_with_scratch(&mut buf, &mut scratch);
            for (p, c) in row.iter_mut().zip(&buf) {
                *p = c.norm_sqr();
            }
        }
        finish(&self.filters, &power)
    }
}

/// Pads or trims to [`N_SAMPLES`], then reflect-pads `N_FFT / 2` on both sides (numpy `reflect`: the
/// edge sample is not repeated).
pub(crate) fn reflect_pad(audio: &[f32]) -> Vec<f32> {
    let n = audio.len().min(N_SAMPLES);
    let mut x = vec![0f32; N_SAMPLES];
    x[..n].copy_from_slice(&audio[..n]);
    let half = N_FFT / 2;
    let mut out = Vec::with_capacity(N_SAMPLES + N_FFT);
    out.extend((0..half).map(|i| x[half - i]));
    out.extend_from_slice(&x);
    out.extend((0..half).map(|i| x[N_SAMPLES - 2 - i]));
    out
}

/// Mel projection and Whisper's log compression of a frame-major power spectrum [3000 × 201].
pub(crate) fn finish(filters: &[f32], power: &[f32]) -> Vec<f32> {
    let mut mel = vec![0f32; N_MELS * N_FRAMES];
    for (m, out_row) in mel.chunks_exact_mut(N_FRAMES).enumerate() {
        let weights = &filters[m * N_BINS..(m + 1) * N_BINS];
        for (frame, out) in out_row.iter_mut().enumerate() {
            let p = &power[frame * N_BINS..(frame + 1) * N_BINS];
            let sum: f32 = weights.iter().zip(p).map(|(w, v)| w * v).sum();
            *out = sum.max(1e-10).log10();
        }
    }
    let max = mel.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for v in &mut mel {
        *v = (v.max(max - 8.0) + 4.0) / 4.0;
    }
    mel
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn bundle() -> std::path::PathBuf {
        heimdex_shared::config::ModelSettings::default().dir
    }

    /// The documented recipe with a direct O(n²) DFT in f64: an implementation that shares nothing with
    /// the FFT path but the filter bank.
    fn reference(filters: &[f32], audio: &[f32]) -> Vec<f32> {
        let padded = reflect_pad(audio);
        let (cos, sin): (Vec<f64>, Vec<f64>) = (0..N_FFT)
            .map(|i| {
                let a = 2.0 * std::f64::consts::PI * i as f64 / N_FFT as f64;
                (a.cos(), a.sin())
            })
            .unzip();
        let win: Vec<f64> = cos.iter().map(|c| 0.5 - 0.5 * c).collect();
        let mut power = vec![0f32; N_FRAMES * N_BINS];
        let mut frame = vec![0f64; N_FFT];
        for t in 0..N_FRAMES {
            for (i, f) in frame.iter_mut().enumerate() {
                *f = f64::from(padded[t * HOP + i]) * win[i];
            }
            for k in 0..N_BINS {
                let (mut re, mut im) = (0f64, 0f64);
                for (n, &v) in frame.iter().enumerate() {
                    let idx = (k * n) % N_FFT;
                    re += v * cos[idx];
                    im -= v * sin[idx];
                }
                power[t * N_BINS + k] = (re * re + im * im) as f32;
            }
        }
        finish(filters, &power)
    }

    #[test]
    fn matches_a_direct_dft_of_the_documented_recipe() {
        let mel = LogMel::load(&bundle().join("whisper-base/mel_filters.f32")).unwrap();
        // A speech-like signal: chirp plus harmonics plus deterministic noise, 7.3 s then zero padding.
        let audio: Vec<f32> = (0..116_800)
            .map(|i| {
                let t = i as f32 / 16_000.0;
                let noise = (((i as u64).wrapping_mul(2_654_435_761) % 1000) as f32 / 1000.0 - 0.5) * 0.02;
                0.3 * (2.0 * std::f32::consts::PI * (200.0 + 150.0 * t) * t).sin()
                    + 0.1 * (2.0 * std::f32::consts::PI * 1250.0 * t).sin()
                    + noise
            })
            .collect();
        let fast = mel.compute(&audio);
        let slow = reference(mel.filters(), &audio);
        assert_eq!(fast.len(), N_MELS * N_FRAMES);
        let max_diff = fast.iter().zip(&slow).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max_diff < 2e-4, "max |fft - dft| = {max_diff}");
        // Whisper's clamp: nothing below max − 8 (in log10 units, i.e. 2 after scaling).
        let max = fast.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let min = fast.iter().copied().fold(f32::INFINITY, f32::min);
        assert!(max - min <= 2.0 + 1e-6 && max - min > 1.0, "{min}..{max}");
    }

    #[test]
    fn pads_by_reflection_and_trims_long_audio() {
        let audio: Vec<f32> = (0..N_SAMPLES + 1000).map(|i| i as f32).collect();
        let p = reflect_pad(&audio);
        assert_eq!(p.len(), N_SAMPLES + N_FFT);
        assert_eq!(&p[..3], &[200.0, 199.0, 198.0]);
        assert_eq!(p[200], 0.0);
        assert_eq!(p[N_SAMPLES + 200], (N_SAMPLES - 2) as f32);
    }
}
