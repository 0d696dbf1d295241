//! `heimdex_models::convert` on the real upstream files (the [`heimdex_tests::upstream`] mirror): the
//! Whisper outputs are the bundle's bytes, the MiniLM graph computes what the bundle's fp32 model
//! computes, and wrong inputs are refused naming the file.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use heimdex_models::convert::{self, ConvertError};
use heimdex_shared::config::EngineSettings;
use heimdex_tests::models_dir;
use heimdex_tests::upstream::sources_dir;
use heimdex_worker::engine::Engine;
use heimdex_worker::metrics::Metrics;
use ort::session::{Session, SessionInputValue};
use ort::value::Tensor;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// sha256 of a bundle file, as `MANIFEST.sha256` pins it.
#[track_caller]
fn manifest_sha256(rel: &str) -> String {
    let manifest = std::fs::read_to_string(models_dir().join("MANIFEST.sha256")).expect("MANIFEST.sha256");
    manifest
        .lines()
        .find_map(|l| l.split_once("  ").filter(|(_, path)| *path == rel).map(|(sum, _)| sum.to_string()))
        .unwrap_or_else(|| panic!("{rel} is not in MANIFEST.sha256"))
}

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn whisper_from_faster_whisper_base_is_byte_identical_to_the_bundle() {
    let src = sources_dir("whisper-base");
    let out = tempfile::tempdir().unwrap();
    convert::whisper(&src.join("model.bin"), &src.join("config.json"), &src.join("tokenizer.json"), out.path()).expect("conversion");

    for name in ["encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx", "mel_filters.f32"] {
        assert_eq!(sha256_file(&out.path().join(name)), manifest_sha256(&format!("whisper-base/{name}")), "{name}");
    }

    // config.json: every key and value as the bundle's, except which tool converted it.
    let mut ours = read_json(&out.path().join("config.json"));
    let mut bundle = read_json(&models_dir().join("whisper-base/config.json"));
    let source = ours.as_object_mut().unwrap().remove("source").unwrap();
    bundle.as_object_mut().unwrap().remove("source");
    let source = source.as_str().unwrap();
    assert!(source.contains("heimdex-models") && source.contains("Systran/faster-whisper-base"), "{source}");
    assert_eq!(ours, bundle);

    // Nothing but the five outputs (no temporary files left behind).
    let mut names: Vec<String> =
        std::fs::read_dir(out.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["config.json", "decoder_model.onnx", "decoder_with_past_model.onnx", "encoder_model.onnx", "mel_filters.f32"]);
}

/// This process's peak resident set (`VmHWM`), KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc/self/status");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmHWM value")
}

const CHILD_ENV: &str = "HEIMDEX_CONVERT_MEMORY_CHILD";

/// The Whisper conversion alone in a fresh process (this test binary run again for
/// [`whisper_conversion_in_a_child_process`]), so the peak it reports is the conversion's and not that
/// of other tests sharing the process.
#[test]
fn whisper_conversion_peaks_under_three_times_the_model_bin() {
    let model_bin = sources_dir("whisper-base").join("model.bin");
    let size_kib = std::fs::metadata(&model_bin).unwrap().len() / 1024;
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "whisper_conversion_in_a_child_process", "--ignored", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let peak: u64 = stdout
        .lines()
        .find_map(|l| l.split_once("peak_rss_kib=").map(|(_, v)| v)) // after libtest's "test NAME ... "
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("the child reported no peak: {stdout}"));
    eprintln!("whisper conversion: peak RSS {} MiB, model.bin {} MiB", peak / 1024, size_kib / 1024);
    assert!(peak < 3 * size_kib, "peak RSS {peak} KiB is over 3x model.bin ({size_kib} KiB)");
}

#[test]
#[ignore = "the child process of whisper_conversion_peaks_under_three_times_the_model_bin"]
fn whisper_conversion_in_a_child_process() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return; // run by hand or with --run-ignored: nothing to measure for
    }
    let src = sources_dir("whisper-base");
    let out = tempfile::tempdir().unwrap();
    let started = Instant::now();
    convert::whisper(&src.join("model.bin"), &src.join("config.json"), &src.join("tokenizer.json"), out.path()).expect("conversion");
    println!("peak_rss_kib={} seconds={:.2}", peak_rss_kib(), started.elapsed().as_secs_f64());
}

/// `last_hidden_state` of `model` for `sentences`, padded to the longest with attention mask 0.
/// Returns (values [batch, seq, dim], mask [batch, seq], seq, dim).
fn hidden_states(session: &mut Session, tokenizer: &tokenizers::Tokenizer, sentences: &[&str]) -> (Vec<f32>, Vec<i64>, usize, usize) {
    let enc = tokenizer.encode_batch(sentences.to_vec(), true).unwrap();
    let b = enc.len();
    let s = enc.iter().map(|e| e.get_ids().len()).max().unwrap();
    let mut ids = vec![0i64; b * s];
    let mut mask = vec![0i64; b * s];
    // (MiniLM's tokenizer.json pads the batch itself; its mask says which tokens are padding.)
    for (i, e) in enc.iter().enumerate() {
        for (j, (id, m)) in e.get_ids().iter().zip(e.get_attention_mask()).enumerate() {
            ids[i * s + j] = i64::from(*id);
            mask[i * s + j] = i64::from(*m);
        }
    }
    let feed: Vec<(String, SessionInputValue<'_>)> = vec![
        ("input_ids".into(), Tensor::from_array(([b, s], ids)).unwrap().into()),
        ("attention_mask".into(), Tensor::from_array(([b, s], mask.clone())).unwrap().into()),
        ("token_type_ids".into(), Tensor::from_array(([b, s], vec![0i64; b * s])).unwrap().into()),
    ];
    let out = session.run(feed).unwrap();
    let (shape, data) = out["last_hidden_state"].try_extract_tensor::<f32>().unwrap();
    assert_eq!(shape.as_ref()[..2], [b as i64, s as i64]);
    let dim = shape.as_ref()[2] as usize;
    (data.to_vec(), mask, s, dim)
}

#[test]
fn minilm_from_safetensors_matches_the_bundles_fp32_model() {
    let src = sources_dir("minilm-l6-v2");
    let out = tempfile::tempdir().unwrap();
    let ours = out.path().join("model_fp32.onnx");
    convert::minilm(&src.join("model.safetensors"), &src.join("config.json"), &ours).expect("conversion");
    // Deterministic: a second run writes the same bytes.
    let again = out.path().join("again.onnx");
    convert::minilm(&src.join("model.safetensors"), &src.join("config.json"), &again).expect("conversion");
    assert_eq!(sha256_file(&ours), sha256_file(&again));

    let settings = EngineSettings { intra_threads: 1, ..EngineSettings::default() };
    let engine = Engine::new(settings, Arc::new(Metrics::new())).expect("onnx runtime");
    let mut converted = engine.session(&ours).expect("our model loads");
    let mut bundle = engine.session(&models_dir().join("minilm-l6-v2/model_fp32.onnx")).expect("bundle model");
    let tokenizer = tokenizers::Tokenizer::from_file(src.join("tokenizer.json")).unwrap();
    let sentences = [
        "A man is playing a guitar on stage.",
        "The quick brown fox jumps over the lazy dog, twice, before breakfast on a cold Tuesday morning.",
        "hi",
        "Elinor, this eldest daughter, whose advice was so effectual, possessed a strength of understanding.",
    ];
    let (a, mask, seq, dim) = hidden_states(&mut converted, &tokenizer, &sentences);
    let (b, _, _, bdim) = hidden_states(&mut bundle, &tokenizer, &sentences);
    assert_eq!((dim, bdim), (384, 384));
    assert!(mask.contains(&0), "the batch is padded");
    let (mut real, mut padded) = (0f32, 0f32);
    for (t, m) in mask.iter().enumerate() {
        let row = t * dim..(t + 1) * dim;
        let most = a[row.clone()].iter().zip(&b[row]).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        if *m == 1 { real = real.max(most) } else { padded = padded.max(most) }
    }
    eprintln!("largest difference from the bundle's model: {real} on tokens, {padded} on padding ({seq} positions)");
    assert!(real <= 1e-4, "tokens differ from the bundle's model by up to {real} (seq {seq})");
    // Padded positions are masked out of pooling; they only need to be close.
    assert!(padded <= 1e-3, "padded positions differ by up to {padded}");
}

#[test]
fn a_truncated_or_foreign_model_bin_is_refused_naming_the_file() {
    let src = sources_dir("whisper-base");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");

    // The first 4 MiB of the real model.bin: a Whisper header, then the data stops.
    let truncated = dir.path().join("model.bin");
    let full = std::fs::read(src.join("model.bin")).unwrap();
    std::fs::write(&truncated, &full[..4 << 20]).unwrap();
    let e = convert::whisper(&truncated, &src.join("config.json"), &src.join("tokenizer.json"), &out).unwrap_err();
    assert!(matches!(&e, ConvertError::Format { path, .. } if *path == truncated), "{e:?}");
    assert!(e.to_string().contains("truncated") && e.to_string().contains(&truncated.display().to_string()), "{e}");

    // MiniLM's safetensors is not a CTranslate2 model at all.
    let foreign = sources_dir("minilm-l6-v2").join("model.safetensors");
    let e = convert::whisper(&foreign, &src.join("config.json"), &src.join("tokenizer.json"), &out).unwrap_err();
    assert!(matches!(&e, ConvertError::Format { path, .. } if *path == foreign), "{e:?}");
    assert!(e.to_string().contains("not a CTranslate2 model.bin"), "{e}");

    // A Whisper model.bin with MiniLM's config.json as the CTranslate2 config: refused, naming it.
    let wrong_config = sources_dir("minilm-l6-v2").join("config.json");
    let e = convert::whisper(&src.join("model.bin"), &wrong_config, &src.join("tokenizer.json"), &out).unwrap_err();
    assert!(matches!(&e, ConvertError::Format { path, .. } if *path == wrong_config), "{e:?}");

    // A missing file is an I/O error naming it.
    let missing = dir.path().join("absent.bin");
    let e = convert::whisper(&missing, &src.join("config.json"), &src.join("tokenizer.json"), &out).unwrap_err();
    assert!(matches!(&e, ConvertError::Io { path, .. } if *path == missing), "{e:?}");

    assert!(!out.exists(), "a refused conversion writes nothing");
}
