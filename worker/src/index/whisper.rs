//! Whisper (Hugging Face Optimum ONNX layout) behind one owner thread that holds the encoder and the
//! decoder, so that every chunk of every concurrent task shares one copy of the weights.
//!
//! A batch of requests is encoded (a row at a time, see [`ENCODER_ROWS`]), its cross-attention cache
//! computed by a small model carved out of `decoder_model.onnx`, then decoded in lockstep by
//! `decoder_with_past_model`: the prompt from an empty past, then one token per step for all rows,
//! whose self-attention caches stack along the batch axis (every row has the same prompt length, so
//! the same past length). Finished rows keep feeding eot until the last row is done. `decoder_model`
//! itself is never loaded: it holds the same weights as the with-past decoder (310 MB in fp32).
//! Inputs are built from each session's own input names, so real Optimum exports drop in.
//! With the `testing` feature, a request can ask for the no-cache reference path instead (the whole
//! prefix re-run from an empty past at every step), which tests and the benchmark compare against.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorRef};

use heimdex_shared::contract::SpeechTask;

use super::decode::{Row, WhisperConfig};
use super::mel::{N_FRAMES, N_MELS};
use crate::engine::{BatchRunner, InferenceError};
use crate::metrics::Metrics;

/// Cached key/value tensors by the `past_key_values.*` input name they feed.
type PastValues = HashMap<String, DynValue>;

/// What a window's prompt asks for besides its audio.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prompt {
    /// Language token id (of the language spoken, for either task), or `None` to detect it from the
    /// window.
    pub language: Option<u32>,
    pub task: SpeechTask,
}

impl Prompt {
    /// The text as spoken.
    pub fn transcribe(language: Option<u32>) -> Self {
        Self { language, task: SpeechTask::Transcribe }
    }
}

/// One window to transcribe.
#[derive(Clone, Debug)]
pub struct AsrRequest {
    /// Log-mel features [80 × 3000].
    pub mel: Vec<f32>,
    pub prompt: Prompt,
    /// Produce timestamp tokens (segments); otherwise `<|notimestamps|>` is in the prompt.
    pub timestamps: bool,
    pub max_tokens: usize,
    /// Time the words too: the encoder positions that hold the window's audio (50 a second), where
    /// the alignment may place them (see [`super::align`]).
    pub word_positions: Option<usize>,
    /// Decode with the KV cache (always in production), or re-run the whole prefix at every step: the
    /// reference that tests and the benchmark compare the KV-cache decoder against.
    #[cfg(feature = "testing")]
    pub kv_cache: bool,
}

impl AsrRequest {
    /// A window decoded with the KV cache.
    pub fn new(mel: Vec<f32>, prompt: Prompt, timestamps: bool, max_tokens: usize) -> Self {
        Self {
            mel,
            prompt,
            timestamps,
            max_tokens,
            word_positions: None,
            #[cfg(feature = "testing")]
            kv_cache: true,
        }
    }

    #[cfg(feature = "testing")]
    fn kv_cache(&self) -> bool {
        self.kv_cache
    }

    #[cfg(not(feature = "testing"))]
    fn kv_cache(&self) -> bool {
        true
    }
}

/// What a window decoded to.
#[derive(Clone, Debug)]
pub struct AsrResult {
    /// Generated tokens: text and timestamps, without prompt or eot.
    pub tokens: Vec<u32>,
    pub probs: Vec<f32>,
    /// With [`AsrRequest::word_positions`]: where each text token (each token below eot, in order)
    /// starts and, last, where the text ends, seconds from the window's start; empty otherwise.
    pub token_times: Vec<f32>,
    /// Language token id used in the prompt.
    pub language: u32,
    pub looped: bool,
}

/// Rows per encoder run. The encoder's working memory grows with its batch (unfused, the attention
/// scores alone are 72 MB a row) while on a 2-core CPU its GEMMs are already large at one row:
/// measured on the 600 s recording, one row per run gives the same speed as four and a lower
/// peak RSS.
pub const ENCODER_ROWS: usize = 1;

/// Owns the Whisper sessions: the encoder, the cross-attention cache model carved out of
/// `decoder_model.onnx` (see [`cross_cache_model`]), and `decoder_with_past_model.onnx`, which runs
/// every decoder step including the prompt (with an empty self-attention past), so the decoder's
/// weights are in memory once.
pub struct WhisperRunner {
    cfg: WhisperConfig,
    encoder: Session,
    cross: Session,
    decoder: Session,
    past_inputs: Vec<String>,
    /// (heads, head size) of the self-attention cache, for the empty past of the first step.
    heads: (usize, usize),
    /// The alignment heads, when the decoder outputs their layers' cross-attention scores
    /// ([`heimdex_models::expose`]); without them words are not timed.
    alignment_heads: Vec<[usize; 2]>,
    /// Where each batch's time goes (`heimdex_inference_phase_seconds_total`).
    metrics: Arc<Metrics>,
}

/// The with-past decoder's bytes with the cross-attention scores of the layers of `cfg`'s alignment
/// heads as outputs, for word timestamps (see [`heimdex_models::expose`]).
///
/// # Errors
/// The model has no alignment heads, or the graph is not the converter's.
pub fn expose_alignment(cfg: &WhisperConfig, model: Vec<u8>) -> Result<Vec<u8>, InferenceError> {
    // One output per layer, whatever order config.json lists the heads in.
    let mut layers: Vec<usize> = cfg.alignment_heads.iter().map(|h| h[0]).collect();
    layers.sort_unstable();
    layers.dedup();
    if layers.is_empty() {
        return Err(model_err("config.json names no alignment_heads, which word timestamps need".into()));
    }
    heimdex_models::expose::cross_attention_scores(&model, &layers)
        .map_err(|e| model_err(format!("exposing the alignment heads' cross-attention for word timestamps: {e}")))
}

/// The part of `decoder_model.onnx` that `decoder_with_past_model.onnx` lacks: the cross-attention
/// cache (its `present.{i}.encoder.*` outputs) from `encoder_hidden_states`, as ONNX bytes. Called
/// before the other sessions are created, so that the file's bytes are gone before their weights come.
///
/// # Errors
/// The file is not ONNX, or has no `present.*.encoder.*` output computed from `encoder_hidden_states`.
pub fn cross_cache_model(decoder_model: &[u8]) -> Result<Vec<u8>, InferenceError> {
    let carve =
        |e: heimdex_models::carve::CarveError| model_err(format!("carving the cross-attention cache out of decoder_model.onnx: {e}"));
    let outputs: Vec<String> = heimdex_models::carve::outputs(decoder_model)
        .map_err(carve)?
        .into_iter()
        .filter(|o| o.starts_with("present.") && o.contains(".encoder."))
        .collect();
    if outputs.is_empty() {
        return Err(model_err("decoder_model.onnx has no present.*.encoder.* outputs".into()));
    }
    heimdex_models::carve::carve(decoder_model, &["encoder_hidden_states".to_string()], &outputs).map_err(carve)
}

impl WhisperRunner {
    /// # Errors
    /// `decoder` does not look like a with-past decoder (no `past_key_values.*.decoder.key` input
    /// of shape [batch, heads, past, head size]).
    pub fn new(
        cfg: WhisperConfig,
        encoder: Session,
        cross: Session,
        decoder: Session,
        metrics: Arc<Metrics>,
    ) -> Result<Self, InferenceError> {
        let past_inputs: Vec<String> = decoder.inputs().iter().map(|i| i.name().to_string()).collect();
        let dims = decoder
            .inputs()
            .iter()
            .find(|i| i.name().starts_with("past_key_values.") && i.name().ends_with(".decoder.key"))
            .and_then(|i| i.dtype().tensor_shape().map(|s| s.to_vec()))
            .ok_or_else(|| model_err("decoder_with_past_model has no past_key_values.*.decoder.key input".into()))?;
        let heads = match dims.as_slice() {
            [_, h, _, d] if *h > 0 && *d > 0 => (*h as usize, *d as usize),
            other => {
                return Err(model_err(format!("past_key_values.*.decoder.key has shape {other:?}, expected [b, heads, past, head size]")));
            }
        };
        let cross_outputs: Vec<String> = cross.outputs().iter().map(|o| o.name().replacen("present", "past_key_values", 1)).collect();
        if let Some(missing) = past_inputs.iter().find(|n| n.contains(".encoder.") && !cross_outputs.contains(n)) {
            return Err(model_err(format!("the cross-attention cache model does not compute decoder input {missing}")));
        }
        let outputs: Vec<&str> = decoder.outputs().iter().map(|o| o.name()).collect();
        let alignment_heads = if cfg.alignment_heads.iter().all(|h| outputs.contains(&heimdex_models::expose::scores_output(h[0]).as_str()))
        {
            cfg.alignment_heads.clone()
        } else {
            Vec::new()
        };
        Ok(Self { cfg, encoder, cross, decoder, past_inputs, heads, alignment_heads, metrics })
    }

    /// Encoder output of every row, [b, frames, width], [`ENCODER_ROWS`] rows per run. A row whose
    /// features equal an earlier row's (digital silence; warm-up's batch of one window) reuses its
    /// output instead of running the encoder again: comparing features costs microseconds, a run a second.
    fn encode(&mut self, rows: &[&AsrRequest]) -> Result<DynValue, InferenceError> {
        let first_of: Vec<usize> = (0..rows.len()).map(|i| (0..i).find(|&j| rows[j].mel == rows[i].mel).unwrap_or(i)).collect();
        let unique: Vec<usize> = (0..rows.len()).filter(|&i| first_of[i] == i).collect();
        let mut hidden: Vec<f32> = Vec::new();
        let mut dims = (0, 0);
        for group in unique.chunks(ENCODER_ROWS) {
            let mut feats = Vec::with_capacity(group.len() * N_MELS * N_FRAMES);
            for &i in group {
                if rows[i].mel.len() != N_MELS * N_FRAMES {
                    return Err(model_err(format!("mel has {} values, expected {}", rows[i].mel.len(), N_MELS * N_FRAMES)));
                }
                feats.extend_from_slice(&rows[i].mel);
            }
            let input = Tensor::from_array(([group.len(), N_MELS, N_FRAMES], feats))?;
            let out = self.encoder.run(ort::inputs!["input_features" => input])?;
            let hs = out.get("last_hidden_state").ok_or_else(|| model_err("encoder has no last_hidden_state".into()))?;
            let (shape, data) = hs.try_extract_tensor::<f32>()?;
            dims = match shape.as_ref() {
                [_, t, d] => (*t as usize, *d as usize),
                other => return Err(model_err(format!("last_hidden_state has shape {other:?}"))),
            };
            hidden.extend_from_slice(data);
        }
        // Rows in request order, each from its unique row's output.
        let size = dims.0 * dims.1;
        let mut all = Vec::with_capacity(rows.len() * size);
        for &first in &first_of {
            let k = unique.binary_search(&first).map_err(|_| model_err("encoder row lost".into()))?;
            all.extend_from_slice(&hidden[k * size..(k + 1) * size]);
        }
        Ok(Tensor::from_array(([rows.len(), dims.0, dims.1], all))?.into_dyn())
    }

    /// The cross-attention cache of every row, by the decoder input it feeds.
    fn cross_cache(&mut self, hs: &DynValue) -> Result<PastValues, InferenceError> {
        let mut out = self.cross.run(ort::inputs!["encoder_hidden_states" => hs])?;
        let names: Vec<String> = out.keys().map(str::to_string).collect();
        let mut past = HashMap::new();
        for name in names {
            if let Some(v) = out.remove(&name) {
                past.insert(name.replacen("present", "past_key_values", 1), v);
            }
        }
        Ok(past)
    }

    /// An empty self-attention past for `b` rows: the decoder then computes the prompt step exactly
    /// as `decoder_model` would (positions from 0, causal mask over the prompt).
    fn empty_past(&self, b: usize, past: &mut PastValues) -> Result<(), InferenceError> {
        for name in self.past_inputs.iter().filter(|n| n.starts_with("past_key_values.") && n.contains(".decoder.")) {
            let empty = Tensor::<f32>::from_array(([b, self.heads.0, 0, self.heads.1], Vec::<f32>::new()))?;
            past.insert(name.clone(), empty.into_dyn());
        }
        Ok(())
    }

    fn detect_language(&mut self, b: usize, cross: &PastValues) -> Result<Vec<u32>, InferenceError> {
        let mut past = PastValues::new();
        self.empty_past(b, &mut past)?;
        let logits = self.step(&vec![i64::from(self.cfg.special_tokens.sot); b], b, cross, &mut past)?;
        Ok(logits
            .iter()
            .map(|lg| {
                self.cfg
                    .language_ids
                    .values()
                    .copied()
                    .max_by(|&a, &c| lg[a as usize].total_cmp(&lg[c as usize]))
                    .unwrap_or(self.cfg.special_tokens.sot + 1)
            })
            .collect())
    }

    fn transcribe(&mut self, reqs: &[&AsrRequest]) -> Result<Vec<AsrResult>, InferenceError> {
        let b = reqs.len();
        let started = std::time::Instant::now();
        let hs = self.encode(reqs)?;
        let cross = self.cross_cache(&hs)?;
        drop(hs);
        let detected = if reqs.iter().any(|r| r.prompt.language.is_none()) { Some(self.detect_language(b, &cross)?) } else { None };
        let sp = self.cfg.special_tokens;
        let langs: Vec<u32> =
            reqs.iter().enumerate().map(|(i, r)| r.prompt.language.or(detected.as_ref().map(|d| d[i])).unwrap_or(sp.sot + 1)).collect();
        let mut ids: Vec<Vec<i64>> = Vec::with_capacity(b);
        for (&l, r) in langs.iter().zip(reqs) {
            let task = match r.prompt.task {
                SpeechTask::Transcribe => sp.transcribe,
                SpeechTask::Translate => sp.translate.ok_or_else(|| InferenceError::Model {
                    model: "whisper".into(),
                    message: "this Whisper model has no translate token (English-only models cannot translate)".into(),
                })?,
            };
            let mut p = vec![sp.sot, l, task];
            if !r.timestamps {
                p.push(sp.notimestamps);
            }
            ids.push(p.into_iter().map(i64::from).collect());
        }
        self.metrics.observe_phase(super::WHISPER, "encode", started.elapsed());
        let started = std::time::Instant::now();
        let max_text = self.cfg.max_decode_tokens.max(1);
        let mut rows: Vec<Row> = reqs.iter().map(|r| Row::new(r.timestamps, r.max_tokens.min(max_text))).collect();
        let mut past = PastValues::new();
        self.empty_past(b, &mut past)?;
        let logits = self.step(&ids.concat(), b, &cross, &mut past)?;
        let mut next: Vec<i64> = rows.iter_mut().zip(&logits).map(|(row, lg)| i64::from(row.step(&self.cfg, lg))).collect();
        let kv = reqs.iter().all(|r| r.kv_cache());
        while !rows.iter().all(|r| r.done) {
            let logits = if kv {
                self.step(&next, b, &cross, &mut past)?
            } else {
                // Reference path: the whole prefix again from an empty past.
                for (seq, &n) in ids.iter_mut().zip(&next) {
                    seq.push(n);
                }
                self.empty_past(b, &mut past)?;
                self.step(&ids.concat(), b, &cross, &mut past)?
            };
            next = rows.iter_mut().zip(&logits).map(|(row, lg)| i64::from(row.step(&self.cfg, lg))).collect();
        }
        // The self-attention cache is done with; the alignment passes start from an empty one.
        drop(past);
        self.metrics.observe_phase(super::WHISPER, "decode", started.elapsed());
        let started = std::time::Instant::now();
        let mut token_times = Vec::with_capacity(b);
        for (i, (row, r)) in rows.iter().zip(reqs).enumerate() {
            token_times.push(match r.word_positions {
                Some(positions) => self.align(i, b, &cross, &ids[i][..3], &row.tokens, positions)?,
                None => Vec::new(),
            });
        }
        self.metrics.observe_phase(super::WHISPER, "align", started.elapsed());
        Ok(rows
            .into_iter()
            .zip(langs)
            .zip(token_times)
            .map(|((row, language), token_times)| AsrResult {
                tokens: row.tokens,
                probs: row.probs,
                token_times,
                language,
                looped: row.looped,
            })
            .collect())
    }

    /// Where each text token of row `row`'s output starts (see [`super::align::token_times`]): the
    /// decoder runs once over `prompt` (start, language, task), `<|notimestamps|>`, the text tokens and
    /// end-of-text, from an empty past with the row's cross-attention cache, and the alignment heads'
    /// scores over the first `positions` encoder positions are aligned. Empty without alignment
    /// heads or text.
    fn align(
        &mut self,
        row: usize,
        b: usize,
        cross: &PastValues,
        prompt: &[i64],
        tokens: &[u32],
        positions: usize,
    ) -> Result<Vec<f32>, InferenceError> {
        let sp = self.cfg.special_tokens;
        let text: Vec<u32> = tokens.iter().copied().filter(|&t| t < sp.eot).collect();
        if self.alignment_heads.is_empty() || text.is_empty() {
            return Ok(Vec::new());
        }
        let mut ids = prompt.to_vec();
        ids.push(i64::from(sp.notimestamps));
        ids.extend(text.iter().map(|&t| i64::from(t)));
        ids.push(i64::from(sp.eot));
        let rows = ids.len();
        let mut past = PastValues::new();
        self.empty_past(1, &mut past)?;
        let inputs = self.decoder_inputs(&ids, 1, Cross::Row { batch: cross, row, of: b }, &past)?;
        let out = self.decoder.run(inputs)?;
        let mut heads = Vec::with_capacity(self.alignment_heads.len());
        let mut frames = 0;
        for &[layer, head] in &self.alignment_heads {
            let name = heimdex_models::expose::scores_output(layer);
            let scores = out.get(name.as_str()).ok_or_else(|| model_err(format!("the decoder has no output {name}")))?;
            let (shape, data) = scores.try_extract_tensor::<f32>()?;
            let (h, t, s) = match shape.as_ref() {
                [1, h, t, s] if *t as usize == rows => (*h as usize, *t as usize, *s as usize),
                other => return Err(model_err(format!("{name} has shape {other:?}, expected [1, heads, {rows}, positions]"))),
            };
            if head >= h {
                return Err(model_err(format!("alignment head {head} of layer {layer}, which has {h} heads")));
            }
            frames = positions.min(s);
            let mut m = Vec::with_capacity(t * frames);
            for r in 0..t {
                let at = (head * t + r) * s;
                m.extend_from_slice(&data[at..at + frames]);
            }
            heads.push(m);
        }
        Ok(super::align::token_times(&heads, rows, frames, prompt.len() + 1))
    }

    /// One decoder run on `ids` ([b, t] row-major) after the self-attention cache in `past`, which it
    /// replaces with the cache extended by `ids`; returns the last position's logits per row.
    fn step(&mut self, ids: &[i64], b: usize, cross: &PastValues, past: &mut PastValues) -> Result<Vec<Vec<f32>>, InferenceError> {
        let inputs = self.decoder_inputs(ids, b, Cross::Batch(cross), past)?;
        let mut out = self.decoder.run(inputs)?;
        let logits = last_logits(&out, b)?;
        let names: Vec<String> = out.keys().filter(|k| k.contains(".decoder.")).map(str::to_string).collect();
        for name in names {
            if let Some(v) = out.remove(&name) {
                past.insert(name.replacen("present", "past_key_values", 1), v);
            }
        }
        Ok(logits)
    }

    /// The decoder's inputs for `ids` ([b, t] row-major) after `past`, by the session's own input names.
    fn decoder_inputs<'v>(
        &self,
        ids: &[i64],
        b: usize,
        cross: Cross<'v>,
        past: &'v PastValues,
    ) -> Result<Vec<(Cow<'static, str>, SessionInputValue<'v>)>, InferenceError> {
        let t = ids.len() / b;
        let mut inputs: Vec<(Cow<'static, str>, SessionInputValue<'v>)> = Vec::with_capacity(self.past_inputs.len());
        for name in &self.past_inputs {
            let value: SessionInputValue<'v> = match name.as_str() {
                "input_ids" => Tensor::from_array(([b, t], ids.to_vec()))?.into(),
                other => match cross.get(other)?.or_else(|| past.get(other).map(Into::into)) {
                    Some(v) => v,
                    None => return Err(model_err(format!("no value for decoder input {other}"))),
                },
            };
            inputs.push((name.clone().into(), value));
        }
        Ok(inputs)
    }
}

/// The cross-attention cache a decoder run reads: a batch's, or one row of it (a view of the batch's
/// tensors, not a copy: 37 MB a row for whisper-base).
#[derive(Clone, Copy)]
enum Cross<'v> {
    Batch(&'v PastValues),
    Row { batch: &'v PastValues, row: usize, of: usize },
}

impl<'v> Cross<'v> {
    fn get(self, name: &str) -> Result<Option<SessionInputValue<'v>>, InferenceError> {
        match self {
            Self::Batch(values) => Ok(values.get(name).map(Into::into)),
            Self::Row { batch, row, of } => {
                let Some(value) = batch.get(name) else { return Ok(None) };
                let (shape, data) = value.try_extract_tensor::<f32>()?;
                let mut dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
                let size = data.len() / of.max(1);
                if let Some(first) = dims.first_mut() {
                    *first = 1;
                }
                Ok(Some(TensorRef::from_array_view((dims, &data[row * size..(row + 1) * size]))?.into()))
            }
        }
    }
}

fn last_logits(out: &ort::session::SessionOutputs<'_>, b: usize) -> Result<Vec<Vec<f32>>, InferenceError> {
    let logits = out.get("logits").ok_or_else(|| model_err("decoder has no logits output".into()))?;
    let (shape, data) = logits.try_extract_tensor::<f32>()?;
    let (t, v) = match shape.as_ref() {
        [bb, t, v] if *bb as usize == b => (*t as usize, *v as usize),
        other => return Err(model_err(format!("logits shape {other:?}, batch {b}"))),
    };
    Ok((0..b).map(|i| data[(i * t + t - 1) * v..(i * t + t) * v].to_vec()).collect())
}

fn model_err(message: String) -> InferenceError {
    InferenceError::Model { model: super::WHISPER.into(), message }
}

impl BatchRunner for WhisperRunner {
    type Input = AsrRequest;
    type Output = AsrResult;

    /// Rows that need different prompts or paths run as separate groups, each batched.
    fn run(&mut self, inputs: Vec<AsrRequest>) -> Result<Vec<AsrResult>, InferenceError> {
        let mut out: Vec<Option<AsrResult>> = vec![None; inputs.len()];
        let mut groups: Vec<((bool, bool), Vec<usize>)> = Vec::new();
        for (i, r) in inputs.iter().enumerate() {
            let key = (r.timestamps, r.kv_cache());
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, idx)) => idx.push(i),
                None => groups.push((key, vec![i])),
            }
        }
        for (_, idx) in groups {
            let reqs: Vec<&AsrRequest> = idx.iter().map(|&i| &inputs[i]).collect();
            for (i, res) in idx.iter().zip(self.transcribe(&reqs)?) {
                out[*i] = Some(res);
            }
        }
        out.into_iter().map(|r| r.ok_or_else(|| model_err("a row got no result".into()))).collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Heads listed in any order expose each of their layers once (two outputs of one name would
    /// make the graph invalid).
    #[test]
    fn alignment_heads_in_any_order_expose_each_layer_once() {
        let dir = heimdex_shared::config::ModelSettings::default().dir.join("whisper-base");
        let mut cfg: WhisperConfig = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        cfg.alignment_heads.reverse();
        cfg.alignment_heads.rotate_left(3);
        let exposed = expose_alignment(&cfg, std::fs::read(dir.join("decoder_with_past_model.onnx")).unwrap()).unwrap();
        let outputs = heimdex_models::carve::outputs(&exposed).unwrap();
        for layer in [3, 4, 5] {
            let name = heimdex_models::expose::scores_output(layer);
            assert_eq!(outputs.iter().filter(|o| **o == name).count(), 1, "{name} in {outputs:?}");
        }
    }
}
