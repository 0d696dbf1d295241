//! Whisper from a CTranslate2 `model.bin` into the three ONNX graphs the worker loads, laid out like a
//! Hugging Face Optimum export (names and shapes as the offline bundle's `whisper_onnx.py` writes them;
//! this is a port of it).
//!
//! The port keeps the Python script's call order exactly: node and initializer names come from one
//! counter, so the order in which constants and ops are created is part of the output bytes. Where a
//! Python expression nests calls, the Rust code evaluates them in Python's order (arguments left to
//! right, inner calls first) — hence the many `let`s.

use std::ops::Range;

use super::ConvertError;
use super::ct2::Ct2Model;
use super::graph::{Builder, int, ints};
use crate::onnx::{Attr, DataType, Dim, Model, Tensor, TensorData, ValueInfo};

/// Whisper's dimensions, read from the model's variables.
#[derive(Debug, Clone)]
pub(crate) struct Dims {
    /// Model width (`n_audio_state` = `n_text_state`).
    pub d: usize,
    pub vocab: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub n_enc: usize,
    pub n_dec: usize,
    pub n_audio_ctx: usize,
    pub n_text_ctx: usize,
    pub n_mels: usize,
}

/// The converter: the model and its dimensions.
pub(crate) struct Whisper<'a> {
    m: &'a Ct2Model,
    pub dims: Dims,
}

fn layer_count(m: &Ct2Model, prefix: &str) -> usize {
    let mut layers: Vec<&str> = m
        .names()
        .filter_map(|n| n.strip_prefix(prefix))
        .filter_map(|rest| rest.strip_prefix("layer_"))
        .filter_map(|rest| rest.split_once('/'))
        .map(|(idx, _)| idx)
        .filter(|idx| !idx.is_empty() && idx.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    layers.sort_unstable();
    layers.dedup();
    layers.len()
}

impl<'a> Whisper<'a> {
    /// Checks that `m` is a Whisper model and reads its dimensions.
    ///
    /// # Errors
    /// The spec is not `WhisperSpec`, or a variable the graphs need is missing or inconsistent.
    pub fn new(m: &'a Ct2Model) -> Result<Self, ConvertError> {
        if m.spec != "WhisperSpec" {
            return Err(ConvertError::format(m.path(), format!("a CTranslate2 {:?} model, not a WhisperSpec (Whisper) one", m.spec)));
        }
        let bad = |reason: String| ConvertError::format(m.path(), reason);
        let emb = m.dims("decoder/embeddings/weight")?;
        let (vocab, d) = match emb {
            [v, d] => (*v, *d),
            other => return Err(bad(format!("decoder/embeddings/weight has dims {other:?}"))),
        };
        let heads = m.int("encoder/num_heads")?;
        let dec_heads = m.int("decoder/num_heads")?;
        if heads != dec_heads || heads <= 0 || d / heads as usize * heads as usize != d {
            return Err(bad(format!("encoder heads {heads}, decoder heads {dec_heads}, width {d}")));
        }
        let heads = heads as usize;
        let first = |name: &str| -> Result<usize, ConvertError> {
            m.dims(name)?.first().copied().ok_or_else(|| bad(format!("{name} is a scalar")))
        };
        let n_mels = *m.dims("encoder/conv1/weight")?.get(1).ok_or_else(|| bad("encoder/conv1/weight rank < 2".into()))?;
        let dims = Dims {
            d,
            vocab,
            heads,
            head_dim: d / heads,
            n_enc: layer_count(m, "encoder/"),
            n_dec: layer_count(m, "decoder/"),
            n_audio_ctx: first("encoder/position_encodings/encodings")?,
            n_text_ctx: first("decoder/position_encodings/encodings")?,
            n_mels,
        };
        if dims.n_enc == 0 || dims.n_dec == 0 {
            return Err(bad(format!("{} encoder and {} decoder layers", dims.n_enc, dims.n_dec)));
        }
        Ok(Self { m, dims })
    }

    /// A float variable as f32.
    fn w(&self, name: &str) -> Result<Vec<f32>, ConvertError> {
        self.m.f32s(name)
    }

    fn w_dims(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ConvertError> {
        Ok((self.m.dims(name)?.to_vec(), self.w(name)?))
    }

    /// A variable as a constant, unchanged (`g.const(W(name))`); f16 variables are copied as they are.
    fn var_const(&self, g: &mut Builder, name: &str) -> Result<String, ConvertError> {
        let dims = self.m.dims(name)?.to_vec();
        Ok(match self.m.f16_bytes(name) {
            Some(bytes) => g.const_f16_bytes(&dims, bytes),
            None => g.const_f32(&dims, &self.w(name)?),
        })
    }

    // building blocks ----------------------------------------------------------------------------

    fn ln(&self, g: &mut Builder, x: &str, p: &str) -> Result<String, ConvertError> {
        let gamma = self.var_const(g, &format!("{p}/gamma"))?;
        let beta = self.var_const(g, &format!("{p}/beta"))?;
        Ok(g.op("LayerNormalization", &[x, &gamma, &beta], vec![("axis", int(-1)), ("epsilon", Attr::Float(1e-5))]))
    }

    /// `x @ W[rows].T + b[rows]` for the linear layer at `p` (CTranslate2 stores `W` as [out, in]).
    fn lin(&self, g: &mut Builder, x: &str, p: &str, rows: Option<Range<usize>>) -> Result<String, ConvertError> {
        let wname = format!("{p}/weight");
        let (out_in, w) = self.w_dims(&wname)?;
        let [out, inp] = out_in[..] else {
            return Err(ConvertError::format(self.m.path(), format!("{wname} has dims {out_in:?}")));
        };
        let bname = format!("{p}/bias");
        let b = if self.m.has(&bname) { self.w(&bname)? } else { vec![0.0; out] };
        if b.len() != out {
            return Err(ConvertError::format(self.m.path(), format!("{bname} has {} values for {out} rows", b.len())));
        }
        let rows = rows.unwrap_or(0..out);
        if rows.end > out {
            return Err(ConvertError::format(self.m.path(), format!("{wname} has {out} rows, needs {}", rows.end)));
        }
        let n = rows.len();
        // W[rows].T, contiguous: [inp, n]
        let mut wt = vec![0f32; inp * n];
        for (j, r) in rows.clone().enumerate() {
            let row = &w[r * inp..(r + 1) * inp];
            for (i, v) in row.iter().enumerate() {
                wt[i * n + j] = *v;
            }
        }
        drop(w);
        let wc = g.const_f32(&[inp, n], &wt);
        drop(wt);
        let mm = g.op("MatMul", &[x, &wc], vec![]);
        let bc = g.const_f32(&[n], &b[rows]);
        Ok(g.op("Add", &[&mm, &bc], vec![]))
    }

    /// [B,T,d] -> [B,H,T,hd]; the transpose's output is `out` when given.
    fn split_heads(&self, g: &mut Builder, x: &str, out: Option<&str>) -> String {
        let shape = g.i64s(&[0, -1, self.dims.heads as i64, self.dims.head_dim as i64]);
        let r = g.op("Reshape", &[x, &shape], vec![]);
        let perm = vec![("perm", ints(&[0, 2, 1, 3]))];
        match out {
            Some(out) => g.op_to("Transpose", &[&r], out, perm),
            None => g.op("Transpose", &[&r], perm),
        }
    }

    /// Scaled dot-product attention over heads; q, k, v: [B,H,*,hd] -> [B,T,d].
    fn attend(&self, g: &mut Builder, q: &str, k: &str, v: &str, mask: Option<&str>) -> String {
        let kt = g.op("Transpose", &[k], vec![("perm", ints(&[0, 1, 3, 2]))]);
        let s = g.op("MatMul", &[q, &kt], vec![]);
        let scale = g.scalar_f32((1.0 / (self.dims.head_dim as f64).sqrt()) as f32);
        let mut s = g.op("Mul", &[&s, &scale], vec![]);
        if let Some(mask) = mask {
            s = g.op("Add", &[&s, mask], vec![]);
        }
        let p = g.op("Softmax", &[&s], vec![("axis", int(-1))]);
        let o = g.op("MatMul", &[&p, v], vec![]);
        let t = g.op("Transpose", &[&o], vec![("perm", ints(&[0, 2, 1, 3]))]);
        let shape = g.i64s(&[0, -1, self.dims.d as i64]);
        g.op("Reshape", &[&t, &shape], vec![])
    }

    fn sl(&self, a: usize, b: usize) -> Option<Range<usize>> {
        Some(a * self.dims.d..b * self.dims.d)
    }

    /// `x + ffn(ln(x))` for the block at `p`.
    fn ffn(&self, g: &mut Builder, x: &str, p: &str) -> Result<String, ConvertError> {
        let y = self.ln(g, x, &format!("{p}/ffn/layer_norm"))?;
        let h = self.lin(g, &y, &format!("{p}/ffn/linear_0"), None)?;
        let h = g.gelu(&h);
        let o = self.lin(g, &h, &format!("{p}/ffn/linear_1"), None)?;
        Ok(g.op("Add", &[x, &o], vec![]))
    }

    // encoder ------------------------------------------------------------------------------------

    /// `encoder_model.onnx`.
    ///
    /// # Errors
    /// A variable is missing or malformed.
    pub fn encoder(&self) -> Result<Model, ConvertError> {
        let mut builder = Builder::new(true);
        let g = &mut builder;
        let dm = self.dims.clone();
        let conv = |g: &mut Builder, x: &str, n: u32, stride: i64| -> Result<String, ConvertError> {
            let w = self.var_const(g, &format!("encoder/conv{n}/weight"))?;
            let b = self.var_const(g, &format!("encoder/conv{n}/bias"))?;
            Ok(g.op("Conv", &[x, &w, &b], vec![("pads", ints(&[1, 1])), ("strides", ints(&[stride])), ("kernel_shape", ints(&[3]))]))
        };
        let x = conv(g, "input_features", 1, 1)?;
        let x = g.gelu(&x);
        let x = conv(g, &x, 2, 2)?;
        let x = g.gelu(&x);
        let x = g.op("Transpose", &[&x], vec![("perm", ints(&[0, 2, 1]))]);
        let pos = self.var_const(g, "encoder/position_encodings/encodings")?;
        let mut x = g.op("Add", &[&x, &pos], vec![]);
        for i in 0..dm.n_enc {
            let p = format!("encoder/layer_{i}");
            let y = self.ln(g, &x, &format!("{p}/self_attention/layer_norm"))?;
            let qkv = format!("{p}/self_attention/linear_0");
            let mut heads = Vec::with_capacity(3);
            for j in 0..3 {
                let l = self.lin(g, &y, &qkv, self.sl(j, j + 1))?;
                heads.push(self.split_heads(g, &l, None));
            }
            let a = self.attend(g, &heads[0], &heads[1], &heads[2], None);
            let o = self.lin(g, &a, &format!("{p}/self_attention/linear_1"), None)?;
            x = g.op("Add", &[&x, &o], vec![]);
            x = self.ffn(g, &x, &p)?;
        }
        let x = self.ln(g, &x, "encoder/layer_norm")?;
        g.op_to("Identity", &[&x], "last_hidden_state", vec![]);
        let b = || Dim::from("batch_size");
        let f32_info = |name: &str, dims: Vec<Dim>| ValueInfo::new(name, DataType::Float, dims);
        let model = builder.model(
            "whisper_encoder",
            vec![f32_info("input_features", vec![b(), Dim::Value(dm.n_mels as i64), Dim::Value(2 * dm.n_audio_ctx as i64)])],
            vec![f32_info("last_hidden_state", vec![b(), Dim::Value(dm.n_audio_ctx as i64), Dim::Value(dm.d as i64)])],
        );
        Ok(model)
    }

    // decoders -----------------------------------------------------------------------------------

    /// `decoder_model.onnx` (`with_past` false: first step, no cache in, full cache out) or
    /// `decoder_with_past_model.onnx` (`with_past` true: every later step).
    ///
    /// # Errors
    /// A variable is missing or malformed.
    pub fn decoder(&self, with_past: bool) -> Result<Model, ConvertError> {
        let mut builder = Builder::new(true);
        let g = &mut builder;
        let dm = self.dims.clone();
        let emb = self.var_const(g, "decoder/embeddings/weight")?;
        let shape = g.op("Shape", &["input_ids"], vec![]);
        let one = g.scalar_i64(1);
        let gathered = g.op("Gather", &[&shape, &one], vec![]);
        let zero = g.i64s(&[0]);
        let t = g.op("Unsqueeze", &[&gathered, &zero], vec![]); // [1]
        let p = if with_past {
            let shape = g.op("Shape", &["past_key_values.0.decoder.key"], vec![]);
            let two = g.scalar_i64(2);
            let gathered = g.op("Gather", &[&shape, &two], vec![]);
            let zero = g.i64s(&[0]);
            g.op("Unsqueeze", &[&gathered, &zero], vec![]) // [1] past length
        } else {
            g.i64s(&[0])
        };
        let pt = g.op("Add", &[&p, &t], vec![]);
        let pe = self.var_const(g, "decoder/position_encodings/encodings")?;
        let axis0 = g.i64s(&[0]);
        let pos = g.op("Slice", &[&pe, &p, &pt, &axis0], vec![]);
        let tok = g.op("Gather", &[&emb, "input_ids"], vec![("axis", int(0))]);
        let mut x = g.op("Add", &[&tok, &pos], vec![]);
        // causal mask [T, P+T]: query i (absolute position P+i) may see keys j <= P+i
        let shape = g.op("Concat", &[&t, &pt], vec![("axis", int(0))]);
        let one_tensor = Tensor { name: "one".into(), dims: vec![1], data_type: DataType::Float, data: TensorData::Floats(vec![1.0]) };
        let ones = g.op("ConstantOfShape", &[&shape], vec![("value", Attr::Tensor(one_tensor))]);
        let c1 = g.i64s(&[1]);
        let p1 = g.op("Add", &[&p, &c1], vec![]);
        let c0 = g.i64s(&[0]);
        let k_diag = g.op("Squeeze", &[&p1, &c0], vec![]);
        let tri = g.op("Trilu", &[&ones, &k_diag], vec![("upper", int(1))]);
        let neg = g.scalar_f32(-1e9);
        let mask = g.op("Mul", &[&tri, &neg], vec![]);

        let mut present = Vec::new();
        for i in 0..dm.n_dec {
            let lp = format!("decoder/layer_{i}");
            // self-attention with cache
            let y = self.ln(g, &x, &format!("{lp}/self_attention/layer_norm"))?;
            let qkv = format!("{lp}/self_attention/linear_0");
            let q = self.lin(g, &y, &qkv, self.sl(0, 1))?;
            let q = self.split_heads(g, &q, None);
            let pk_out = format!("present.{i}.decoder.key");
            let pv_out = format!("present.{i}.decoder.value");
            let (k, v) = if with_past {
                let k_new = self.lin(g, &y, &qkv, self.sl(1, 2))?;
                let k_new = self.split_heads(g, &k_new, None);
                let v_new = self.lin(g, &y, &qkv, self.sl(2, 3))?;
                let v_new = self.split_heads(g, &v_new, None);
                let k = g.op_to("Concat", &[&format!("past_key_values.{i}.decoder.key"), &k_new], &pk_out, vec![("axis", int(2))]);
                let v = g.op_to("Concat", &[&format!("past_key_values.{i}.decoder.value"), &v_new], &pv_out, vec![("axis", int(2))]);
                (k, v)
            } else {
                let k = self.lin(g, &y, &qkv, self.sl(1, 2))?;
                let k = self.split_heads(g, &k, Some(&pk_out));
                let v = self.lin(g, &y, &qkv, self.sl(2, 3))?;
                let v = self.split_heads(g, &v, Some(&pv_out));
                (k, v)
            };
            present.push(pk_out);
            present.push(pv_out);
            let a = self.attend(g, &q, &k, &v, Some(&mask));
            let o = self.lin(g, &a, &format!("{lp}/self_attention/linear_1"), None)?;
            x = g.op("Add", &[&x, &o], vec![]);
            // cross-attention
            let y = self.ln(g, &x, &format!("{lp}/attention/layer_norm"))?;
            let q = self.lin(g, &y, &format!("{lp}/attention/linear_0"), None)?;
            let q = self.split_heads(g, &q, None);
            let (k, v) = if with_past {
                (format!("past_key_values.{i}.encoder.key"), format!("past_key_values.{i}.encoder.value"))
            } else {
                let kv = format!("{lp}/attention/linear_1");
                let k = self.lin(g, "encoder_hidden_states", &kv, self.sl(0, 1))?;
                let k = self.split_heads(g, &k, Some(&format!("present.{i}.encoder.key")));
                let v = self.lin(g, "encoder_hidden_states", &kv, self.sl(1, 2))?;
                let v = self.split_heads(g, &v, Some(&format!("present.{i}.encoder.value")));
                present.push(k.clone());
                present.push(v.clone());
                (k, v)
            };
            let a = self.attend(g, &q, &k, &v, None);
            let o = self.lin(g, &a, &format!("{lp}/attention/linear_2"), None)?;
            x = g.op("Add", &[&x, &o], vec![]);
            x = self.ffn(g, &x, &lp)?;
        }
        let x = self.ln(g, &x, "decoder/layer_norm")?;
        let et = g.op("Transpose", &[&emb], vec![("perm", ints(&[1, 0]))]);
        g.op_to("MatMul", &[&x, &et], "logits", vec![]);

        let f32_info = |name: &str, dims: Vec<Dim>| ValueInfo::new(name, DataType::Float, dims);
        let h = || Dim::Value(dm.heads as i64);
        let hd = || Dim::Value(dm.head_dim as i64);
        let b = || Dim::from("batch_size");
        let t_name = "decoder_sequence_length";
        let mut inputs = vec![ValueInfo::new("input_ids", DataType::Int64, vec![b(), t_name.into()])];
        let self_len = if with_past {
            for i in 0..dm.n_dec {
                for kind in ["key", "value"] {
                    inputs.push(f32_info(
                        &format!("past_key_values.{i}.decoder.{kind}"),
                        vec![b(), h(), "past_decoder_sequence_length".into(), hd()],
                    ));
                }
                for kind in ["key", "value"] {
                    inputs.push(f32_info(
                        &format!("past_key_values.{i}.encoder.{kind}"),
                        vec![b(), h(), "encoder_sequence_length".into(), hd()],
                    ));
                }
            }
            "past_decoder_sequence_length + 1"
        } else {
            inputs.push(f32_info("encoder_hidden_states", vec![b(), "encoder_sequence_length".into(), Dim::Value(dm.d as i64)]));
            t_name
        };
        let mut outputs = vec![f32_info("logits", vec![b(), t_name.into(), Dim::Value(dm.vocab as i64)])];
        for n in &present {
            let seq = if n.contains(".encoder.") { "encoder_sequence_length" } else { self_len };
            outputs.push(f32_info(n, vec![b(), h(), seq.into(), hd()]));
        }
        let name = if with_past { "whisper_decoder_with_past" } else { "whisper_decoder" };
        Ok(builder.model(name, inputs, outputs))
    }
}
