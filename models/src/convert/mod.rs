//! Builds the model files the workers load from the upstream weights, in Rust, so that
//! `heimdex-models download` can fetch only pinned upstream files and derive the rest itself.
//!
//! - [`whisper`]: a CTranslate2 Whisper (`Systran/faster-whisper-base`) into the three ONNX graphs,
//!   the mel filterbank and the worker's `config.json`. The ONNX files and the filterbank are
//!   byte-identical to what the offline bundle's Python preparation (its `whisper_onnx.py` and
//!   `build.py`) writes for the same input, so a catalog can pin their sha256.
//! - [`minilm`]: `all-MiniLM-L6-v2` from its `model.safetensors` into one fp32 ONNX encoder.
//!
//! Submodules: `graph` (naming rules), `ct2` (model.bin reader), `whisper_graphs` (Whisper's ONNX
//! graphs), `mel_filters` (Whisper's filterbank file), `bert` (MiniLM graph and safetensors reader).
//! The models are written with [`crate::onnx::write`].
//!
//! Every output is written to a temporary file beside it and renamed into place, so a reader sees
//! either the old file or the whole new one, and an interrupted run leaves no half file under the
//! final name. Outputs are deterministic: the same inputs give the same bytes.

mod bert;
mod ct2;
mod graph;
mod mel_filters;
mod whisper_graphs;

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};

/// Why a conversion failed, naming the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// Reading an input or writing an output failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An input is not what the converter expects (wrong model kind, truncated, inconsistent).
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
}

impl ConvertError {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        ConvertError::Io { path: path.to_path_buf(), source }
    }

    pub(crate) fn format(path: &Path, reason: impl Into<String>) -> Self {
        ConvertError::Format { path: path.to_path_buf(), reason: reason.into() }
    }
}

/// Writes `path` atomically: `write` fills a temporary file in the same folder (named by process and
/// a counter, so concurrent conversions never share one), which is synced and renamed over `path`; on
/// failure the temporary file is removed.
fn write_atomic(path: &Path, write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>) -> Result<(), ConvertError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{name}.{}-{n}.tmp", std::process::id()));
    let result = (|| {
        let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        write(&mut w)?;
        let file = w.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ConvertError::io(path, e)
    })
}

fn read_json(path: &Path) -> Result<Value, ConvertError> {
    let raw = std::fs::read(path).map_err(|e| ConvertError::io(path, e))?;
    serde_json::from_slice(&raw).map_err(|e| ConvertError::format(path, format!("not JSON: {e}")))
}

fn create_dir(dir: &Path) -> Result<(), ConvertError> {
    std::fs::create_dir_all(dir).map_err(|e| ConvertError::io(dir, e))
}

/// Whisper from CTranslate2 (the `Systran/faster-whisper-base` files) into `out_dir`:
/// `encoder_model.onnx`, `decoder_model.onnx`, `decoder_with_past_model.onnx`, `mel_filters.f32` and
/// `config.json` (what the index pipeline reads).
///
/// Memory: the model file is read once (its size) plus one graph's weights at a time.
///
/// # Errors
/// [`ConvertError::Io`] when an input cannot be read or an output written; [`ConvertError::Format`]
/// when `model_bin` is not a CTranslate2 Whisper model, or the config or tokenizer do not match it.
pub fn whisper(model_bin: &Path, ct2_config_json: &Path, tokenizer_json: &Path, out_dir: &Path) -> Result<(), ConvertError> {
    let model = ct2::Ct2Model::open(model_bin)?;
    let w = whisper_graphs::Whisper::new(&model)?;
    // The JSON inputs are checked before the long part, so a wrong file fails at once.
    let config = whisper_config(&w.dims, ct2_config_json, tokenizer_json)?;
    create_dir(out_dir)?;
    // One graph at a time, so only one graph's weights are in memory beside the model file.
    type Build<'a> = &'a dyn Fn() -> Result<crate::onnx::Model, ConvertError>;
    let graphs: [(&str, Build<'_>); 3] = [
        ("encoder_model.onnx", &|| w.encoder()),
        ("decoder_model.onnx", &|| w.decoder(false)),
        ("decoder_with_past_model.onnx", &|| w.decoder(true)),
    ];
    for (name, build) in graphs {
        let graph = build()?;
        write_atomic(&out_dir.join(name), |f| graph.write_to(f))?;
    }
    let mel = mel_filters::file_bytes(SAMPLE_RATE, N_FFT, w.dims.n_mels);
    write_atomic(&out_dir.join("mel_filters.f32"), |f| f.write_all(&mel))?;
    let mut text = serde_json::to_vec_pretty(&config).map_err(|e| ConvertError::io(out_dir, io::Error::other(e)))?;
    text.push(b'\n');
    write_atomic(&out_dir.join("config.json"), |f| f.write_all(&text))?;
    Ok(())
}

const SAMPLE_RATE: u32 = 16000;
const N_FFT: usize = 400;
const HOP_LENGTH: usize = 160;
const CHUNK_LENGTH_S: usize = 30;

/// The worker's `whisper-base/config.json`, as `build.py`'s `step_whisper` writes it: dimensions from
/// the model, special and language token ids from the tokenizer's added tokens, suppression lists
/// and alignment heads from the CTranslate2 config.
fn whisper_config(dm: &whisper_graphs::Dims, ct2_config_json: &Path, tokenizer_json: &Path) -> Result<Value, ConvertError> {
    let ct2 = read_json(ct2_config_json)?;
    let tok = read_json(tokenizer_json)?;
    let bad_tok = |reason: String| ConvertError::format(tokenizer_json, reason);
    let added: Vec<(String, u64)> = tok
        .get("added_tokens")
        .and_then(Value::as_array)
        .ok_or_else(|| bad_tok("no added_tokens list".into()))?
        .iter()
        .map(|a| match (a.get("content").and_then(Value::as_str), a.get("id").and_then(Value::as_u64)) {
            (Some(c), Some(id)) => Ok((c.to_string(), id)),
            _ => Err(bad_tok(format!("added token {a} lacks content or id"))),
        })
        .collect::<Result<_, _>>()?;
    let id = |content: &str| {
        added.iter().find(|(c, _)| c == content).map(|(_, id)| *id).ok_or_else(|| bad_tok(format!("no added token {content}")))
    };
    let sot = id("<|startoftranscript|>")?;
    let translate = id("<|translate|>")?;
    let notimestamps = id("<|notimestamps|>")?;
    let sp = json!({
        "eot": id("<|endoftext|>")?,
        "sot": sot,
        "translate": translate,
        "transcribe": id("<|transcribe|>")?,
        "sot_lm": id("<|startoflm|>")?,
        "sot_prev": id("<|startofprev|>")?,
        "no_speech": id("<|nocaptions|>")?,
        "notimestamps": notimestamps,
        "timestamp_begin": notimestamps + 1,
    });
    // Language tokens lie between <|startoftranscript|> and <|translate|> (50259..=50357 in Whisper).
    let mut langs = serde_json::Map::new();
    let mut lang_ids = Vec::new();
    for (content, tid) in &added {
        if *tid > sot && *tid < translate {
            let code = content.strip_prefix("<|").and_then(|c| c.strip_suffix("|>")).unwrap_or(content);
            langs.insert(code.to_string(), json!(tid));
            lang_ids.push(*tid);
        }
    }
    let bad_ct2 = |reason: &str| ConvertError::format(ct2_config_json, reason.to_string());
    let field = |name: &str| ct2.get(name).cloned().ok_or_else(|| bad_ct2(&format!("no {name}")));
    let mut ct2_langs: Vec<u64> = field("lang_ids")?
        .as_array()
        .ok_or_else(|| bad_ct2("lang_ids is not a list"))?
        .iter()
        .map(|v| v.as_u64().ok_or_else(|| bad_ct2("lang_ids holds a non-integer")))
        .collect::<Result<_, _>>()?;
    ct2_langs.sort_unstable();
    lang_ids.sort_unstable();
    if ct2_langs != lang_ids {
        return Err(bad_ct2(&format!("lang_ids disagree with the language tokens of {}", tokenizer_json.display())));
    }
    let en = langs.get("en").cloned().ok_or_else(|| bad_tok("no <|en|> token".into()))?;
    let max_id = added.iter().map(|(_, id)| *id).max().unwrap_or(0);
    let (d, h, hd, vocab) = (dm.d, dm.heads, dm.head_dim, dm.vocab);
    let io_ = json!({
        "encoder_model.onnx": {"inputs": {"input_features": ["batch_size", dm.n_mels, 2 * dm.n_audio_ctx]},
                               "outputs": {"last_hidden_state": ["batch_size", dm.n_audio_ctx, d]}},
        "decoder_model.onnx": {
            "inputs": {"input_ids": ["batch_size", "decoder_sequence_length"],
                       "encoder_hidden_states": ["batch_size", "encoder_sequence_length", d]},
            "outputs": {"logits": ["batch_size", "decoder_sequence_length", vocab],
                        "present.{i}.decoder.key|value": ["batch_size", h, "decoder_sequence_length", hd],
                        "present.{i}.encoder.key|value": ["batch_size", h, "encoder_sequence_length", hd]}},
        "decoder_with_past_model.onnx": {
            "inputs": {"input_ids": ["batch_size", "decoder_sequence_length (1 per step)"],
                       "past_key_values.{i}.decoder.key|value": ["batch_size", h, "past_decoder_sequence_length", hd],
                       "past_key_values.{i}.encoder.key|value": ["batch_size", h, "encoder_sequence_length", hd]},
            "outputs": {"logits": ["batch_size", "decoder_sequence_length", vocab],
                        "present.{i}.decoder.key|value": ["batch_size", h, "past_decoder_sequence_length + 1", hd]}},
        "layers": (0..dm.n_dec).collect::<Vec<_>>(),
        "notes": ["Names and layouts follow Hugging Face Optimum's Whisper export (onnx-community/whisper-base).",
                  "Positions in decoder_with_past start at the past length (shape[2] of past_key_values.0.decoder.key).",
                  "The cross-attention cache (present.{i}.encoder.*) is produced once by decoder_model.onnx and fed \
                   back unchanged at every step.",
                  "Some Optimum exports also list encoder_hidden_states as an (unused) input of decoder_with_past: \
                   feed it only if the session asks for it."],
    });
    Ok(json!({
        "model": "openai/whisper-base (multilingual)",
        "source": "Systran/faster-whisper-base (CTranslate2 fp16 export), converted to ONNX by heimdex-models \
                   (heimdex_models::convert)",
        "license": "MIT (OpenAI)",
        "weights": "fp16 initializers cast to fp32 in the graph; compute is fp32",
        "sample_rate": SAMPLE_RATE, "n_fft": N_FFT, "hop_length": HOP_LENGTH, "chunk_length_s": CHUNK_LENGTH_S,
        "n_samples": SAMPLE_RATE as usize * CHUNK_LENGTH_S,
        "n_mels": dm.n_mels, "n_frames": 2 * dm.n_audio_ctx,
        "n_audio_ctx": dm.n_audio_ctx, "n_audio_state": d, "n_audio_head": h, "n_audio_layer": dm.n_enc,
        "n_text_ctx": dm.n_text_ctx, "n_text_state": d, "n_text_head": h, "n_text_layer": dm.n_dec,
        "head_dim": hd,
        "n_vocab": vocab,
        "tokenizer_vocab_size": max_id + 1,
        "tokenizer_note": format!("tokenizer.json holds ids 0..{max_id}; ids >= timestamp_begin are timestamps <|t|> \
                                   with t = (id - timestamp_begin) * 0.02 s and are not in tokenizer.json"),
        "special_tokens": sp,
        "timestamp_step_s": 0.02,
        "language_ids": langs,
        "prompt_transcribe_en": [sot, en, sp["transcribe"], notimestamps],
        "suppress_tokens": field("suppress_ids")?,
        "begin_suppress_tokens": field("suppress_ids_begin")?,
        "alignment_heads": field("alignment_heads")?,
        "max_decode_tokens": dm.n_text_ctx / 2,
        "onnx": io_,
    }))
}

/// `all-MiniLM-L6-v2` from its `model.safetensors` and `config.json` into one fp32 ONNX file with the
/// inputs `input_ids`, `attention_mask`, `token_type_ids` (i64 [batch, sequence]) and the output
/// `last_hidden_state` (f32 [batch, sequence, hidden]).
///
/// # Errors
/// [`ConvertError::Io`] when an input cannot be read or the output written; [`ConvertError::Format`]
/// when the config is not a BERT one this converter handles or the weights do not match it.
pub fn minilm(safetensors: &Path, config_json: &Path, out_file: &Path) -> Result<(), ConvertError> {
    let config = bert::BertConfig::read(config_json)?;
    let weights = bert::SafeTensors::open(safetensors)?;
    let model = bert::graph(&config, &weights)?;
    if let Some(dir) = out_file.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_dir(dir)?;
    }
    write_atomic(out_file, |f| model.write_to(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error of converting `model_bin`, its path, and the folder holding it (removed on drop).
    fn refused(model_bin: &[u8]) -> (ConvertError, PathBuf, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.bin");
        std::fs::write(&path, model_bin).unwrap();
        let json = dir.path().join("config.json");
        std::fs::write(&json, "{}").unwrap();
        let out = dir.path().join("out");
        let e = whisper(&path, &json, &json, &out).unwrap_err();
        assert!(!out.exists(), "a refused conversion writes nothing");
        (e, path, dir)
    }

    #[test]
    fn a_model_bin_of_another_spec_is_refused_naming_it() {
        let (e, path, _dir) = refused(&ct2::tests::tiny("TransformerSpec"));
        assert!(matches!(&e, ConvertError::Format { path: p, .. } if *p == path), "{e:?}");
        let text = e.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("\"TransformerSpec\"") && text.contains("not a WhisperSpec"), "{text}");
    }

    #[test]
    fn a_truncated_model_bin_is_refused_naming_it() {
        let full = ct2::tests::tiny("WhisperSpec");
        let (e, path, _dir) = refused(&full[..full.len() / 2]);
        assert!(matches!(&e, ConvertError::Format { path: p, .. } if *p == path), "{e:?}");
        let text = e.to_string();
        assert!(text.contains(&path.display().to_string()) && text.contains("truncated"), "{text}");
    }

    #[test]
    fn a_whisper_model_bin_without_its_weights_is_refused_naming_the_variable() {
        let (e, path, _dir) = refused(&ct2::tests::tiny("WhisperSpec"));
        assert!(matches!(&e, ConvertError::Format { path: p, .. } if *p == path), "{e:?}");
        assert!(e.to_string().contains("decoder/embeddings/weight"), "{e}");
    }
}
