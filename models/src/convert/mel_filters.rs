//! Whisper's mel filterbank (`mel_filters.f32`): librosa's `filters.mel(sr, n_fft, n_mels)` with the
//! Slaney mel scale and Slaney area normalisation, as `build.py`'s `mel_filters()` computes it.
//!
//! The arithmetic follows numpy's step by step (f64 throughout, each filter row stored as f32 and
//! then scaled in f64 and stored as f32 again, `linspace` as `i * step + start` with the exact end
//! point), and `np.maximum`/`np.minimum` keep the second operand on ties, which makes the first
//! value `-0.0`: the file is byte-identical to the bundle's, whose sha256 `build.py` pins.

/// The filterbank, `n_mels` rows of `1 + n_fft / 2` values, row-major.
pub(crate) fn filters(sr: u32, n_fft: usize, n_mels: usize) -> Vec<f32> {
    let f_sp = 200.0 / 3.0;
    let min_log_hz = 1000.0;
    let min_log_mel = min_log_hz / f_sp;
    let logstep = 6.4f64.ln() / 27.0;
    let hz_to_mel = |f: f64| if f >= min_log_hz { min_log_mel + (f / min_log_hz).ln() / logstep } else { f / f_sp };
    let mel_to_hz = |m: f64| if m >= min_log_mel { min_log_hz * (logstep * (m - min_log_mel)).exp() } else { f_sp * m };
    // numpy's maximum/minimum: the first operand only when strictly greater/smaller.
    let maximum = |a: f64, b: f64| if a > b { a } else { b };
    let minimum = |a: f64, b: f64| if a < b { a } else { b };

    let bins = 1 + n_fft / 2;
    // np.fft.rfftfreq(n_fft, 1 / sr)
    let val = 1.0 / (n_fft as f64 * (1.0 / f64::from(sr)));
    let fftfreqs: Vec<f64> = (0..bins).map(|i| i as f64 * val).collect();
    // np.linspace(hz_to_mel(0), hz_to_mel(sr / 2), n_mels + 2)
    let (start, stop) = (hz_to_mel(0.0), hz_to_mel(f64::from(sr) / 2.0));
    let n = n_mels + 2;
    let step = (stop - start) / (n - 1) as f64;
    let mel_f: Vec<f64> = (0..n).map(|i| if i == n - 1 { stop } else { i as f64 * step + start }).map(mel_to_hz).collect();
    let fdiff: Vec<f64> = mel_f.windows(2).map(|w| w[1] - w[0]).collect();

    let mut w = vec![0f32; n_mels * bins];
    for (i, row) in w.chunks_exact_mut(bins).enumerate() {
        let enorm = 2.0 / (mel_f[i + 2] - mel_f[i]);
        for (v, f) in row.iter_mut().zip(&fftfreqs) {
            let lower = -(mel_f[i] - f) / fdiff[i];
            let upper = (mel_f[i + 2] - f) / fdiff[i + 1];
            let stored = maximum(0.0, minimum(lower, upper)) as f32;
            *v = (f64::from(stored) * enorm) as f32;
        }
    }
    w
}

/// The filterbank as the file's bytes: little-endian f32, row-major.
pub(crate) fn file_bytes(sr: u32, n_fft: usize, n_mels: usize) -> Vec<u8> {
    filters(sr, n_fft, n_mels).iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    /// `build.py`'s pinned sha256 of the 80-mel filterbank (`INNER["mel_80_f32"]`).
    const MEL_80_SHA256: &str = "4f2701b1d287d74a0dc9871026e9519d98cb76426615f2539b0d151a0ae4ec2e";

    #[test]
    fn the_80_mel_bank_is_byte_identical_to_the_pinned_one() {
        let bytes = super::file_bytes(16000, 400, 80);
        assert_eq!(bytes.len(), 80 * 201 * 4);
        assert_eq!(hex::encode(Sha256::digest(&bytes)), MEL_80_SHA256);
    }
}
