//! A BERT encoder (all-MiniLM-L6-v2) as an fp32 ONNX graph, built from Hugging Face `model.safetensors`
//! and `config.json`.
//!
//! The graph is the textbook post-norm BERT: word + position + token-type embeddings, LayerNorm, then
//! per layer multi-head self-attention (padding keys masked with the lowest f32, so they get exactly
//! zero weight) and an erf-GELU feed-forward block, each with a residual and LayerNorm. Its inputs and
//! output are those of the bundle's `minilm-l6-v2/model_fp32.onnx` (a torch export): `input_ids`,
//! `attention_mask`, `token_type_ids` (i64 [batch, sequence]) -> `last_hidden_state`. It is smaller
//! than the torch export (no shape arithmetic for the mask) but computes the same function.
//!
//! safetensors is read by hand (an 8-byte little-endian header length, a JSON header of name ->
//! dtype, shape and byte range, then the data), which is all this needs.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::ConvertError;
use super::graph::{Builder, int, ints};
use crate::onnx::{Attr, DataType, Dim, Model, ValueInfo};

/// The config fields the graph needs.
#[derive(Debug, Clone)]
pub struct BertConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub layer_norm_eps: f64,
    pub vocab: usize,
    pub max_positions: usize,
    pub type_vocab: usize,
}

impl BertConfig {
    /// Reads a Hugging Face BERT `config.json`.
    ///
    /// # Errors
    /// The file cannot be read, is not JSON, is not a BERT config, or uses an activation or position
    /// embedding this converter does not build.
    pub fn read(path: &Path) -> Result<Self, ConvertError> {
        let v = super::read_json(path)?;
        let bad = |reason: String| ConvertError::format(path, reason);
        let uint = |key: &str| {
            v.get(key)
                .and_then(Value::as_u64)
                .filter(|n| *n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| bad(format!("{key} is missing or not a positive integer")))
        };
        let text = |key: &str, default: &str| v.get(key).and_then(Value::as_str).unwrap_or(default).to_string();
        if text("model_type", "") != "bert" {
            return Err(bad(format!("model_type {:?}, expected \"bert\"", text("model_type", ""))));
        }
        if text("hidden_act", "gelu") != "gelu" {
            return Err(bad(format!("hidden_act {:?}: only the erf \"gelu\" is supported", text("hidden_act", ""))));
        }
        if text("position_embedding_type", "absolute") != "absolute" {
            return Err(bad("only absolute position embeddings are supported".into()));
        }
        let c = Self {
            hidden: uint("hidden_size")?,
            layers: uint("num_hidden_layers")?,
            heads: uint("num_attention_heads")?,
            intermediate: uint("intermediate_size")?,
            layer_norm_eps: v.get("layer_norm_eps").and_then(Value::as_f64).unwrap_or(1e-12),
            vocab: uint("vocab_size")?,
            max_positions: uint("max_position_embeddings")?,
            type_vocab: uint("type_vocab_size")?,
        };
        if c.hidden / c.heads * c.heads != c.hidden {
            return Err(bad(format!("hidden_size {} is not a multiple of {} heads", c.hidden, c.heads)));
        }
        Ok(c)
    }
}

/// A `model.safetensors` file in memory, indexed by tensor name.
#[derive(Debug)]
pub struct SafeTensors {
    path: PathBuf,
    data: Vec<u8>,
    /// name -> (dtype, shape, byte range in `data`)
    tensors: BTreeMap<String, (String, Vec<usize>, Range<usize>)>,
}

impl SafeTensors {
    /// Reads and indexes `path`.
    ///
    /// # Errors
    /// The file cannot be read or is not a well-formed safetensors file.
    pub fn open(path: &Path) -> Result<Self, ConvertError> {
        let data = std::fs::read(path).map_err(|e| ConvertError::io(path, e))?;
        let bad = |reason: String| ConvertError::format(path, format!("not a safetensors file: {reason}"));
        let len_bytes: [u8; 8] = data.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(|| bad("shorter than 8 bytes".into()))?;
        let n = usize::try_from(u64::from_le_bytes(len_bytes)).map_err(|_| bad("header length overflows".into()))?;
        let header = data.get(8..8usize.saturating_add(n)).ok_or_else(|| bad(format!("header of {n} bytes is truncated")))?;
        let header: BTreeMap<String, Value> =
            serde_json::from_slice(header).map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
        let base = 8 + n;
        let mut tensors = BTreeMap::new();
        for (name, info) in header {
            if name == "__metadata__" {
                continue;
            }
            let dtype = info.get("dtype").and_then(Value::as_str).unwrap_or_default().to_string();
            let shape: Vec<usize> = info
                .get("shape")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_u64).map(|d| d as usize).collect())
                .ok_or_else(|| bad(format!("{name} has no shape")))?;
            let offsets: Vec<usize> = info
                .get("data_offsets")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_u64).map(|d| d as usize).collect())
                .unwrap_or_default();
            let [start, end] = offsets[..] else {
                return Err(bad(format!("{name} has no data_offsets pair")));
            };
            let range = base.saturating_add(start)..base.saturating_add(end);
            if start > end || range.end > data.len() {
                return Err(bad(format!("{name}: bytes {start}..{end} lie outside the file (truncated?)")));
            }
            tensors.insert(name, (dtype, shape, range));
        }
        Ok(Self { path: path.to_path_buf(), data, tensors })
    }

    /// An F32 tensor, checked to have `shape`.
    ///
    /// # Errors
    /// The tensor is missing, not F32, or of another shape.
    pub fn f32s(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ConvertError> {
        let (dtype, have, range) =
            self.tensors.get(name).ok_or_else(|| ConvertError::format(&self.path, format!("tensor {name} is missing")))?;
        if dtype != "F32" || have != shape || range.len() != 4 * shape.iter().product::<usize>() {
            return Err(ConvertError::format(
                &self.path,
                format!("tensor {name} is {dtype} {have:?} ({} bytes), expected F32 {shape:?}", range.len()),
            ));
        }
        Ok(self.data[range.clone()].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

/// The tensor `[rows, cols]` transposed to `[cols, rows]` (torch Linear stores `[out, in]`; the
/// graph multiplies `x @ W.T`).
fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

struct Bert<'a> {
    c: &'a BertConfig,
    w: &'a SafeTensors,
}

impl Bert<'_> {
    fn constant(&self, g: &mut Builder, name: &str, shape: &[usize]) -> Result<String, ConvertError> {
        Ok(g.const_f32(shape, &self.w.f32s(name, shape)?))
    }

    /// `x @ W.T + b` for the torch Linear `p` ([out, in]).
    fn linear(&self, g: &mut Builder, x: &str, p: &str, out: usize, inp: usize) -> Result<String, ConvertError> {
        let w = self.w.f32s(&format!("{p}.weight"), &[out, inp])?;
        let wt = g.const_f32(&[inp, out], &transpose(&w, out, inp));
        let mm = g.op("MatMul", &[x, &wt], vec![]);
        let b = self.constant(g, &format!("{p}.bias"), &[out])?;
        Ok(g.op("Add", &[&mm, &b], vec![]))
    }

    fn layer_norm(&self, g: &mut Builder, x: &str, p: &str) -> Result<String, ConvertError> {
        let h = self.c.hidden;
        let gamma = self.constant(g, &format!("{p}.weight"), &[h])?;
        let beta = self.constant(g, &format!("{p}.bias"), &[h])?;
        Ok(g.op("LayerNormalization", &[x, &gamma, &beta], vec![("axis", int(-1)), ("epsilon", Attr::Float(self.c.layer_norm_eps as f32))]))
    }

    /// [B,S,hidden] -> [B,heads,S,head_dim], transposed with `perm`.
    fn heads(&self, g: &mut Builder, x: &str, perm: &[i64]) -> String {
        let shape = g.i64s(&[0, -1, self.c.heads as i64, (self.c.hidden / self.c.heads) as i64]);
        let r = g.op("Reshape", &[x, &shape], vec![]);
        g.op("Transpose", &[&r], vec![("perm", ints(perm))])
    }

    fn build(&self) -> Result<Model, ConvertError> {
        let c = self.c;
        let (h, hd) = (c.hidden, c.hidden / c.heads);
        let mut builder = Builder::new(false);
        let g = &mut builder;
        // embeddings
        let words = self.constant(g, "embeddings.word_embeddings.weight", &[c.vocab, h])?;
        let x = g.op("Gather", &[&words, "input_ids"], vec![("axis", int(0))]);
        let types = self.constant(g, "embeddings.token_type_embeddings.weight", &[c.type_vocab, h])?;
        let t = g.op("Gather", &[&types, "token_type_ids"], vec![("axis", int(0))]);
        let x = g.op("Add", &[&x, &t], vec![]);
        let positions = self.constant(g, "embeddings.position_embeddings.weight", &[c.max_positions, h])?;
        let seq = g.op("Shape", &["input_ids"], vec![("end", int(2)), ("start", int(1))]); // [S]
        let zero = g.i64s(&[0]);
        let pos = g.op("Slice", &[&positions, &zero, &seq, &zero], vec![]); // [S, h]
        let x = g.op("Add", &[&x, &pos], vec![]);
        let mut x = self.layer_norm(g, &x, "embeddings.LayerNorm")?;
        // additive mask [B,1,1,S]: 0 where attention_mask is 1, the lowest f32 where it is 0
        let m = g.op("Cast", &["attention_mask"], vec![("to", int(DataType::Float as i64))]);
        let axes = g.i64s(&[1, 2]);
        let m = g.op("Unsqueeze", &[&m, &axes], vec![]);
        let one = g.scalar_f32(1.0);
        let inv = g.op("Sub", &[&one, &m], vec![]);
        let lowest = g.scalar_f32(f32::MIN);
        let mask = g.op("Mul", &[&inv, &lowest], vec![]);
        let scale = g.scalar_f32((1.0 / (hd as f64).sqrt()) as f32);

        for i in 0..c.layers {
            let p = format!("encoder.layer.{i}");
            let q = self.linear(g, &x, &format!("{p}.attention.self.query"), h, h)?;
            let q = self.heads(g, &q, &[0, 2, 1, 3]);
            let k = self.linear(g, &x, &format!("{p}.attention.self.key"), h, h)?;
            let kt = self.heads(g, &k, &[0, 2, 3, 1]);
            let v = self.linear(g, &x, &format!("{p}.attention.self.value"), h, h)?;
            let v = self.heads(g, &v, &[0, 2, 1, 3]);
            let s = g.op("MatMul", &[&q, &kt], vec![]);
            let s = g.op("Mul", &[&s, &scale], vec![]);
            let s = g.op("Add", &[&s, &mask], vec![]);
            let a = g.op("Softmax", &[&s], vec![("axis", int(-1))]);
            let o = g.op("MatMul", &[&a, &v], vec![]);
            let o = g.op("Transpose", &[&o], vec![("perm", ints(&[0, 2, 1, 3]))]);
            let shape = g.i64s(&[0, -1, h as i64]);
            let o = g.op("Reshape", &[&o, &shape], vec![]);
            let o = self.linear(g, &o, &format!("{p}.attention.output.dense"), h, h)?;
            let o = g.op("Add", &[&o, &x], vec![]);
            x = self.layer_norm(g, &o, &format!("{p}.attention.output.LayerNorm"))?;
            let f = self.linear(g, &x, &format!("{p}.intermediate.dense"), c.intermediate, h)?;
            let f = g.gelu(&f);
            let f = self.linear(g, &f, &format!("{p}.output.dense"), h, c.intermediate)?;
            let f = g.op("Add", &[&f, &x], vec![]);
            x = self.layer_norm(g, &f, &format!("{p}.output.LayerNorm"))?;
        }
        g.op_to("Identity", &[&x], "last_hidden_state", vec![]);
        let bs = || vec![Dim::from("batch"), Dim::from("sequence")];
        let inputs =
            ["input_ids", "attention_mask", "token_type_ids"].into_iter().map(|n| ValueInfo::new(n, DataType::Int64, bs())).collect();
        let mut out_shape = bs();
        out_shape.push(Dim::Value(h as i64));
        Ok(builder.model("minilm", inputs, vec![ValueInfo::new("last_hidden_state", DataType::Float, out_shape)]))
    }
}

/// The BERT encoder graph for `config` with the weights of `weights`.
///
/// # Errors
/// A tensor the graph needs is missing or of the wrong shape or type.
pub(crate) fn graph(config: &BertConfig, weights: &SafeTensors) -> Result<Model, ConvertError> {
    Bert { c: config, w: weights }.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_truncated_safetensors_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        let header = br#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend(header);
        b.extend([0u8; 8]);
        std::fs::write(&p, &b).unwrap();
        let e = SafeTensors::open(&p).unwrap_err();
        assert!(matches!(e, ConvertError::Format { .. }), "{e:?}");
        assert!(e.to_string().contains("model.safetensors") && e.to_string().contains("truncated"), "{e}");
    }

    #[test]
    fn transpose_swaps_rows_and_columns() {
        assert_eq!(transpose(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3), [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }
}
