//! The long recording of issue 8, built from the bundle's speech clips, so that the peer comparison
//! runs on audio whose reference transcript is exact.

use anyhow::{Context, Result, bail};

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
    /// Where each clip's speech starts and ends in the recording, seconds (see [`speech_bounds`]):
    /// what word timestamps are scored against.
    pub clips: Vec<(f64, f64)>,
}

/// Where speech starts and ends in a clip, seconds from its start: the first and last 10 ms frame
/// whose RMS is above a twentieth of the loudest frame's (−26 dB) and twice (+6 dB) the clip's room
/// tone, the RMS of its first or last 100 ms, whichever is louder. The whole clip when no frame is
/// that loud.
///
/// Why the room tone: the LibriVox clips are recorded 24–27 dB above their noise, so at −26 dB alone
/// the noise before and after the reading counts as speech (0880: 0.01–2.94 s by −26 dB, where "He"
/// is heard from 0.26 s and "man" has faded by 2.79 s). Every clip begins and ends with at least
/// 180 ms of its room tone before speech.
pub fn speech_bounds(samples: &[f32]) -> (f64, f64) {
    const FRAME: usize = 160;
    const EDGE: usize = 10;
    let rms: Vec<f32> = samples.chunks(FRAME).map(|f| (f.iter().map(|x| x * x).sum::<f32>() / f.len() as f32).sqrt()).collect();
    let loudest = rms.iter().copied().fold(0.0, f32::max);
    let tone = |frames: &[f32]| (frames.iter().map(|r| r * r).sum::<f32>() / frames.len().max(1) as f32).sqrt();
    let room = tone(&rms[..EDGE.min(rms.len())]).max(tone(&rms[rms.len().saturating_sub(EDGE)..]));
    let floor = (loudest / 20.0).max(2.0 * room);
    let loud = |r: &&f32| **r > floor;
    match (rms.iter().position(|r| loud(&r)), rms.iter().rposition(|r| loud(&r))) {
        (Some(first), Some(last)) if loudest > 0.0 => {
            ((first * FRAME) as f64 / 16_000.0, ((last + 1) * FRAME).min(samples.len()) as f64 / 16_000.0)
        }
        _ => (0.0, samples.len() as f64 / 16_000.0),
    }
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
        let samples = heimdex_worker::media::audio::decode_all(&uri, 120.0).await.with_context(|| format!("decoding {file}"))?;
        clips.push((samples, text.to_string()));
    }
    if clips.is_empty() {
        bail!("no clips in {}", speech_dir.join("transcripts.tsv").display());
    }
    let pause = vec![0.0f32; (2.0 * RATE) as usize];
    let total = (seconds * RATE) as usize;
    let (mut audio, mut words, mut speech, mut spans) = (Vec::with_capacity(total), Vec::new(), 0usize, Vec::new());
    'rounds: loop {
        for (samples, text) in &clips {
            if audio.len() + samples.len() + pause.len() > total {
                break 'rounds;
            }
            let (from, to) = speech_bounds(samples);
            let at = audio.len() as f64 / RATE;
            spans.push((at + from, at + to));
            audio.extend_from_slice(samples);
            audio.extend_from_slice(&pause);
            speech += samples.len();
            words.push(text.as_str());
        }
    }
    audio.resize(total, 0.0);
    write_wav(path, &audio)?;
    Ok(Recording {
        path: path.to_path_buf(),
        reference: words.join(" "),
        duration_s: audio.len() as f64 / RATE,
        speech_s: speech as f64 / RATE,
        clips: spans,
    })
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
