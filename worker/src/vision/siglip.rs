//! SigLIP (or any CLIP-style two-tower export): the image tower behind a batching owner thread, the text
//! tower and its tokenizer.
//!
//! Names are read from the sessions, not hard-coded, so that a real `google/siglip-base-patch16-224` or a
//! CLIP export drops into the configured folder: the image input is the model's first input, the output
//! is `vision.embed_output` (falling back to `pooler_output`, which some exports return alone); the
//! text input is `input_ids` (plus `attention_mask` when the model asks for it). Embeddings are
//! L2-normalised here whatever the model did, and their dimension is checked against `vision.embed_dim`.

use std::path::Path;

use ort::session::Session;
use ort::value::TensorRef;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::preprocess::siglip_chw;
use crate::engine::{BatchRunner, InferenceError, l2_normalise};

/// File names inside `vision.embed_dir`.
pub const VISION_FILE: &str = "vision_model.onnx";
pub const TEXT_FILE: &str = "text_model.onnx";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The image tower's output after its encoder and before its pooling head: what the int8 rewrite is
/// scoped to (`vision.embed_int8`).
pub const ENCODER_OUTPUT: &str = "last_hidden_state";

/// Picks `wanted` among the session's outputs, else the first of `fallbacks` present.
///
/// # Errors
/// None of them is an output of the model.
pub fn pick_output(session: &Session, model: &str, wanted: &str, fallbacks: &[&str]) -> Result<String, InferenceError> {
    let names: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
    std::iter::once(wanted).chain(fallbacks.iter().copied()).find(|n| names.contains(n)).map(str::to_string).ok_or_else(|| {
        InferenceError::Model {
            model: model.into(),
            message: format!("has no output {wanted:?} (outputs: {names:?}); set vision.embed_output"),
        }
    })
}

/// Splits a `[n, dim]` output into `n` unit vectors, checking `dim`.
fn rows(model: &str, shape: &[i64], data: &[f32], n: usize, dim: usize) -> Result<Vec<Vec<f32>>, InferenceError> {
    if shape.len() != 2 || shape[0] as usize != n || shape[1] as usize != dim {
        return Err(InferenceError::Model {
            model: model.into(),
            message: format!("embedding output has shape {shape:?}, expected [{n}, {dim}] (vision.embed_dim)"),
        });
    }
    Ok(data
        .chunks_exact(dim)
        .map(|row| {
            let mut v = row.to_vec();
            l2_normalise(&mut v);
            v
        })
        .collect())
}

/// The image tower: takes 8-bit `size`×`size` rgb24 images, returns unit embeddings.
pub struct ImageRunner {
    session: Session,
    name: String,
    input: String,
    output: String,
    size: u32,
    mean: [f32; 3],
    std: [f32; 3],
    dim: usize,
    /// The batch tensor, reused across runs (grows to `max_batch` once).
    buffer: Vec<f32>,
}

impl ImageRunner {
    /// Wraps a loaded image-tower session.
    ///
    /// # Errors
    /// The model has no input, or none of the expected outputs.
    pub fn new(session: Session, name: &str, settings: &heimdex_shared::config::VisionSettings) -> Result<Self, InferenceError> {
        let input = session
            .inputs()
            .first()
            .map(|i| i.name().to_string())
            .ok_or_else(|| InferenceError::Model { model: name.into(), message: "has no inputs".into() })?;
        let output = pick_output(&session, name, &settings.embed_output, &["image_embeds", "pooler_output"])?;
        Ok(Self {
            session,
            name: name.into(),
            input,
            output,
            size: settings.embed_image_size,
            mean: settings.embed_mean,
            std: settings.embed_std,
            dim: settings.embed_dim,
            buffer: Vec::new(),
        })
    }

    /// Fills `out` (`3·size·size` f32) with exactly what this runner feeds the model for `pixels`.
    pub fn tensor_of(pixels: &[u8], mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
        siglip_chw(pixels, mean, std, out);
    }
}

impl BatchRunner for ImageRunner {
    type Input = Vec<u8>;
    type Output = Vec<f32>;

    fn run(&mut self, inputs: Vec<Vec<u8>>) -> Result<Vec<Vec<f32>>, InferenceError> {
        let n = inputs.len();
        let side = self.size as usize;
        let per = 3 * side * side;
        self.buffer.resize(n * per, 0.0);
        for (pixels, out) in inputs.iter().zip(self.buffer.chunks_exact_mut(per)) {
            if pixels.len() != per {
                return Err(InferenceError::Model {
                    model: self.name.clone(),
                    message: format!("input has {} bytes, expected {per}", pixels.len()),
                });
            }
            Self::tensor_of(pixels, self.mean, self.std, out);
        }
        let tensor = TensorRef::from_array_view(([n, 3, side, side], &self.buffer[..n * per]))?;
        let outputs = self.session.run(ort::inputs![self.input.as_str() => tensor])?;
        let (shape, data) = outputs[self.output.as_str()].try_extract_tensor::<f32>()?;
        rows(&self.name, shape, data, n, self.dim)
    }
}

/// The text tower: takes token ids padded to the fixed length, returns unit embeddings.
pub struct TextRunner {
    session: Session,
    name: String,
    output: String,
    wants_mask: bool,
    pad_id: i64,
    len: usize,
    dim: usize,
}

impl TextRunner {
    /// Wraps a loaded text-tower session.
    ///
    /// # Errors
    /// The model has no `input_ids` input or no embedding output.
    pub fn new(session: Session, name: &str, pad_id: u32, len: usize, dim: usize) -> Result<Self, InferenceError> {
        let inputs: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        if !inputs.contains(&"input_ids") {
            return Err(InferenceError::Model { model: name.into(), message: format!("has no input_ids input ({inputs:?})") });
        }
        let wants_mask = inputs.contains(&"attention_mask");
        let output = pick_output(&session, name, "text_embeds", &["pooler_output"])?;
        Ok(Self { session, name: name.into(), output, wants_mask, pad_id: i64::from(pad_id), len, dim })
    }
}

impl BatchRunner for TextRunner {
    type Input = Vec<i64>;
    type Output = Vec<f32>;

    fn run(&mut self, inputs: Vec<Vec<i64>>) -> Result<Vec<Vec<f32>>, InferenceError> {
        let n = inputs.len();
        let ids: Vec<i64> = inputs.iter().flat_map(|v| v.iter().copied().chain(std::iter::repeat(self.pad_id)).take(self.len)).collect();
        let ids_tensor = TensorRef::from_array_view(([n, self.len], ids.as_slice()))?;
        let outputs = if self.wants_mask {
            let mask: Vec<i64> = ids.iter().map(|&t| i64::from(t != self.pad_id)).collect();
            let mask_tensor = TensorRef::from_array_view(([n, self.len], mask.as_slice()))?;
            self.session.run(ort::inputs!["input_ids" => ids_tensor, "attention_mask" => mask_tensor])?
        } else {
            self.session.run(ort::inputs!["input_ids" => ids_tensor])?
        };
        let (shape, data) = outputs[self.output.as_str()].try_extract_tensor::<f32>()?;
        rows(&self.name, shape, data, n, self.dim)
    }
}

/// Loads `tokenizer.json` set to truncate and pad to exactly `len` tokens; returns it with its pad id.
///
/// The pad id is the file's own padding id, else the id of `<pad>` or `[PAD]`, else 0; real SigLIP
/// tokenizers carry no padding settings, so padding is always set here explicitly.
///
/// # Errors
/// The file cannot be read or parsed, or the truncation settings are rejected.
pub fn load_tokenizer(path: &Path, len: usize) -> Result<(Tokenizer, u32), InferenceError> {
    let err = |message: String| InferenceError::Model { model: path.display().to_string(), message };
    let mut tokenizer = Tokenizer::from_file(path).map_err(|e| err(e.to_string()))?;
    let (pad_id, pad_token) = match tokenizer.get_padding() {
        Some(p) => (p.pad_id, p.pad_token.clone()),
        None => ["<pad>", "[PAD]"]
            .iter()
            .find_map(|t| tokenizer.token_to_id(t).map(|id| (id, (*t).to_string())))
            .unwrap_or((0, "<pad>".to_string())),
    };
    tokenizer.with_padding(Some(PaddingParams { strategy: PaddingStrategy::Fixed(len), pad_id, pad_token, ..PaddingParams::default() }));
    tokenizer.with_truncation(Some(TruncationParams { max_length: len, ..TruncationParams::default() })).map_err(|e| err(e.to_string()))?;
    Ok((tokenizer, pad_id))
}

/// Token ids of `text`, exactly `len` long.
///
/// # Errors
/// The tokenizer failed on the text.
pub fn tokenize(tokenizer: &Tokenizer, text: &str, len: usize, pad_id: u32) -> Result<Vec<i64>, InferenceError> {
    let encoding = tokenizer.encode(text, true).map_err(|e| InferenceError::Model { model: "tokenizer".into(), message: e.to_string() })?;
    let mut ids: Vec<i64> = encoding.get_ids().iter().map(|&i| i64::from(i)).take(len).collect();
    ids.resize(len, i64::from(pad_id));
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_gives_unit_length() {
        let mut v = vec![3.0, 4.0];
        l2_normalise(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        let mut z = vec![0.0, 0.0];
        l2_normalise(&mut z);
        assert_eq!(z, vec![0.0, 0.0]);
    }
}
