//! Int8 weights for an ONNX model, as an in-memory rewrite at load time: every MatMul whose weight is
//! a constant (an initializer, possibly behind a `Cast` from fp16 and a 2-D `Transpose`) is computed
//! in int8, in one of two [`Scheme`]s:
//!
//! - [`Scheme::Blocks`], for a decoder: ONNX Runtime's `com.microsoft` `MatMulNBits` with 8-bit
//!   weights in blocks of [`BLOCK`] along K, one scale per block and output column, at accuracy level
//!   4 (int8 compute, activations quantised per row in blocks of the same length).
//! - [`Scheme::Rows`], for an encoder: weights symmetric int8 per output column, activations
//!   quantised per row (one scale per token, max|x|/127, stored as q + 128; on x86 without VNNI
//!   max|x|/63 and q + 64, see [`Activations`]), multiplied by the standard `MatMulInteger` and
//!   scaled back by row × column: what CTranslate2 does. The row quantisation of one input is
//!   shared by every MatMul that reads it (Q, K and V).
//!
//! Why: on a CPU, Whisper's decoder steps are bound by streaming weights (a handful of rows against
//! 512×512 to 512×51865 matrices); int8 weights are a quarter of the fp32 bytes that ONNX Runtime
//! would otherwise hold and read. Measured on whisper-base (2 threads, 40-token past, 1500 cross keys,
//! Python ORT 1.31.1, medians of alternating runs): a decoder step 1.5× faster at 1 row, 1.7× at 2,
//! 1.6× at 4, 1.35× at 8, with the greedy tokens of all eight bundle clips unchanged. Why not
//! `DynamicQuantizeMatMul` (what `quantize_dynamic` makes): it quantises a run's activations with one
//! scale for the whole tensor, and on the 600 s bench recording the WER rose from 2.56 % to 3.1 %
//! (decoder) and 3.75 % (encoder and decoder); per-row blocks keep the tokens.
//!
//! Why two schemes: an encoder multiplies 1,500 rows a window, where the GEMM's arithmetic, not its
//! weight bytes, is the cost. `MatMulNBits` dequantises per block and was no faster than fp32 there;
//! `MatMulInteger` runs ONNX Runtime's u8×s8 GEMM (VNNI where the CPU has it): Whisper base's encoder
//! 1.34× faster on an AVX-512 VNNI machine, its output rows at cosine 0.996 to fp32's in the mean.
//!
//! How: the same [`crate::onnx`] reader as [`crate::carve`]: nodes and initializers that are not
//! rewritten are copied byte for byte; the nodes and initializers it adds are built with
//! [`crate::onnx::write`]. The `Cast`/`Transpose` nodes and fp16 initializers that only fed
//! rewritten MatMuls are dropped, so ONNX Runtime never folds them to fp32. A `Gather` from a cast fp16
//! table (Whisper's token embedding, which the output projection also reads) gathers the fp16 rows and
//! casts them instead, which is exact and keeps the table at half size. Graphs with subgraphs (If,
//! Loop, Scan) are refused: names used inside them are not tracked.

use std::collections::{HashMap, HashSet};

use crate::onnx::nodes::{GraphError, Node, parse_node};
use crate::onnx::wire::{Field, Fields, Malformed, packed_varints, put_bytes, strings, text};
use crate::onnx::{self, Attr, DataType, OperatorSetId, Tensor, f16_to_f32, graph, model, tensor};

/// How the MatMuls are computed in int8 (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// `MatMulNBits`: int8 weights in blocks of [`BLOCK`]; for few rows against large weights.
    Blocks,
    /// `MatMulInteger`: int8 weights per column, activations per row in `Activations`' range; for
    /// many rows.
    Rows(Activations),
}

/// The range of [`Scheme::Rows`]' activations.
///
/// Why two: ONNX Runtime's u8×s8 GEMM on an x86 CPU without VNNI (AVX2, or AVX-512 before Cascade
/// Lake) multiplies with `vpmaddubsw`, which adds two u8×s8 products into 16 bits with saturation:
/// 255·127·2 = 64,770 does not fit, and results go wrong (an output 4 % of its range off, in the
/// engine's test, on an AVX2 machine). Activations stored as q + 64 in [1, 127] keep every pair
/// within 127·127·2 = 32,258, which fits. Why the activations and not the weights: with the weights
/// in ±63 instead, the 600 s bench recording's WER rose from 2.56 % to 3.30 %; with the activations
/// in ±63 it stayed at 2.56 % (AVX2 machine, one run each). VNNI's `vpdpbusd` adds into 32 bits and
/// takes the full range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activations {
    /// q + 128 in [1, 255]: for CPUs with VNNI, and any CPU that is not x86.
    Int8,
    /// q + 64 in [1, 127]: for x86 CPUs without VNNI.
    Int7,
}

impl Activations {
    /// The range this CPU's u8×s8 GEMM computes exactly.
    #[must_use]
    pub fn for_this_cpu() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512vnni") || std::arch::is_x86_feature_detected!("avxvnni") {
                Self::Int8
            } else {
                Self::Int7
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Self::Int8
        }
    }

    /// The largest level of a row's values, and the zero point that makes them u8.
    fn levels(self) -> (f32, u8) {
        match self {
            Self::Int8 => (127.0, 128),
            Self::Int7 => (63.0, 64),
        }
    }
}

/// Which MatMuls the rewrite may touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Every MatMul with a constant weight.
    All,
    /// Only those the named graph output depends on: for an image tower, its encoder
    /// (`last_hidden_state`), so that the pooling head and projection after it stay fp32.
    Feeding(&'a str),
}

/// Why a model could not be rewritten.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error(transparent)]
    Malformed(#[from] Malformed),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error("the model has no output {0:?} to scope the int8 rewrite to")]
    NoOutput(String),
    #[error("int8 by rows needs opset 13 or later (QuantizeLinear along an axis); the model has opset {0}")]
    Opset(i64),
}

/// What the rewrite did, for the load log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuantizeStats {
    /// MatMuls now computed in int8.
    pub matmuls: usize,
    /// MatMuls left in fp32 (their weight is computed, or stored in a way this rewrite does not read).
    pub skipped: usize,
    /// MatMuls with a constant weight left in fp32 because they are outside the [`Scope`].
    pub outside: usize,
    /// `Gather`s that now read an fp16 table directly.
    pub gathers: usize,
}

pub(crate) const MS_DOMAIN: &str = "com.microsoft";

/// A constant 2-D float matrix read from an fp32 or fp16 initializer.
struct Matrix {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl Matrix {
    /// The matrix as a MatMul weight [k, n] (itself, or its transpose when `transposed`): k, n and
    /// the value at (row along k, column along n).
    fn weight(&self, transposed: bool) -> (usize, usize, impl Fn(usize, usize) -> f32 + '_) {
        let (k, n) = if transposed { (self.cols, self.rows) } else { (self.rows, self.cols) };
        let at = move |r: usize, c: usize| if transposed { self.data[c * self.cols + r] } else { self.data[r * self.cols + c] };
        (k, n, at)
    }
}

/// The 2-D fp32 or fp16 tensor in `bytes`, or `None` for other types, ranks and encodings (external
/// data, unpacked repeated values), which the rewrite leaves alone.
fn read_matrix(bytes: &[u8]) -> Result<Option<Matrix>, QuantizeError> {
    let (mut dims, mut dtype, mut raw, mut floats, mut int32s) = (Vec::new(), None, None, None, None);
    for f in Fields(bytes) {
        match f? {
            (tensor::DIMS, Field::Varint(v), _) => dims.push(v),
            (tensor::DIMS, Field::Bytes(packed), _) => dims.extend(packed_varints(packed)?),
            (tensor::DATA_TYPE, Field::Varint(v), _) => dtype = DataType::from_wire(v),
            (tensor::RAW_DATA, Field::Bytes(b), _) => raw = Some(b),
            (tensor::FLOAT_DATA, Field::Bytes(b), _) => floats = Some(b),
            (tensor::INT32_DATA, Field::Bytes(b), _) => int32s = Some(b),
            (tensor::FLOAT_DATA | tensor::INT32_DATA, _, _) => return Ok(None),
            (tensor::DATA_LOCATION, Field::Varint(1), _) => return Ok(None),
            _ => {}
        }
    }
    let [rows, cols] = dims[..] else { return Ok(None) };
    let (rows, cols) = (rows as usize, cols as usize);
    let n = rows * cols;
    let data: Vec<f32> = match (dtype, raw, floats, int32s) {
        (Some(DataType::Float), Some(b), _, _) | (Some(DataType::Float), None, Some(b), _) if b.len() == 4 * n => {
            b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        }
        (Some(DataType::Float16), Some(b), _, _) if b.len() == 2 * n => {
            b.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect()
        }
        (Some(DataType::Float16), None, _, Some(packed)) => packed_varints(packed)?.into_iter().map(|v| f16_to_f32(v as u16)).collect(),
        _ => return Ok(None),
    };
    if data.len() != n {
        return Err(QuantizeError::Malformed(Malformed("tensor data does not match its dims")));
    }
    Ok(Some(Matrix { rows, cols, data }))
}

/// Rows of the weight (along K) that share one scale. MatMulNBits quantises its activations in blocks
/// of the same length (accuracy level 4), a row at a time, so an outlier in one token's hidden state
/// costs precision only in its own block.
pub const BLOCK: usize = 128;

/// The MatMul weight `b` (`m`, or its transpose when `transposed`), of shape [k, n], in MatMulNBits'
/// layout: for each output column, its k values in blocks of [`BLOCK`], each block symmetric int8
/// (scale max|w|/127) stored as q + 128 (the operator's default zero point for 8 bits), padded with
/// zeros; and the scales, [n × blocks]. Returns (k, n, blocks, data, scales).
fn quantize(m: &Matrix, transposed: bool) -> (usize, usize, usize, Vec<u8>, Vec<f32>) {
    let (k, n, at) = m.weight(transposed);
    let blocks = k.div_ceil(BLOCK);
    let (mut data, mut scales) = (vec![128u8; n * blocks * BLOCK], Vec::with_capacity(n * blocks));
    let mut column = vec![0f32; k];
    for c in 0..n {
        for (r, v) in column.iter_mut().enumerate() {
            *v = at(r, c);
        }
        for (b, chunk) in column.chunks(BLOCK).enumerate() {
            let max = chunk.iter().fold(0f32, |a, v| a.max(v.abs()));
            let scale = if max > 0.0 && max.is_finite() { max / 127.0 } else { 1.0 };
            let out = &mut data[(c * blocks + b) * BLOCK..];
            for (o, v) in out.iter_mut().zip(chunk) {
                *o = ((v / scale).round().clamp(-127.0, 127.0) as i32 + 128) as u8;
            }
            scales.push(scale);
        }
    }
    (k, n, blocks, data, scales)
}

/// The MatMul weight `b` (`m`, or its transpose when `transposed`), of shape [k, n], for
/// `MatMulInteger`: row-major [k × n] symmetric int8, one scale per output column (max|w|/127).
/// Returns (k, n, data, scales).
fn quantize_columns(m: &Matrix, transposed: bool) -> (usize, usize, Vec<u8>, Vec<f32>) {
    let (k, n, at) = m.weight(transposed);
    let scales: Vec<f32> = (0..n)
        .map(|c| {
            let max = (0..k).fold(0f32, |a, r| a.max(at(r, c).abs()));
            if max > 0.0 && max.is_finite() { max / 127.0 } else { 1.0 }
        })
        .collect();
    let mut data = Vec::with_capacity(k * n);
    for r in 0..k {
        for (c, scale) in scales.iter().enumerate() {
            data.push((at(r, c) / scale).round().clamp(-127.0, 127.0) as i8 as u8);
        }
    }
    (k, n, data, scales)
}

/// Constants the [`Scheme::Rows`] nodes share.
struct RowConstants {
    /// u8: the activations' zero point (128, or 64 for [`Activations::Int7`]).
    zero: String,
    /// f32 1/127 (1/63): a row's max|x| to its scale.
    per_level: String,
    /// f32 smallest scale (a row of zeros).
    least: String,
    /// i64 [-1] for `ReduceMax` from opset 18 (an input there, an attribute before).
    axes: Option<String>,
    /// i64 vectors (shapes, slice bounds) by value.
    ints: HashMap<Vec<i64>, String>,
}

/// An input quantised per row, for every MatMul that reads it.
#[derive(Clone)]
struct RowsOf {
    /// u8 [rows, k]: the input as a matrix, q + 128.
    q: String,
    /// f32 [rows, 1]: each row's scale.
    scale: String,
    /// i64: the input's shape but its last dimension, to give a product its shape back.
    prefix: String,
}

impl RowConstants {
    fn new(opset: i64, activations: Activations, taken: &mut HashSet<String>, inits: &mut Vec<Tensor>) -> Self {
        let mut scalar = |name: &str, data_type: DataType, raw: Vec<u8>| {
            let name = fresh(name, "", taken);
            inits.push(Tensor::raw(&name, Vec::new(), data_type, raw));
            name
        };
        let (top, zero) = activations.levels();
        let zero = scalar("int8_rows.zero", DataType::Uint8, vec![zero]);
        let per_level = scalar("int8_rows.per_level", DataType::Float, (1.0f32 / top).to_le_bytes().to_vec());
        let least = scalar("int8_rows.least", DataType::Float, 1e-12f32.to_le_bytes().to_vec());
        let mut c = Self { zero, per_level, least, axes: None, ints: HashMap::new() };
        c.axes = (opset >= 18).then(|| c.ints(&[-1], taken, inits));
        c
    }

    /// The name of an i64 initializer holding `values` (made once).
    fn ints(&mut self, values: &[i64], taken: &mut HashSet<String>, inits: &mut Vec<Tensor>) -> String {
        self.ints
            .entry(values.to_vec())
            .or_insert_with(|| {
                let name = fresh("int8_rows.ints", "", taken);
                let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                inits.push(Tensor::raw(&name, vec![values.len() as i64], DataType::Int64, raw));
                name
            })
            .clone()
    }

    /// Nodes that quantise `x` (last dimension `k`) per row: its rows' scales (max|x|/127 or /63) and
    /// `QuantizeLinear` along the rows of `x` as a [rows, k] matrix, one pass over `x` that rounds,
    /// shifts and saturates (it replaced Div, Round, Add and Cast: SigLIP base 650 → 595 ms a
    /// batch of 4 on AVX2, those four took 90 ms).
    fn quantise(&mut self, x: &str, k: usize, taken: &mut HashSet<String>, inits: &mut Vec<Tensor>) -> (Vec<onnx::Node>, RowsOf) {
        let (flat, column, matrix) =
            (self.ints(&[-1], taken, inits), self.ints(&[-1, 1], taken, inits), self.ints(&[-1, k as i64], taken, inits));
        let (start, end) = (self.ints(&[0], taken, inits), self.ints(&[-1], taken, inits));
        let mut v = |suffix: &str| fresh(x, suffix, taken);
        let (abs, max, scaled, scale) = (v(".abs"), v(".absmax"), v(".scale0"), v(".scale"));
        let (scales, rows, zeros, x2, q) = (v(".scales"), v(".rows"), v(".zeros"), v(".matrix"), v(".u8"));
        let (row_scale, shape, prefix) = (v(".row_scale"), v(".shape"), v(".prefix"));
        let reduce = match &self.axes {
            Some(axes) => onnx::Node::new("ReduceMax", &[&abs, axes], &[&max]),
            None => onnx::Node::new("ReduceMax", &[&abs], &[&max]).attr("axes", Attr::Ints(vec![-1])),
        }
        .attr("keepdims", Attr::Int(1));
        let nodes = vec![
            onnx::Node::new("Abs", &[x], &[&abs]),
            reduce,
            onnx::Node::new("Mul", &[&max, &self.per_level], &[&scaled]),
            onnx::Node::new("Max", &[&scaled, &self.least], &[&scale]),
            onnx::Node::new("Reshape", &[&scale, &flat], &[&scales]),
            onnx::Node::new("Reshape", &[&scale, &column], &[&row_scale]),
            onnx::Node::new("Shape", &[&scales], &[&rows]),
            onnx::Node::new("Expand", &[&self.zero, &rows], &[&zeros]),
            onnx::Node::new("Reshape", &[x, &matrix], &[&x2]),
            onnx::Node::new("QuantizeLinear", &[&x2, &scales, &zeros], &[&q]).attr("axis", Attr::Int(0)),
            onnx::Node::new("Shape", &[x], &[&shape]),
            onnx::Node::new("Slice", &[&shape, &start, &end], &[&prefix]),
        ];
        (nodes, RowsOf { q, scale: row_scale, prefix })
    }
}

/// Where a constant MatMul weight comes from: an initializer, maybe transposed.
#[derive(Clone)]
struct Source {
    init: String,
    transposed: bool,
}

/// A name not yet used in the graph, derived from `base`.
fn fresh(base: &str, suffix: &str, taken: &mut HashSet<String>) -> String {
    let mut name = format!("{base}{suffix}");
    let mut i = 1;
    while taken.contains(&name) {
        name = format!("{base}{suffix}.{i}");
        i += 1;
    }
    taken.insert(name.clone());
    name
}

/// `model` with every MatMul in `scope` that has a constant 2-D float weight computed in int8 by
/// `scheme` (see the module docs), as ONNX bytes for `commit_from_memory`, and what was rewritten.
///
/// # Errors
/// The bytes are not an ONNX model, its graph has subgraphs, or the scope names no output of it.
pub fn quantize_matmuls(model: &[u8], scheme: Scheme, scope: Scope<'_>) -> Result<(Vec<u8>, QuantizeStats), QuantizeError> {
    let mut graph = None;
    let mut has_ms = false;
    // The default domain's opset (ReduceMax takes its axes as an input from 18).
    let mut opset = 0;
    for f in Fields(model) {
        match f? {
            (model::GRAPH, Field::Bytes(b), _) => graph = Some(b),
            (model::OPSET_IMPORT, Field::Bytes(b), _) => {
                let (mut domain, mut version) = (Vec::new(), 0);
                for g in Fields(b) {
                    match g? {
                        (onnx::opset::DOMAIN, Field::Bytes(d), _) => domain = d.to_vec(),
                        (onnx::opset::VERSION, Field::Varint(v), _) => version = v as i64,
                        _ => {}
                    }
                }
                if domain == MS_DOMAIN.as_bytes() {
                    has_ms = true;
                } else if domain.is_empty() || domain == b"ai.onnx" {
                    opset = version;
                }
            }
            _ => {}
        }
    }
    let graph = graph.ok_or(QuantizeError::Malformed(Malformed("no graph")))?;
    let (mut nodes, mut inits, mut others) = (Vec::new(), HashMap::new(), Vec::new());
    let mut init_order = Vec::new();
    let (mut keep_names, mut outputs): (HashSet<String>, HashSet<String>) = Default::default();
    for f in Fields(graph) {
        match f? {
            (graph::NODE, Field::Bytes(b), raw) => nodes.push(parse_node(raw, b)?),
            (graph::INITIALIZER, Field::Bytes(b), raw) => {
                let name = Fields(b)
                    .filter_map(|f| match f {
                        Ok((tensor::NAME, Field::Bytes(n), _)) => Some(text(n)),
                        _ => None,
                    })
                    .last()
                    .ok_or(QuantizeError::Malformed(Malformed("unnamed initializer")))?;
                init_order.push(name.clone());
                inits.insert(name, (b, raw));
            }
            (n, field, raw) => {
                // Graph inputs and outputs must keep their values.
                if let (graph::INPUT | graph::OUTPUT, Field::Bytes(b)) = (n, field) {
                    let names = strings(b, onnx::value_info::NAME)?;
                    if n == graph::OUTPUT {
                        outputs.extend(names.iter().cloned());
                    }
                    keep_names.extend(names);
                }
                others.push(raw);
            }
        }
    }
    let mut taken: HashSet<String> = inits.keys().cloned().collect();
    taken.extend(nodes.iter().flat_map(|n| n.outputs.iter().cloned()));
    taken.extend(keep_names.iter().cloned());

    // Constant weights by value name: fp32 initializers, Casts of fp16/fp32 initializers to fp32,
    // and 2-D Transposes of those.
    let mut sources: HashMap<String, Source> = HashMap::new();
    for name in inits.keys() {
        sources.insert(name.clone(), Source { init: name.clone(), transposed: false });
    }
    let mut cast_of: HashMap<String, String> = HashMap::new();
    for n in &nodes {
        let (Some(x), Some(y)) = (n.inputs.first(), n.outputs.first()) else { continue };
        if !n.is_plain() {
            continue;
        }
        match n.op_type.as_str() {
            "Cast" if n.ints.get("to").is_some_and(|t| t[..] == [DataType::Float as i64]) && inits.contains_key(x) => {
                sources.insert(y.clone(), Source { init: x.clone(), transposed: false });
                cast_of.insert(y.clone(), x.clone());
            }
            "Transpose" if n.ints.get("perm").is_none_or(|p| p[..] == [1, 0]) => {
                if let Some(s) = sources.get(x).filter(|s| !s.transposed).cloned() {
                    sources.insert(y.clone(), Source { transposed: true, ..s });
                }
            }
            _ => {}
        }
    }

    if matches!(scheme, Scheme::Rows(_)) && opset < 13 {
        return Err(QuantizeError::Opset(opset));
    }
    let within = match scope {
        Scope::All => None,
        Scope::Feeding(output) if outputs.contains(output) => Some(ancestors(&nodes, output)),
        Scope::Feeding(output) => return Err(QuantizeError::NoOutput(output.to_string())),
    };
    let mut stats = QuantizeStats::default();
    let mut new_inits: Vec<Tensor> = Vec::new();
    // Rewritten nodes by node index.
    let mut rewritten: HashMap<usize, Vec<onnx::Node>> = HashMap::new();
    // (init, transposed) → (int8 name, scale name, k, n): a weight two MatMuls share is quantised once.
    let mut done: HashMap<(String, bool), (String, String, usize, usize)> = HashMap::new();
    let mut rows: Option<RowConstants> = None;
    // Scheme::Rows: an input's quantised values and row scales, made before the first MatMul reading
    // it, and the shapes of its products by width.
    let mut quantised: HashMap<String, RowsOf> = HashMap::new();
    let mut shapes: HashMap<(String, usize), String> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        if !(n.is_plain() && n.op_type == "MatMul" && n.inputs.len() == 2 && n.outputs.len() == 1) {
            continue;
        }
        // A direct initializer must be fp32 (MatMul's inputs share a type); a Cast makes it so.
        let Some(src) = sources.get(&n.inputs[1]).cloned() else { continue };
        if within.as_ref().is_some_and(|w| !w.contains(&i)) {
            stats.outside += 1;
            continue;
        }
        let key = (src.init.clone(), src.transposed);
        if !done.contains_key(&key) {
            // Decoded per use, not kept: the fp32 copies of all weights at once would raise the
            // load's peak memory by the model's fp32 size.
            let direct_fp16 = n.inputs[1] == src.init && !init_is_float(inits[&src.init].0)?;
            let Some(m) = read_matrix(inits[&src.init].0)?.filter(|_| !direct_fp16) else {
                stats.skipped += 1;
                continue;
            };
            let qname = fresh(&n.inputs[1], ".int8", &mut taken);
            let sname = fresh(&n.inputs[1], ".int8_scale", &mut taken);
            let (k, cols, scale) = match scheme {
                Scheme::Blocks => {
                    let (k, cols, blocks, q, scale) = quantize(&m, src.transposed);
                    new_inits.push(Tensor::raw(&qname, vec![cols as i64, blocks as i64, BLOCK as i64], DataType::Uint8, q));
                    (k, cols, scale)
                }
                Scheme::Rows(_) => {
                    let (k, cols, q, scale) = quantize_columns(&m, src.transposed);
                    new_inits.push(Tensor::raw(&qname, vec![k as i64, cols as i64], DataType::Int8, q));
                    (k, cols, scale)
                }
            };
            drop(m);
            let scale_bytes: Vec<u8> = scale.iter().flat_map(|s| s.to_le_bytes()).collect();
            new_inits.push(Tensor::raw(&sname, vec![scale.len() as i64], DataType::Float, scale_bytes));
            done.insert(key.clone(), (qname, sname, k, cols));
        }
        let (qname, sname, k, cols) = &done[&key];
        let name = |suffix: &str| if n.name.is_empty() { String::new() } else { format!("{}{suffix}", n.name) };
        let new = match scheme {
            Scheme::Blocks => vec![
                onnx::Node::new("MatMulNBits", &[&n.inputs[0], qname, sname], &[&n.outputs[0]])
                    .named(name(".int8"))
                    .in_domain(MS_DOMAIN)
                    .attr("K", Attr::Int(*k as i64))
                    .attr("N", Attr::Int(*cols as i64))
                    .attr("bits", Attr::Int(8))
                    .attr("block_size", Attr::Int(BLOCK as i64))
                    .attr("accuracy_level", Attr::Int(4)),
            ],
            Scheme::Rows(activations) => {
                let c = rows.get_or_insert_with(|| RowConstants::new(opset, activations, &mut taken, &mut new_inits));
                let x = &n.inputs[0];
                let mut new = Vec::new();
                let of = match quantised.get(x) {
                    Some(done) => done.clone(),
                    None => {
                        let (nodes, of) = c.quantise(x, *k, &mut taken, &mut new_inits);
                        new.extend(nodes);
                        quantised.insert(x.clone(), of.clone());
                        of
                    }
                };
                let shape = match shapes.get(&(x.clone(), *cols)) {
                    Some(shape) => shape.clone(),
                    None => {
                        let (width, shape) = (c.ints(&[*cols as i64], &mut taken, &mut new_inits), fresh(x, ".product_shape", &mut taken));
                        new.push(onnx::Node::new("Concat", &[&of.prefix, &width], &[&shape]).attr("axis", Attr::Int(0)));
                        shapes.insert((x.clone(), *cols), shape.clone());
                        shape
                    }
                };
                let y = &n.outputs[0];
                let mut v = |suffix: &str| fresh(y, suffix, &mut taken);
                let (acc, float, scaled, matrix) = (v(".i32"), v(".f32"), v(".rows"), v(".matrix"));
                new.extend([
                    onnx::Node::new("MatMulInteger", &[&of.q, qname, &c.zero], &[&acc]).named(name(".int8")),
                    onnx::Node::new("Cast", &[&acc], &[&float]).attr("to", Attr::Int(DataType::Float as i64)),
                    onnx::Node::new("Mul", &[&float, &of.scale], &[&scaled]),
                    onnx::Node::new("Mul", &[&scaled, sname], &[&matrix]),
                    onnx::Node::new("Reshape", &[&matrix, &shape], &[y]),
                ]);
                new
            }
        };
        rewritten.insert(i, new);
        stats.matmuls += 1;
    }

    // Uses of every value by the nodes as they now are, and by the graph's outputs.
    let mut uses: HashMap<String, usize> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        let inputs: Vec<&String> = if rewritten.contains_key(&i) { vec![&n.inputs[0]] } else { n.inputs.iter().collect() };
        for x in inputs {
            *uses.entry(x.clone()).or_default() += 1;
        }
    }
    for name in &keep_names {
        *uses.entry(name.clone()).or_default() += 1;
    }
    for q in done.values() {
        for name in [&q.0, &q.1] {
            *uses.entry(name.clone()).or_default() += 1;
        }
    }

    // Gathers from a cast fp16 table: gather fp16 rows, then cast them (exact), so the table stays fp16.
    for (i, n) in nodes.iter().enumerate() {
        let Some(table) = n.inputs.first().and_then(|x| cast_of.get(x)) else { continue };
        if !(n.is_plain() && n.op_type == "Gather" && n.outputs.len() == 1) || init_is_float(inits[table].0)? {
            continue;
        }
        let half = fresh(&n.outputs[0], ".fp16", &mut taken);
        let mut inputs: Vec<&str> = n.inputs.iter().map(String::as_str).collect();
        inputs[0] = table;
        let mut gather = onnx::Node::new("Gather", &inputs, &[&half]).named(n.name.clone());
        if let Some(&axis) = n.ints.get("axis").and_then(|a| a.first()) {
            gather = gather.attr("axis", Attr::Int(axis));
        }
        let cast_name = if n.name.is_empty() { String::new() } else { format!("{}.cast", n.name) };
        let cast = onnx::Node::new("Cast", &[&half], &[&n.outputs[0]]).named(cast_name).attr("to", Attr::Int(DataType::Float as i64));
        rewritten.insert(i, vec![gather, cast]);
        if let Some(u) = uses.get_mut(&n.inputs[0]) {
            *u -= 1;
        }
        *uses.entry(table.clone()).or_default() += 1;
        stats.gathers += 1;
    }

    // Drop the Casts and Transposes that fed only rewritten nodes (last first, so chains go too).
    let mut dropped: HashSet<usize> = HashSet::new();
    for (i, n) in nodes.iter().enumerate().rev() {
        let dead = n.is_plain()
            && matches!(n.op_type.as_str(), "Cast" | "Transpose")
            && n.outputs.len() == 1
            && sources.contains_key(&n.outputs[0])
            && uses.get(&n.outputs[0]).copied().unwrap_or(0) == 0;
        if dead {
            dropped.insert(i);
            if let Some(u) = uses.get_mut(&n.inputs[0]) {
                *u = u.saturating_sub(1);
            }
        }
    }

    let mut g = Vec::with_capacity(graph.len());
    for (i, n) in nodes.iter().enumerate() {
        if dropped.contains(&i) {
            continue;
        }
        match rewritten.remove(&i) {
            Some(new) => new.into_iter().for_each(|n| put_bytes(&mut g, graph::NODE, &n.encode())),
            None => g.extend_from_slice(n.raw),
        }
    }
    for raw in others {
        g.extend_from_slice(raw);
    }
    for name in &init_order {
        if uses.get(name).copied().unwrap_or(0) > 0 || keep_names.contains(name) {
            g.extend_from_slice(inits[name].1);
        }
    }
    for t in new_inits {
        t.put(&mut g, graph::INITIALIZER);
    }

    let mut out = onnx::with_graph(model, &g)?;
    if !has_ms && scheme == Scheme::Blocks && stats.matmuls > 0 {
        put_bytes(&mut out, model::OPSET_IMPORT, &OperatorSetId { domain: MS_DOMAIN, version: 1 }.encode());
    }
    Ok((out, stats))
}

/// The indices of the nodes that `output` depends on.
fn ancestors(nodes: &[Node<'_>], output: &str) -> HashSet<usize> {
    let producer: HashMap<&str, usize> =
        nodes.iter().enumerate().flat_map(|(i, n)| n.outputs.iter().map(move |y| (y.as_str(), i))).collect();
    let (mut seen, mut todo) = (HashSet::new(), vec![output]);
    while let Some(value) = todo.pop() {
        if let Some(&i) = producer.get(value)
            && seen.insert(i)
        {
            todo.extend(nodes[i].inputs.iter().map(String::as_str));
        }
    }
    seen
}

/// Whether the initializer `bytes` is fp32 (as opposed to fp16 or anything else).
fn init_is_float(bytes: &[u8]) -> Result<bool, QuantizeError> {
    for f in Fields(bytes) {
        if let (tensor::DATA_TYPE, Field::Varint(v), _) = f? {
            return Ok(v == DataType::Float as u64);
        }
    }
    Ok(false)
}

/// A model with each weight form the rewrite handles, for tests here and in the worker (which runs
/// it in ONNX Runtime against its rewrite).
#[cfg(any(test, feature = "testing"))]
pub mod fixtures {
    use crate::onnx::{Attr, DataType, Dim, Graph, Model, Node, OperatorSetId, Tensor, ValueInfo, f32_to_f16};

    fn info(name: &str, elem: DataType, dims: &[i64]) -> ValueInfo {
        ValueInfo::new(name, elem, dims.iter().map(|&d| Dim::Value(d)).collect())
    }

    /// x \[2, 8\] and ids \[2\] → y1 = x·Cast(w16), y2 = x·Cast(w16)ᵀ, y3 = Gather(Cast(w16), ids),
    /// y4 = x·w32: each weight form the rewrite handles, as ONNX opset 17 bytes.
    pub fn matmul_forms() -> Vec<u8> {
        let w: Vec<f32> = (0..64).map(|i| ((i * 37 % 64) as f32 - 32.0) / 32.0).collect();
        let w32: Vec<f32> = (0..24).map(|i| ((i * 11 % 24) as f32 - 12.0) / 16.0).collect();
        let w16: Vec<u8> = w.iter().flat_map(|&v| f32_to_f16(v).to_le_bytes()).collect();
        let w32: Vec<u8> = w32.iter().flat_map(|v| v.to_le_bytes()).collect();
        let graph = Graph {
            nodes: vec![
                Node::new("Cast", &["w16"], &["w"]).named("cast").attr("to", Attr::Int(DataType::Float as i64)),
                Node::new("MatMul", &["x", "w"], &["y1"]).named("mm1"),
                Node::new("Transpose", &["w"], &["wt"]).named("tr").attr("perm", Attr::Ints(vec![1, 0])),
                Node::new("MatMul", &["x", "wt"], &["y2"]).named("mm2"),
                Node::new("Gather", &["w", "ids"], &["y3"]).named("gather").attr("axis", Attr::Int(0)),
                Node::new("MatMul", &["x", "w32"], &["y4"]).named("mm4"),
            ],
            initializers: vec![
                Tensor::raw("w16", vec![8, 8], DataType::Float16, w16),
                Tensor::raw("w32", vec![8, 3], DataType::Float, w32),
            ],
            inputs: vec![info("x", DataType::Float, &[2, 8]), info("ids", DataType::Int64, &[2])],
            outputs: [("y1", 8), ("y2", 8), ("y3", 8), ("y4", 3)].iter().map(|&(y, n)| info(y, DataType::Float, &[2, n])).collect(),
            ..Graph::default()
        };
        Model { ir_version: 8, producer_name: "", graph, opset_import: vec![OperatorSetId { domain: "", version: 17 }] }.encode()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::onnx::{Graph, Model};

    fn op_types(model: &[u8]) -> Vec<String> {
        Fields(crate::onnx::graph_of(model).unwrap())
            .filter_map(|f| match f.unwrap() {
                (graph::NODE, Field::Bytes(b), raw) => Some(parse_node(raw, b).unwrap().op_type),
                _ => None,
            })
            .collect()
    }

    /// Each MatMul form becomes MatMulNBits; the Cast and Transpose that fed only MatMuls are gone;
    /// a second pass finds nothing to do. (The worker's engine tests run both in ONNX Runtime.)
    #[test]
    fn each_matmul_form_is_rewritten_once() {
        let model = fixtures::matmul_forms();
        let (int8, stats) = quantize_matmuls(&model, Scheme::Blocks, Scope::All).unwrap();
        assert_eq!(stats, QuantizeStats { matmuls: 3, skipped: 0, outside: 0, gathers: 1 });
        assert_eq!(op_types(&int8), ["MatMulNBits", "MatMulNBits", "Gather", "Cast", "MatMulNBits"]);
        let (again, stats) = quantize_matmuls(&int8, Scheme::Blocks, Scope::All).unwrap();
        assert_eq!(stats.matmuls, 0);
        assert_eq!(op_types(&again), op_types(&int8));
    }

    /// The nodes that quantise an input per row.
    const QUANTISE: [&str; 12] =
        ["Abs", "ReduceMax", "Mul", "Max", "Reshape", "Reshape", "Shape", "Expand", "Reshape", "QuantizeLinear", "Shape", "Slice"];

    /// By rows, the three MatMuls that read x share one quantisation of it (Abs … Slice), and each is
    /// MatMulInteger scaled back by row and column, in x's shape.
    #[test]
    fn by_rows_an_input_is_quantised_once() {
        let (int8, stats) = quantize_matmuls(&fixtures::matmul_forms(), Scheme::Rows(Activations::Int8), Scope::All).unwrap();
        assert_eq!(stats, QuantizeStats { matmuls: 3, skipped: 0, outside: 0, gathers: 1 });
        let ops = op_types(&int8);
        let matmul = ["MatMulInteger", "Cast", "Mul", "Mul", "Reshape"];
        let want: Vec<&str> = QUANTISE
            .iter()
            .chain(&["Concat"])
            .chain(&matmul)
            .chain(&matmul)
            .chain(&["Gather", "Cast", "Concat"])
            .chain(&matmul)
            .copied()
            .collect();
        assert_eq!(ops, want, "one Concat per product width: y1 and y2 share theirs");
        let (_, stats) = quantize_matmuls(&int8, Scheme::Rows(Activations::Int8), Scope::All).unwrap();
        assert_eq!(stats.matmuls, 0, "MatMulInteger is not rewritten again");
    }

    /// Scoped to y4, only the MatMul that computes it is rewritten; the others stay fp32, and with
    /// them the Cast and Transpose they read. An output the model lacks is an error.
    #[test]
    fn a_scope_keeps_the_matmuls_its_output_does_not_depend_on() {
        let model = fixtures::matmul_forms();
        let (int8, stats) = quantize_matmuls(&model, Scheme::Rows(Activations::Int8), Scope::Feeding("y4")).unwrap();
        assert_eq!(stats, QuantizeStats { matmuls: 1, skipped: 0, outside: 2, gathers: 1 });
        let want: Vec<&str> = ["Cast", "MatMul", "Transpose", "MatMul", "Gather", "Cast"]
            .iter()
            .chain(&QUANTISE)
            .chain(&["Concat", "MatMulInteger", "Cast", "Mul", "Mul", "Reshape"])
            .copied()
            .collect();
        assert_eq!(op_types(&int8), want);
        assert!(
            matches!(quantize_matmuls(&model, Scheme::Rows(Activations::Int8), Scope::Feeding("x")), Err(QuantizeError::NoOutput(o)) if o == "x")
        );
    }

    /// Subgraphs, bytes that are not a model, and (by rows) an opset without QuantizeLinear along an axis.
    #[test]
    fn subgraphs_and_garbage_are_refused() {
        let branch = onnx::Node::new("If", &["c"], &["y"]).named("if").attr("then_branch", Attr::Graph(Graph::default()));
        let graph = Graph { nodes: vec![branch], ..Graph::default() };
        let m = Model { ir_version: 8, producer_name: "", graph, opset_import: vec![] }.encode();
        assert!(
            matches!(quantize_matmuls(&m, Scheme::Blocks, Scope::All), Err(QuantizeError::Graph(GraphError::Subgraph(n))) if n == "if")
        );
        assert!(matches!(
            quantize_matmuls(&[0x3a, 0x05, 0x01], Scheme::Rows(Activations::Int8), Scope::All),
            Err(QuantizeError::Malformed(_))
        ));
        let old = Model {
            ir_version: 7,
            producer_name: "",
            graph: Graph::default(),
            opset_import: vec![OperatorSetId { domain: "", version: 12 }],
        };
        assert!(matches!(quantize_matmuls(&old.encode(), Scheme::Rows(Activations::Int8), Scope::All), Err(QuantizeError::Opset(12))));
    }
}
