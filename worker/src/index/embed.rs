//! Transcript text embeddings (all-MiniLM-L6-v2 by default; BGE-M3 by configuration): tokenise off the
//! async runtime, batch across every waiting request on the model's owner thread, pad each batch to
//! its longest sequence, pool (mean over the attention mask, or CLS), L2-normalise.
//!
//! Nothing here is model-specific: the files, pooling, dimension and maximum length come from
//! `IndexSettings`, and the inputs fed are the ones the session lists.

use std::path::Path;
use std::sync::Arc;

use heimdex_shared::config::Pooling;
use ort::session::{Session, SessionInputValue};
use ort::value::Tensor;
use tokenizers::{Tokenizer, TruncationParams};

use crate::engine::{BatchRunner, InferenceError, ModelHandle, l2_normalise};

/// One tokenised text.
#[derive(Clone, Debug)]
pub struct Encoded {
    pub ids: Vec<i64>,
}

/// Owns the text encoder session.
pub struct EmbedRunner {
    session: Session,
    inputs: Vec<String>,
    output: String,
    pooling: Pooling,
    dim: usize,
}

impl EmbedRunner {
    /// # Errors
    /// The session's outputs hold no usable embedding.
    pub fn new(session: Session, pooling: Pooling, dim: usize) -> Result<Self, InferenceError> {
        let inputs = session.inputs().iter().map(|i| i.name().to_string()).collect();
        let names: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        let output = names
            .iter()
            .find(|n| **n == "last_hidden_state")
            .or_else(|| names.first())
            .map(|n| (*n).to_string())
            .ok_or_else(|| InferenceError::Model { model: super::TEXT_EMBED.into(), message: "no outputs".into() })?;
        Ok(Self { session, inputs, output, pooling, dim })
    }
}

impl BatchRunner for EmbedRunner {
    type Input = Encoded;
    type Output = Vec<f32>;

    fn run(&mut self, texts: Vec<Encoded>) -> Result<Vec<Vec<f32>>, InferenceError> {
        let b = texts.len();
        let s = texts.iter().map(|t| t.ids.len()).max().unwrap_or(1).max(1);
        let mut ids = vec![0i64; b * s];
        let mut mask = vec![0i64; b * s];
        for (i, t) in texts.iter().enumerate() {
            ids[i * s..i * s + t.ids.len()].copy_from_slice(&t.ids);
            mask[i * s..i * s + t.ids.len()].fill(1);
        }
        let mut feed: Vec<(String, SessionInputValue<'_>)> = Vec::new();
        for name in &self.inputs {
            let data = match name.as_str() {
                "input_ids" => ids.clone(),
                "attention_mask" => mask.clone(),
                "token_type_ids" => vec![0i64; b * s],
                other => {
                    return Err(InferenceError::Model { model: super::TEXT_EMBED.into(), message: format!("unknown input {other}") });
                }
            };
            feed.push((name.clone(), Tensor::from_array(([b, s], data))?.into()));
        }
        let out = self.session.run(feed)?;
        let (shape, data) = out[self.output.as_str()].try_extract_tensor::<f32>()?;
        let bad = |m: String| InferenceError::Model { model: super::TEXT_EMBED.into(), message: m };
        let (seq, dim, pooling) = match shape.as_ref() {
            [bb, t, d] if *bb as usize == b => (*t as usize, *d as usize, self.pooling),
            // Already one vector per text.
            [bb, d] if *bb as usize == b => (1, *d as usize, Pooling::Output),
            other => return Err(bad(format!("output shape {other:?}"))),
        };
        if dim != self.dim {
            return Err(bad(format!("embedding has {dim} dimensions, index.embed_dim is {}", self.dim)));
        }
        let vectors = (0..b)
            .map(|i| {
                let rows = &data[i * seq * dim..(i + 1) * seq * dim];
                let mut v = vec![0f32; dim];
                match pooling {
                    Pooling::Cls | Pooling::Output => v.copy_from_slice(&rows[..dim]),
                    Pooling::Mean => {
                        let m = &mask[i * s..i * s + seq.min(s)];
                        let n = m.iter().filter(|&&x| x == 1).count().max(1) as f32;
                        for (pos, _) in m.iter().enumerate().filter(|(_, x)| **x == 1) {
                            for (acc, x) in v.iter_mut().zip(&rows[pos * dim..(pos + 1) * dim]) {
                                *acc += x;
                            }
                        }
                        v.iter_mut().for_each(|x| *x /= n);
                    }
                }
                l2_normalise(&mut v);
                v
            })
            .collect();
        Ok(vectors)
    }
}

/// The embedder the pipeline uses: tokenizer plus the model's owner thread.
#[derive(Clone)]
pub struct TextEmbedder {
    tokenizer: Arc<Tokenizer>,
    handle: ModelHandle<EmbedRunner>,
}

impl TextEmbedder {
    /// Loads `tokenizer.json` with truncation at `max_len` tokens.
    ///
    /// # Errors
    /// The tokenizer cannot be read.
    pub fn new(tokenizer: &Path, max_len: usize, handle: ModelHandle<EmbedRunner>) -> Result<Self, InferenceError> {
        let bad = |m: String| InferenceError::Model { model: tokenizer.display().to_string(), message: m };
        let mut tok = Tokenizer::from_file(tokenizer).map_err(|e| bad(e.to_string()))?;
        tok.with_truncation(Some(TruncationParams { max_length: max_len.max(2), ..TruncationParams::default() }))
            .map_err(|e| bad(e.to_string()))?;
        tok.with_padding(None);
        Ok(Self { tokenizer: Arc::new(tok), handle })
    }

    pub fn handle(&self) -> &ModelHandle<EmbedRunner> {
        &self.handle
    }

    /// Tokenises `texts` on a blocking thread.
    ///
    /// # Errors
    /// The tokenizer failed.
    pub async fn encode(&self, texts: Vec<String>) -> Result<Vec<Encoded>, InferenceError> {
        let tok = self.tokenizer.clone();
        tokio::task::spawn_blocking(move || {
            tok.encode_batch(texts, true)
                .map(|encs| encs.iter().map(|e| Encoded { ids: e.get_ids().iter().map(|&i| i64::from(i)).collect() }).collect())
                .map_err(|e| InferenceError::Model { model: "tokenizer".into(), message: e.to_string() })
        })
        .await
        .map_err(|e| InferenceError::Model { model: "tokenizer".into(), message: e.to_string() })?
    }

    /// Embeds `texts`; they share batches with every other concurrent request.
    ///
    /// # Errors
    /// Tokenisation or inference failed.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, InferenceError> {
        let encoded = self.encode(texts).await?;
        self.handle.infer_all(encoded).await
    }
}
