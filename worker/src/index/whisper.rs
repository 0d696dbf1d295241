//! Whisper (Hugging Face Optimum ONNX layout) behind one owner thread that holds the encoder and both
//! decoders, so that every chunk of every concurrent task shares one copy of the weights.
//!
//! A batch of requests is encoded together, then decoded in lockstep: `decoder_model` runs once on the
//! prompt and yields the cross-attention cache, then `decoder_with_past_model` runs one token per step
//! for all rows, whose self-attention caches stack along the batch axis (every row has the same prompt
//! length, so the same past length). Finished rows keep feeding eot until the last row is done.
//! Inputs are built from each session's own input names, so real Optimum exports drop in.
//! A no-cache path (re-running `decoder_model` on the whole prefix) exists for the benchmark and tests.

use std::borrow::Cow;
use std::collections::HashMap;

use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor};

use super::decode::{Row, WhisperConfig};
use super::mel::{N_FRAMES, N_MELS};
use crate::engine::{BatchRunner, InferenceError};

/// Cached key/value tensors by the `past_key_values.*` input name they feed.
type PastValues = HashMap<String, DynValue>;

/// One window to transcribe.
#[derive(Clone, Debug)]
pub struct AsrRequest {
    /// Log-mel features [80 × 3000].
    pub mel: Vec<f32>,
    /// Language token id, or `None` to detect it from this window.
    pub language: Option<u32>,
    /// Produce timestamp tokens (segments); otherwise `<|notimestamps|>` is in the prompt.
    pub timestamps: bool,
    /// Use the KV-cache decoder (production) or re-run the full prefix (reference/benchmark).
    pub kv_cache: bool,
    pub max_tokens: usize,
}

/// What a window decoded to.
#[derive(Clone, Debug)]
pub struct AsrResult {
    /// Generated tokens: text and timestamps, without prompt or eot.
    pub tokens: Vec<u32>,
    pub probs: Vec<f32>,
    /// Language token id used in the prompt.
    pub language: u32,
    pub looped: bool,
    /// Wall time of the batch this row ran in: encoder (with language detection), and the token loop.
    pub encode_s: f32,
    pub decode_s: f32,
}

/// Owns the three Whisper sessions.
pub struct WhisperRunner {
    cfg: WhisperConfig,
    encoder: Session,
    decoder: Session,
    with_past: Session,
    past_inputs: Vec<String>,
    decoder_inputs: Vec<String>,
}

impl WhisperRunner {
    pub fn new(cfg: WhisperConfig, encoder: Session, decoder: Session, with_past: Session) -> Self {
        let past_inputs = with_past.inputs().iter().map(|i| i.name().to_string()).collect();
        let decoder_inputs = decoder.inputs().iter().map(|i| i.name().to_string()).collect();
        Self { cfg, encoder, decoder, with_past, past_inputs, decoder_inputs }
    }

    fn encode(&mut self, rows: &[&AsrRequest]) -> Result<DynValue, InferenceError> {
        let mut feats = Vec::with_capacity(rows.len() * N_MELS * N_FRAMES);
        for r in rows {
            if r.mel.len() != N_MELS * N_FRAMES {
                return Err(model_err(format!("mel has {} values, expected {}", r.mel.len(), N_MELS * N_FRAMES)));
            }
            feats.extend_from_slice(&r.mel);
        }
        let mut out =
            self.encoder.run(ort::inputs!["input_features" => Tensor::from_array(([rows.len(), N_MELS, N_FRAMES], feats))?])?;
        out.remove("last_hidden_state").ok_or_else(|| model_err("encoder has no last_hidden_state".into()))
    }

    /// Runs `decoder_model` on `ids` ([b, t] row-major); returns the last position's logits per row and
    /// the named outputs.
    fn run_decoder(
        &mut self,
        hs: &DynValue,
        ids: Vec<i64>,
        b: usize,
    ) -> Result<(Vec<Vec<f32>>, PastValues), InferenceError> {
        let t = ids.len() / b;
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::new();
        for name in &self.decoder_inputs {
            match name.as_str() {
                "input_ids" => inputs.push((name.clone().into(), Tensor::from_array(([b, t], ids.clone()))?.into())),
                "encoder_hidden_states" => inputs.push((name.clone().into(), hs.into())),
                other => return Err(model_err(format!("decoder_model asks for unknown input {other}"))),
            }
        }
        let mut out = self.decoder.run(inputs)?;
        let logits = last_logits(&out, b)?;
        let names: Vec<String> = out.keys().filter(|k| k.starts_with("present.")).map(str::to_string).collect();
        let mut present = HashMap::new();
        for name in names {
            if let Some(v) = out.remove(&name) {
                present.insert(name.replacen("present", "past_key_values", 1), v);
            }
        }
        Ok((logits, present))
    }

    fn detect_language(&mut self, hs: &DynValue, b: usize) -> Result<Vec<u32>, InferenceError> {
        let (logits, _) = self.run_decoder(hs, vec![i64::from(self.cfg.special_tokens.sot); b], b)?;
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
        let detected = if reqs.iter().any(|r| r.language.is_none()) { Some(self.detect_language(&hs, b)?) } else { None };
        let sp = self.cfg.special_tokens;
        let langs: Vec<u32> =
            reqs.iter().enumerate().map(|(i, r)| r.language.or(detected.as_ref().map(|d| d[i])).unwrap_or(sp.sot + 1)).collect();
        let mut ids: Vec<Vec<i64>> = langs
            .iter()
            .zip(reqs)
            .map(|(&l, r)| {
                let mut p = vec![sp.sot, l, sp.transcribe];
                if !r.timestamps {
                    p.push(sp.notimestamps);
                }
                p.into_iter().map(i64::from).collect()
            })
            .collect();
        let encode_s = started.elapsed().as_secs_f32();
        let started = std::time::Instant::now();
        let max_text = self.cfg.max_decode_tokens.max(1);
        let mut rows: Vec<Row> = reqs.iter().map(|r| Row::new(r.timestamps, r.max_tokens.min(max_text))).collect();
        let (logits, mut past) = self.run_decoder(&hs, ids.concat(), b)?;
        let mut next: Vec<i64> = rows.iter_mut().zip(&logits).map(|(row, lg)| i64::from(row.step(&self.cfg, lg))).collect();
        let kv = reqs.iter().all(|r| r.kv_cache);
        while !rows.iter().all(|r| r.done) {
            let logits = if kv {
                self.past_step(&hs, &next, &mut past)?
            } else {
                for (seq, &n) in ids.iter_mut().zip(&next) {
                    seq.push(n);
                }
                self.run_decoder(&hs, ids.concat(), b)?.0
            };
            next = rows.iter_mut().zip(&logits).map(|(row, lg)| i64::from(row.step(&self.cfg, lg))).collect();
        }
        let decode_s = started.elapsed().as_secs_f32();
        Ok(rows
            .into_iter()
            .zip(langs)
            .map(|(row, language)| AsrResult {
                tokens: row.tokens,
                probs: row.probs,
                language,
                looped: row.looped,
                encode_s,
                decode_s,
            })
            .collect())
    }

    /// One `decoder_with_past` step for all rows; replaces the self-attention cache in `past`.
    fn past_step(
        &mut self,
        hs: &DynValue,
        next: &[i64],
        past: &mut HashMap<String, DynValue>,
    ) -> Result<Vec<Vec<f32>>, InferenceError> {
        let b = next.len();
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(self.past_inputs.len());
        for name in &self.past_inputs {
            let value: SessionInputValue<'_> = match name.as_str() {
                "input_ids" => Tensor::from_array(([b, 1], next.to_vec()))?.into(),
                "encoder_hidden_states" => hs.into(),
                other => past.get(other).ok_or_else(|| model_err(format!("no value for decoder input {other}")))?.into(),
            };
            inputs.push((name.clone().into(), value));
        }
        let mut out = self.with_past.run(inputs)?;
        let logits = last_logits(&out, b)?;
        let names: Vec<String> = out.keys().filter(|k| k.contains(".decoder.")).map(str::to_string).collect();
        for name in names {
            if let Some(v) = out.remove(&name) {
                past.insert(name.replacen("present", "past_key_values", 1), v);
            }
        }
        Ok(logits)
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
            let key = (r.timestamps, r.kv_cache);
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
