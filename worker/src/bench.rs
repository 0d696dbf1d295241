//! Measurement helpers shared by the benchmark binaries (`bench-vision`, `bench-index`).

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Median of `v` (mean of the middle two for an even count); NaN when empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Milliseconds since `t`.
pub fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// This process's peak resident set (VmHWM) in MiB; NaN where /proc is unavailable.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// Median of the numeric field `key` over JSON objects (one per run, round or child process).
pub fn field_median(values: &[Value], key: &str) -> f64 {
    median(values.iter().filter_map(|v| v[key].as_f64()).collect())
}

/// Runs a child process (a fresh copy of a benchmark, or the Python reference) and parses the JSON
/// object on the last line of its output.
///
/// # Errors
/// The process cannot start, exits non-zero, or prints no JSON.
pub fn child_json(cmd: &mut Command) -> Result<Value> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().with_context(|| format!("{cmd:?} printed nothing"))?;
    Ok(serde_json::from_str(last)?)
}

/// The long recording of issue 8: the bundle's single speech clips in the order of `transcripts.tsv`
/// (the joined `librivox_5clips.wav` left out), each followed by 2 s of digital silence, in as many
/// whole rounds as fit in `seconds`, then silence up to `seconds` (no clip is cut, so the reference is
/// exact). 600 s gives 14 rounds: about 400 s of speech and 1,092 reference words.
pub struct Recording {
    pub path: std::path::PathBuf,
    /// Reference transcript, clip after clip.
    pub reference: String,
    pub duration_s: f64,
    pub speech_s: f64,
}

/// Writes the recording of `seconds` to `path` from the clips in `speech_dir`.
///
/// # Errors
/// `transcripts.tsv` or a clip cannot be read, or the WAV cannot be written.
pub async fn long_recording(speech_dir: &std::path::Path, seconds: f64, path: &std::path::Path) -> Result<Recording> {
    const RATE: f64 = 16_000.0;
    let tsv = std::fs::read_to_string(speech_dir.join("transcripts.tsv")).context("transcripts.tsv")?;
    let mut clips = Vec::new();
    for (file, text) in tsv.lines().skip(1).filter_map(|l| l.split_once('\t')).filter(|(f, _)| *f != "librivox_5clips.wav") {
        let uri = speech_dir.join(file).display().to_string();
        let samples = crate::media::audio::decode_all(&uri, 120.0).await.with_context(|| format!("decoding {file}"))?;
        clips.push((samples, text.to_string()));
    }
    if clips.is_empty() {
        bail!("no clips in {}", speech_dir.join("transcripts.tsv").display());
    }
    let pause = vec![0.0f32; (2.0 * RATE) as usize];
    let total = (seconds * RATE) as usize;
    let (mut audio, mut words, mut speech) = (Vec::with_capacity(total), Vec::new(), 0usize);
    'rounds: loop {
        for (samples, text) in &clips {
            if audio.len() + samples.len() + pause.len() > total {
                break 'rounds;
            }
            audio.extend_from_slice(samples);
            audio.extend_from_slice(&pause);
            speech += samples.len();
            words.push(text.as_str());
        }
    }
    audio.resize(total, 0.0);
    write_wav(path, &audio)?;
    Ok(Recording { path: path.to_path_buf(), reference: words.join(" "), duration_s: audio.len() as f64 / RATE, speech_s: speech as f64 / RATE })
}

/// 16 kHz mono 16-bit PCM WAV.
fn write_wav(path: &std::path::Path, audio: &[f32]) -> Result<()> {
    let data: Vec<u8> = audio.iter().flat_map(|&x| ((x.clamp(-1.0, 1.0) * 32767.0).round() as i16).to_le_bytes()).collect();
    let mut wav = Vec::with_capacity(44 + data.len());
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    for v in [16u32.to_le_bytes(), [1, 0, 1, 0], 16_000u32.to_le_bytes(), 32_000u32.to_le_bytes(), [2, 0, 16, 0]] {
        wav.extend_from_slice(&v);
    }
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&(data.len() as u32).to_le_bytes());
    wav.extend_from_slice(&data);
    std::fs::write(path, wav).with_context(|| format!("writing {}", path.display()))
}

/// Words for WER: lower case, punctuation removed, hyphens split, "mr." spelled out, small numbers as
/// words (the normalisation of the index tests, so both engines are scored alike).
pub fn normalise(s: &str) -> Vec<String> {
    let s = s.to_lowercase().replace("mr.", "mister").replace('-', " ");
    let cleaned: String = s.chars().map(|c| if c.is_alphanumeric() || c == '\'' || c == ' ' { c } else { ' ' }).collect();
    let nums = [("10", "ten"), ("1", "one"), ("2", "two"), ("3", "three"), ("4", "four"), ("5", "five")];
    cleaned
        .split_whitespace()
        .map(|w| nums.iter().find(|(d, _)| *d == w).map_or(w.to_string(), |(_, n)| (*n).to_string()))
        .collect()
}

/// Word edit distance of `hypothesis` against `reference`, and the reference's length in words.
pub fn word_errors(reference: &str, hypothesis: &str) -> (usize, usize) {
    let (r, h) = (normalise(reference), normalise(hypothesis));
    let mut d: Vec<usize> = (0..=h.len()).collect();
    for i in 1..=r.len() {
        let mut prev = d[0];
        d[0] = i;
        for j in 1..=h.len() {
            let cur = (d[j] + 1).min(d[j - 1] + 1).min(prev + usize::from(r[i - 1] != h[j - 1]));
            prev = d[j];
            d[j] = cur;
        }
    }
    (d[h.len()], r.len())
}

/// Word error rate of `hypothesis` against `reference`.
pub fn wer(reference: &str, hypothesis: &str) -> f64 {
    let (errors, words) = word_errors(reference, hypothesis);
    errors as f64 / words.max(1) as f64
}
