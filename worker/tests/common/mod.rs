//! Shared helpers of the index tests: the real model bundle, the real pipeline, WER.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;

use heimdex_shared::Settings;
use heimdex_worker::engine::Engine;
use heimdex_worker::engine::registry::ModelRegistry;
use heimdex_worker::index::IndexPipeline;
use heimdex_worker::metrics::Metrics;
use heimdex_worker::pipeline::LoadContext;

pub fn bundle() -> PathBuf {
    let dir = Settings::default().models.dir;
    assert!(dir.join("whisper-base/encoder_model.onnx").is_file(), "model bundle missing at {}: run ../shared/models/prepare", dir.display());
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

#[track_caller]
pub fn load(settings: &Settings) -> IndexPipeline {
    // ONNX Runtime allows one environment per process: tests of one binary share one engine.
    static ENGINE: std::sync::OnceLock<Engine> = std::sync::OnceLock::new();
    let engine = ENGINE.get_or_init(|| Engine::new(settings.engine.clone(), Arc::new(Metrics::new())).expect("onnx runtime"));
    let models = ModelRegistry::open(&settings.models).expect("model directory");
    IndexPipeline::load(&LoadContext { settings, engine, models: &models }).expect("loading the index pipeline")
}

/// Lower case, punctuation removed, hyphens split, "mr." spelled out, small numbers as words.
pub fn normalise(s: &str) -> Vec<String> {
    let s = s.to_lowercase().replace("mr.", "mister").replace('-', " ");
    let cleaned: String = s.chars().map(|c| if c.is_alphanumeric() || c == '\'' || c == ' ' { c } else { ' ' }).collect();
    let nums = [("10", "ten"), ("1", "one"), ("2", "two"), ("3", "three"), ("4", "four"), ("5", "five")];
    cleaned
        .split_whitespace()
        .map(|w| nums.iter().find(|(d, _)| *d == w).map_or(w.to_string(), |(_, n)| (*n).to_string()))
        .collect()
}

/// Word edit distance and reference length.
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

/// (file, reference transcript) from transcripts.tsv.
pub fn transcripts() -> Vec<(String, String)> {
    let tsv = std::fs::read_to_string(bundle().join("media/speech/transcripts.tsv")).expect("transcripts.tsv");
    tsv.lines().skip(1).filter_map(|l| l.split_once('\t')).map(|(f, t)| (f.to_string(), t.to_string())).collect()
}

pub fn json(rel: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(bundle().join("media").join(rel)).expect("fixture")).expect("json")
}
