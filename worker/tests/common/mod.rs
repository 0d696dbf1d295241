//! Shared helpers of the index tests: the real model bundle, the real pipeline, WER.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;

use heimdex_models::registry::ModelRegistry;
use heimdex_shared::Settings;
use heimdex_worker::engine::Engine;
use heimdex_worker::index::IndexPipeline;
use heimdex_worker::metrics::Metrics;
use heimdex_worker::pipeline::LoadContext;

pub fn bundle() -> PathBuf {
    let dir = Settings::default().models.dir;
    assert!(
        dir.join("whisper-base/encoder_model.onnx").is_file(),
        "model bundle missing at {}: run ../shared/models/prepare",
        dir.display()
    );
    dir
}

pub fn media(rel: &str) -> String {
    bundle().join("media").join(rel).display().to_string()
}

pub fn settings() -> Settings {
    let mut s = Settings::default();
    s.models.dir = bundle();
    s
}

/// The process's engine. ONNX Runtime allows one environment per process: tests of one binary
/// share one engine, made with the first caller's settings.
pub fn engine(settings: &Settings) -> &'static Engine {
    static ENGINE: std::sync::OnceLock<Engine> = std::sync::OnceLock::new();
    ENGINE.get_or_init(|| Engine::new(settings.engine.clone(), Arc::new(Metrics::new())).expect("onnx runtime"))
}

#[track_caller]
pub fn load(settings: &Settings) -> IndexPipeline {
    let models = ModelRegistry::open(&settings.models.dir).expect("model directory");
    IndexPipeline::load(&LoadContext { settings, engine: engine(settings), models: &models }).expect("loading the index pipeline")
}

/// The normalisation and word edit distance of the benchmarks, so that tests and benchmarks score alike.
#[allow(unused_imports)] // not every test binary scores words
pub use heimdex_bench::score::{normalise, word_errors};

/// (file, reference transcript) from transcripts.tsv.
pub fn transcripts() -> Vec<(String, String)> {
    let tsv = std::fs::read_to_string(bundle().join("media/speech/transcripts.tsv")).expect("transcripts.tsv");
    tsv.lines().skip(1).filter_map(|l| l.split_once('\t')).map(|(f, t)| (f.to_string(), t.to_string())).collect()
}

pub fn json(rel: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(bundle().join("media").join(rel)).expect("fixture")).expect("json")
}

/// One of the bundle's speech clips, decoded, with its reference split into sentences
/// (`librivox_5clips.wav` is the five LibriVox clips joined, so it holds their five sentences).
#[derive(Clone, Debug)]
pub struct Clip {
    pub file: String,
    pub sentences: Vec<String>,
    /// 16 kHz mono samples.
    pub samples: Vec<f32>,
}

/// Every clip of transcripts.tsv, decoded.
pub async fn speech_clips() -> Vec<Clip> {
    let refs = transcripts();
    let librivox: Vec<String> = refs.iter().filter(|(f, _)| f.starts_with("sense_and_sensibility")).map(|(_, t)| t.clone()).collect();
    assert_eq!(librivox.len(), 5, "transcripts.tsv: the five LibriVox clips");
    let mut clips = Vec::new();
    for (file, text) in refs {
        let samples = heimdex_worker::media::audio::decode_all(&media(&format!("speech/{file}")), 60.0).await.expect("decoding a clip");
        let sentences = if file == "librivox_5clips.wav" {
            assert_eq!(normalise(&librivox.join(" ")), normalise(&text), "librivox_5clips.wav is the five clips joined");
            librivox.clone()
        } else {
            vec![text]
        };
        clips.push(Clip { file, sentences, samples });
    }
    clips
}

/// A synthetic recording on disk and what is said in it, in order.
#[derive(Clone, Debug)]
pub struct Recording {
    pub path: String,
    /// Reference sentences in the order they are spoken (one per clip occurrence and sentence).
    pub sentences: Vec<String>,
    pub duration_s: f64,
    pub speech_s: f64,
}

impl Recording {
    pub fn reference(&self) -> String {
        self.sentences.join(" ")
    }
}

/// How the pause after a clip sounds: digital silence, or faint white noise (a room).
#[derive(Clone, Copy, Debug)]
pub enum Pause {
    Silence(f32),
    Noise(f32),
}

/// Writes `clips[i]` followed by its pause, for each `(i, pause)` of `plan`, as a 16 kHz mono s16 WAV.
#[track_caller]
pub fn write_recording(path: &std::path::Path, clips: &[Clip], plan: &[(usize, Pause)]) -> Recording {
    let mut audio: Vec<f32> = Vec::new();
    let mut sentences = Vec::new();
    let mut speech = 0usize;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for &(i, pause) in plan {
        let clip = &clips[i];
        audio.extend_from_slice(&clip.samples);
        speech += clip.samples.len();
        sentences.extend(clip.sentences.iter().cloned());
        let (seconds, amplitude) = match pause {
            Pause::Silence(s) => (s, 0.0),
            Pause::Noise(s) => (s, 0.002),
        };
        for _ in 0..(seconds * 16_000.0).round() as usize {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            audio.push(amplitude * (((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0));
        }
    }
    let data: Vec<u8> = audio.iter().flat_map(|&x| ((x.clamp(-1.0, 1.0) * 32767.0).round() as i16).to_le_bytes()).collect();
    let mut wav = Vec::with_capacity(44 + data.len());
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes()); // PCM
    wav.extend_from_slice(&1u16.to_le_bytes()); // mono
    wav.extend_from_slice(&16_000u32.to_le_bytes());
    wav.extend_from_slice(&32_000u32.to_le_bytes());
    wav.extend_from_slice(&2u16.to_le_bytes());
    wav.extend_from_slice(&16u16.to_le_bytes());
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&(data.len() as u32).to_le_bytes());
    wav.extend_from_slice(&data);
    std::fs::write(path, wav).expect("writing the recording");
    Recording { path: path.display().to_string(), sentences, duration_s: audio.len() as f64 / 16_000.0, speech_s: speech as f64 / 16_000.0 }
}

/// A recording plan with at least `speech_s` seconds of speech, deterministic in `seed`: the single
/// clips in shuffled rounds with pauses of 0.2–5 s (two in three digital silence, one in three faint
/// noise; pauses over 3 s end a chunk, shorter ones stay inside one, so most chunks fill up to 30 s
/// and are cut at a pause), and early on, after
/// `seed % 3` clips, a block of running speech with 0.2 s breaths that the chunker must cut inside:
/// "he was not an ill disposed young man" four times back to back (11 tokens four times: Whisper's
/// loop guard stops the row there), then the joined clip.
///
/// Whisper base itself writes a verbatim repeat of the shortest clips ("go forward ten meters",
/// "ten of clubs", "he might even have been made amiable himself") once when the copies share a
/// window, even with 1 s between them, so the repeated clip is one it hears out, and a round never
/// starts with the clip that ended the one before.
pub fn recording_plan(clips: &[Clip], seed: u64, speech_s: f64) -> Vec<(usize, Pause)> {
    let mut state = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let long = clips.iter().position(|c| c.sentences.len() > 1).expect("the joined clip");
    let repeated = clips.iter().position(|c| c.file.ends_with("-0870.wav")).expect("clip 0870");
    let single: Vec<usize> = (0..clips.len()).filter(|&i| i != long).collect();
    let seconds = |i: usize| clips[i].samples.len() as f64 / 16_000.0;
    let block_after = (seed % 3) as usize;
    let mut plan: Vec<(usize, Pause)> = Vec::new();
    let mut total = 0.0;
    let mut block = false;
    while total < speech_s || !block {
        let mut order = single.clone();
        for i in (1..order.len()).rev() {
            order.swap(i, (next() % (i as u64 + 1)) as usize);
        }
        if plan.last().is_some_and(|&(last, _)| last == order[0]) {
            order.swap(0, 1);
        }
        if !block {
            // Not just before the block: that would make five copies.
            order.retain(|&i| i != repeated);
            order.push(repeated);
        }
        for &i in &order {
            if plan.len() == block_after && !block {
                plan.extend([(repeated, Pause::Silence(0.0)); 2]);
                plan.extend([(repeated, Pause::Silence(0.2)), (long, Pause::Silence(0.2))]);
                total += 3.0 * seconds(repeated) + seconds(long);
                block = true;
            }
            if total >= speech_s && block {
                break;
            }
            // Three in four pauses stay inside a chunk (0.2–2.5 s), one in four ends it (3–5 s).
            let secs = if next() % 4 == 0 { 3.0 + (next() % 2_001) as f32 / 1_000.0 } else { 0.2 + (next() % 2_301) as f32 / 1_000.0 };
            let pause = if next() % 3 == 0 { Pause::Noise(secs) } else { Pause::Silence(secs) };
            plan.push((i, pause));
            total += seconds(i);
        }
    }
    plan
}

/// The layout of the issue's recording: the single clips in the order of transcripts.tsv, each followed
/// by 2 s of silence, `rounds` times (chunks fill up and are cut in the middle of a pause).
pub fn issue_plan(clips: &[Clip], rounds: usize) -> Vec<(usize, Pause)> {
    let single = (0..clips.len()).filter(|&i| clips[i].sentences.len() == 1);
    std::iter::repeat_n(single, rounds).flatten().map(|i| (i, Pause::Silence(2.0))).collect()
}

/// Reference sentences that are not in the hypothesis: more word errors in their aligned span (see
/// [`sentence_errors`]) than one, or than a tenth of their words. (errors, words, sentence) each.
pub fn missing_sentences(sentences: &[String], hypothesis: &str) -> Vec<(usize, usize, String)> {
    sentence_errors(sentences, hypothesis)
        .into_iter()
        .zip(sentences)
        .filter(|((e, n), _)| *e > (n / 10).max(1))
        .map(|((e, n), s)| (e, n, s.clone()))
        .collect()
}

/// How each reference sentence fared in the hypothesis: (word errors, words) per sentence, from one
/// word alignment of the whole reference (`sentences` joined) against the whole hypothesis. Insertions
/// count against the sentence of the next reference word.
pub fn sentence_errors(sentences: &[String], hypothesis: &str) -> Vec<(usize, usize)> {
    let words: Vec<Vec<String>> = sentences.iter().map(|s| normalise(s)).collect();
    let owner: Vec<usize> = words.iter().enumerate().flat_map(|(k, w)| std::iter::repeat_n(k, w.len())).collect();
    let r: Vec<&String> = words.iter().flatten().collect();
    let h = normalise(hypothesis);
    let (n, m) = (r.len(), h.len());
    let mut d = vec![0usize; (n + 1) * (m + 1)];
    let at = |i: usize, j: usize| i * (m + 1) + j;
    for i in 0..=n {
        for j in 0..=m {
            d[at(i, j)] = if i == 0 {
                j
            } else if j == 0 {
                i
            } else {
                (d[at(i - 1, j)] + 1).min(d[at(i, j - 1)] + 1).min(d[at(i - 1, j - 1)] + usize::from(r[i - 1] != &h[j - 1]))
            };
        }
    }
    let mut out: Vec<(usize, usize)> = words.iter().map(|w| (0, w.len())).collect();
    let (mut i, mut j) = (n, m);
    while i > 0 || j > 0 {
        if i > 0 && j > 0 && d[at(i, j)] == d[at(i - 1, j - 1)] + usize::from(r[i - 1] != &h[j - 1]) {
            out[owner[i - 1]].0 += usize::from(r[i - 1] != &h[j - 1]);
            (i, j) = (i - 1, j - 1);
        } else if i > 0 && d[at(i, j)] == d[at(i - 1, j)] + 1 {
            out[owner[i - 1]].0 += 1;
            i -= 1;
        } else {
            let next = owner.get(i).or(owner.last()).copied().unwrap_or(0);
            out[next].0 += 1;
            j -= 1;
        }
    }
    out
}
