//! Fuses each unmasked self-attention of an encoder graph into ONNX Runtime's `com.microsoft`
//! `MultiHeadAttention`, as an in-memory rewrite at load time.
//!
//! Why: the graph the converter writes computes attention as ONNX's basic operators: per head, the
//! scores Q·Kᵀ (a [heads, 1500, 1500] fp32 tensor for a Whisper window, 72 MB a layer), a `Mul` by
//! the scale and a `Softmax` over the whole tensor, then P·V, with a `Reshape` and a `Transpose` for
//! each of Q, K and V and the output. ONNX Runtime runs each as its own pass over memory. Its CPU
//! `MultiHeadAttention` without mask, bias or past takes MLAS's flash attention: Q·Kᵀ, softmax and
//! P·V by tiles that stay in cache, reading Q, K and V in their [batch, tokens, hidden] layout, so
//! the scores are never written out and the transposes go. The result is the same function of the
//! same inputs (softmax(scale·Q·Kᵀ)·V per head), up to the order of float additions: Whisper base's
//! encoder output differs from the unfused graph's by less than 1e-4.
//!
//! How: from each `Softmax`, the converter's pattern is matched node by node (see
//! `convert::whisper_graphs`: `split_heads` and `attend`); a chain that differs in any way (a mask
//! added to the scores, another reader of an intermediate value, other permutations or shapes) is
//! left as it is. A matched chain's 13 nodes become one `MultiHeadAttention` whose inputs are Q, K
//! and V before their `Reshape`s (the projections, which the int8 rewrite of [`crate::quantize`]
//! may then rewrite as before), with the heads read from the `Reshape`'s shape and the scale from
//! the `Mul`'s constant. It takes the place of the chain's last node, so the graph stays in
//! topological order. Initializers only the chain read are dropped; all else is copied byte for byte.
//!
//! [`scale_queries`] is for the decoder, whose attentions stay as written (the word timestamps read
//! their scores): it moves each attention's scale from the scores onto the queries, before they are
//! split into heads, as `openai-whisper` computes it. Why: ONNX Runtime folds a `Mul` by a constant
//! after a `MatMul` into the `FusedMatMul`'s alpha, and with an alpha other than 1 a step's Q·Kᵀ
//! against the 1,500 cached keys took 0.85 ms a layer instead of 0.36 (ONNX Runtime's profile of a
//! 4-row step of the int8 with-past decoder, Python 1.31.1, 2 threads); the whole step 12.5 ms
//! against 20.1 at 4 rows, 8.0 against 8.4 at 1. Whisper's scale is 1/8, a power of two, which
//! multiplies exactly in either place; the two kernels sum in different orders, so from 2 rows on the
//! scores agree to float rounding, not to the bit (on the 600 s recording, the same words). Other
//! readers of the scaled scores, such as the word-timestamp outputs, read them from the `MatMul`
//! that now writes them.

use std::collections::{HashMap, HashSet};

use crate::onnx::nodes::{GraphError, Node, parse_node};
use crate::onnx::wire::{Field, Fields, Malformed, put_bytes, strings};
use crate::onnx::{self, Attr, DataType, OperatorSetId, graph, model, tensor};
use crate::quantize::MS_DOMAIN;

/// One matched attention: the nodes it replaces and what the fused node needs.
struct Matched {
    /// Indices of the chain's nodes; the last is the output `Reshape`.
    nodes: [usize; 13],
    q: String,
    k: String,
    v: String,
    heads: i64,
    scale: f32,
    output: String,
}

/// A model's top-level graph, read for a rewrite.
struct Parsed<'a> {
    has_ms: bool,
    nodes: Vec<Node<'a>>,
    inits: HashMap<String, (&'a [u8], &'a [u8])>,
    init_order: Vec<String>,
    /// Every other graph field, as it came.
    others: Vec<&'a [u8]>,
    outputs: HashSet<String>,
}

impl<'a> Parsed<'a> {
    fn new(model: &'a [u8]) -> Result<Self, GraphError> {
        let mut has_ms = false;
        for f in Fields(model) {
            if let (model::OPSET_IMPORT, Field::Bytes(b), _) = f? {
                for g in Fields(b) {
                    if let (onnx::opset::DOMAIN, Field::Bytes(d), _) = g?
                        && d == MS_DOMAIN.as_bytes()
                    {
                        has_ms = true;
                    }
                }
            }
        }
        let (mut nodes, mut inits, mut init_order, mut others, mut outputs) =
            (Vec::new(), HashMap::new(), Vec::new(), Vec::new(), HashSet::new());
        for f in Fields(onnx::graph_of(model)?) {
            match f? {
                (graph::NODE, Field::Bytes(b), raw) => nodes.push(parse_node(raw, b)?),
                (graph::INITIALIZER, Field::Bytes(b), raw) => {
                    let name = strings(b, tensor::NAME)?.pop().ok_or(Malformed("unnamed initializer"))?;
                    init_order.push(name.clone());
                    inits.insert(name, (b, raw));
                }
                (field, value, raw) => {
                    if let (graph::OUTPUT, Field::Bytes(b)) = (field, value) {
                        outputs.extend(strings(b, onnx::value_info::NAME)?);
                    }
                    others.push(raw);
                }
            }
        }
        Ok(Parsed { has_ms, nodes, inits, init_order, others, outputs })
    }

    fn pattern(&self) -> Pattern<'_, 'a> {
        Pattern::new(&self.nodes, &self.inits, &self.outputs)
    }
}

/// `model` with every self-attention of the converter's unmasked shape as one `MultiHeadAttention`
/// (see the module docs), and how many were fused.
///
/// # Errors
/// The bytes are not an ONNX model, or its graph has subgraphs.
pub fn fuse_attention(model: &[u8]) -> Result<(Vec<u8>, usize), GraphError> {
    let parsed = Parsed::new(model)?;
    let nodes = &parsed.nodes;
    let found = parsed.pattern().all();
    if found.is_empty() {
        return Ok((model.to_vec(), 0));
    }
    let mut replaced: HashMap<usize, &Matched> = HashMap::new();
    let mut dropped: HashSet<usize> = HashSet::new();
    for m in &found {
        let (last, rest) = m.nodes.split_last().expect("13 nodes");
        replaced.insert(*last, m);
        dropped.extend(rest);
    }
    // The chains' shape and scale constants go; an initializer a kept node reads, or no chain read, stays.
    let mut read: HashSet<&str> = HashSet::new();
    for (i, n) in nodes.iter().enumerate() {
        if !dropped.contains(&i) && !replaced.contains_key(&i) {
            read.extend(n.inputs.iter().map(String::as_str));
        }
    }
    let chain_inputs: HashSet<&str> =
        found.iter().flat_map(|m| m.nodes.iter().flat_map(|&i| nodes[i].inputs.iter().map(String::as_str))).collect();

    let mut g = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        if dropped.contains(&i) {
            continue;
        }
        match replaced.get(&i) {
            Some(m) => {
                let fused = onnx::Node::new("MultiHeadAttention", &[&m.q, &m.k, &m.v], &[&m.output])
                    .named(format!("{}.fused_attention", if n.name.is_empty() { &m.output } else { &n.name }))
                    .in_domain(MS_DOMAIN)
                    .attr("num_heads", Attr::Int(m.heads))
                    .attr("scale", Attr::Float(m.scale));
                put_bytes(&mut g, graph::NODE, &fused.encode());
            }
            None => g.extend_from_slice(n.raw),
        }
    }
    for raw in &parsed.others {
        g.extend_from_slice(raw);
    }
    for name in &parsed.init_order {
        if read.contains(name.as_str()) || !chain_inputs.contains(name.as_str()) {
            g.extend_from_slice(parsed.inits[name].1);
        }
    }
    let mut out = onnx::with_graph(model, &g)?;
    if !parsed.has_ms {
        put_bytes(&mut out, model::OPSET_IMPORT, &OperatorSetId { domain: MS_DOMAIN, version: 1 }.encode());
    }
    Ok((out, found.len()))
}

/// One attention whose scale [`scale_queries`] moves: (the queries' producer, the scores' `MatMul`,
/// the scaling `Mul`, the scale's initializer).
type Scaled<'g> = (usize, usize, usize, &'g str);

/// `model` with each attention's scale moved from its scores onto its queries (see the module
/// docs), and how many were moved.
///
/// # Errors
/// The bytes are not an ONNX model, or its graph has subgraphs.
pub fn scale_queries(model: &[u8]) -> Result<(Vec<u8>, usize), GraphError> {
    let parsed = Parsed::new(model)?;
    let nodes = &parsed.nodes;
    let p = parsed.pattern();
    let found: Vec<Scaled<'_>> = (0..nodes.len()).filter(|&i| p.is(i, "Mul")).filter_map(|i| p.scaled_scores(i)).collect();
    if found.is_empty() {
        return Ok((model.to_vec(), 0));
    }
    let by = |pick: fn(&Scaled<'_>) -> usize| -> HashMap<usize, Scaled<'_>> { found.iter().map(|m| (pick(m), *m)).collect() };
    let (queries, products, scalings) = (by(|m| m.0), by(|m| m.1), by(|m| m.2));
    let mut g = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let inputs: Vec<&str> = n.inputs.iter().map(String::as_str).collect();
        let named = |node: onnx::Node| if n.name.is_empty() { node } else { node.named(n.name.clone()) };
        if let Some(&(_, _, _, scale)) = queries.get(&i) {
            // The queries' producer writes `{q}.unscaled`; a Mul by the scale writes `q`.
            let q = &n.outputs[0];
            let unscaled = format!("{q}.unscaled");
            let op = if n.op_type == "Add" { "Add" } else { "MatMul" };
            put_bytes(&mut g, graph::NODE, &named(onnx::Node::new(op, &inputs, &[&unscaled])).encode());
            put_bytes(&mut g, graph::NODE, &onnx::Node::new("Mul", &[&unscaled, scale], &[q]).named(format!("{q}.scale")).encode());
        } else if let Some(&(_, _, mul, _)) = products.get(&i) {
            // The scores' MatMul writes what the scaling Mul wrote, for all its readers.
            put_bytes(&mut g, graph::NODE, &named(onnx::Node::new("MatMul", &inputs, &[&nodes[mul].outputs[0]])).encode());
        } else if !scalings.contains_key(&i) {
            g.extend_from_slice(n.raw);
        }
    }
    for raw in &parsed.others {
        g.extend_from_slice(raw);
    }
    for name in &parsed.init_order {
        g.extend_from_slice(parsed.inits[name].1);
    }
    Ok((onnx::with_graph(model, &g)?, found.len()))
}

/// The converter's attention pattern, matched against one graph.
struct Pattern<'g, 'a> {
    nodes: &'g [Node<'a>],
    inits: &'g HashMap<String, (&'a [u8], &'a [u8])>,
    producer: HashMap<&'g str, usize>,
    readers: HashMap<&'g str, Vec<usize>>,
    outputs: &'g HashSet<String>,
}

impl<'g, 'a> Pattern<'g, 'a> {
    fn new(nodes: &'g [Node<'a>], inits: &'g HashMap<String, (&'a [u8], &'a [u8])>, outputs: &'g HashSet<String>) -> Self {
        let mut producer = HashMap::new();
        let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in nodes.iter().enumerate() {
            producer.extend(n.outputs.iter().map(|y| (y.as_str(), i)));
            for x in &n.inputs {
                readers.entry(x.as_str()).or_default().push(i);
            }
        }
        Self { nodes, inits, producer, readers, outputs }
    }

    fn all(&self) -> Vec<Matched> {
        (0..self.nodes.len()).filter(|&i| self.is(i, "Softmax")).filter_map(|i| self.attention(i)).collect()
    }

    /// Whether node `i` is the default domain's `op` with one output.
    fn is(&self, i: usize, op: &str) -> bool {
        let n = &self.nodes[i];
        n.op_type == op && n.is_plain() && n.outputs.len() == 1
    }

    /// The `op` node that computes `value`, where that node's output is read by nothing but the chain.
    fn made_by(&self, value: &str, op: &str) -> Option<usize> {
        let i = *self.producer.get(value)?;
        (self.is(i, op) && self.readers.get(value).is_some_and(|r| r.len() == 1) && !self.outputs.contains(value)).then_some(i)
    }

    /// The one node, an `op`, that reads node `i`'s output.
    fn read_by(&self, i: usize, op: &str) -> Option<usize> {
        let value = self.nodes[i].outputs[0].as_str();
        let [r] = self.readers.get(value)?[..] else { return None };
        (self.is(r, op) && !self.outputs.contains(value)).then_some(r)
    }

    fn perm(&self, i: usize, perm: &[i64]) -> bool {
        self.nodes[i].ints.get("perm").is_some_and(|p| p == perm)
    }

    /// The int64 values of a constant 1-D initializer.
    fn int64s(&self, name: &str) -> Option<Vec<i64>> {
        let (body, _) = self.inits.get(name)?;
        let (mut dtype, mut raw) = (None, None);
        for f in Fields(body) {
            match f.ok()? {
                (tensor::DATA_TYPE, Field::Varint(v), _) => dtype = Some(v),
                (tensor::RAW_DATA, Field::Bytes(b), _) => raw = Some(b),
                _ => {}
            }
        }
        (dtype? == DataType::Int64 as u64)
            .then(|| raw.map(|b| b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()))?
    }

    /// The value of a constant fp32 scalar initializer.
    fn scalar(&self, name: &str) -> Option<f32> {
        let (body, _) = self.inits.get(name)?;
        let (mut dtype, mut raw, mut dims) = (None, None, 0);
        for f in Fields(body) {
            match f.ok()? {
                (tensor::DATA_TYPE, Field::Varint(v), _) => dtype = Some(v),
                (tensor::RAW_DATA, Field::Bytes(b), _) => raw = Some(b),
                (tensor::DIMS, _, _) => dims += 1,
                _ => {}
            }
        }
        let raw: [u8; 4] = raw?.try_into().ok()?;
        (dtype? == DataType::Float as u64 && dims == 0).then(|| f32::from_le_bytes(raw))
    }

    /// `x` split into heads, `Transpose(Reshape(x, [0, -1, heads, head_dim]), [0, 2, 1, 3])`, as the
    /// value `split`: (x, heads, head_dim, [reshape, transpose]).
    fn split_heads(&self, split: &str) -> Option<(String, i64, i64, [usize; 2])> {
        let transpose = self.made_by(split, "Transpose")?;
        let reshape = self.made_by(&self.nodes[transpose].inputs[0], "Reshape")?;
        let [x, shape] = &self.nodes[reshape].inputs[..] else { return None };
        let [0, -1, heads, head_dim] = self.int64s(shape)?[..] else { return None };
        (self.perm(transpose, &[0, 2, 1, 3]) && heads > 0 && head_dim > 0).then(|| (x.clone(), heads, head_dim, [reshape, transpose]))
    }

    /// The scaling of an attention's scores by the `Mul` node `mul`: Softmax(Q·Kᵀ·scale [+ mask]),
    /// other readers of the scaled scores allowed (the word-timestamp outputs), where the queries are
    /// split into heads from the output of an `Add` or `MatMul` without attributes that nothing else
    /// reads.
    fn scaled_scores(&self, mul: usize) -> Option<Scaled<'g>> {
        let nodes = self.nodes;
        let [a, b] = &nodes[mul].inputs[..] else { return None };
        let (scores, scale) = match (self.scalar(a), self.scalar(b)) {
            (None, Some(_)) => (a, b),
            (Some(_), None) => (b, a),
            _ => return None,
        };
        let qk = self.made_by(scores, "MatMul")?;
        // The scaled scores go to a Softmax, directly or through a mask.
        let readers = self.readers.get(nodes[mul].outputs[0].as_str())?;
        let to_softmax = |r: usize| self.is(r, "Softmax") || (self.is(r, "Add") && self.read_by(r, "Softmax").is_some());
        if !readers.iter().any(|&r| to_softmax(r)) {
            return None;
        }
        let (q, ..) = self.split_heads(&nodes[qk].inputs[0])?;
        let producer = ["Add", "MatMul"].iter().find_map(|op| self.made_by(&q, op))?;
        nodes[producer].ints.is_empty().then_some((producer, qk, mul, scale.as_str()))
    }

    /// The attention around the `Softmax` node `softmax`, if it has the converter's unmasked shape.
    fn attention(&self, softmax: usize) -> Option<Matched> {
        let axis = self.nodes[softmax].ints.get("axis").map_or(-1, |a| a.first().copied().unwrap_or(-1));
        if !matches!(axis, -1 | 3) {
            return None;
        }
        // scores · scale → Softmax
        let mul = self.made_by(&self.nodes[softmax].inputs[0], "Mul")?;
        let [a, b] = &self.nodes[mul].inputs[..] else { return None };
        let (scores, scale) = match (self.scalar(a), self.scalar(b)) {
            (None, Some(s)) => (a, s),
            (Some(s), None) => (b, s),
            _ => return None,
        };
        // Q · Kᵀ, with Kᵀ = Transpose(K, [0, 1, 3, 2])
        let qk = self.made_by(scores, "MatMul")?;
        let [q_heads, k_t] = &self.nodes[qk].inputs[..] else { return None };
        let k_transpose = self.made_by(k_t, "Transpose")?;
        if !self.perm(k_transpose, &[0, 1, 3, 2]) {
            return None;
        }
        // P · V → Transpose([0, 2, 1, 3]) → Reshape([0, -1, hidden])
        let pv = self.read_by(softmax, "MatMul")?;
        let [p, v_heads] = &self.nodes[pv].inputs[..] else { return None };
        if p != &self.nodes[softmax].outputs[0] {
            return None;
        }
        let merge = self.read_by(pv, "Transpose")?;
        let out = self.read_by(merge, "Reshape")?;
        let (q, heads, head_dim, q_split) = self.split_heads(q_heads)?;
        let (k, k_h, k_d, k_split) = self.split_heads(&self.nodes[k_transpose].inputs[0])?;
        let (v, v_h, v_d, v_split) = self.split_heads(v_heads)?;
        let [_, hidden] = &self.nodes[out].inputs[..] else { return None };
        let same = (heads, head_dim) == (k_h, k_d) && (heads, head_dim) == (v_h, v_d);
        let merged = self.int64s(hidden).is_some_and(|s| s == [0, -1, heads * head_dim]);
        (same && merged && self.perm(merge, &[0, 2, 1, 3])).then(|| Matched {
            nodes: [q_split[0], q_split[1], k_split[0], k_split[1], v_split[0], v_split[1], k_transpose, qk, mul, softmax, pv, merge, out],
            q,
            k,
            v,
            heads,
            scale,
            output: self.nodes[out].outputs[0].clone(),
        })
    }
}

/// A model with one self-attention as the converter writes it, for tests here and in the worker
/// (which runs it in ONNX Runtime against its fusion).
#[cfg(any(test, feature = "testing"))]
pub mod fixtures {
    use crate::onnx::{Attr, DataType, Dim, Graph, Model, Node, OperatorSetId, Tensor, ValueInfo};

    /// Hidden size, heads and tokens of [`self_attention`].
    pub const HIDDEN: usize = 8;
    pub const HEADS: i64 = 2;
    pub const TOKENS: usize = 5;

    /// x \[1, TOKENS, HIDDEN\] → y = x + attention(x·wq, x·wk, x·wv) over [`HEADS`] heads, with the
    /// converter's nodes (`split_heads`, `attend`); with `mask`, an input added to the scores before
    /// the softmax (a shape the fusion must leave alone). ONNX opset 17 bytes.
    pub fn self_attention(mask: bool) -> Vec<u8> {
        let f32s = |v: Vec<f32>| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let i64s = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let weight = |seed: usize| f32s((0..HIDDEN * HIDDEN).map(|i| ((i * seed % 61) as f32 - 30.0) / 40.0).collect());
        let head_dim = HIDDEN as i64 / HEADS;
        let perm = |p: &[i64]| Attr::Ints(p.to_vec());
        let mut nodes = Vec::new();
        for (x, w) in [("q", "wq"), ("k", "wk"), ("v", "wv")] {
            nodes.push(Node::new("MatMul", &["x", w], &[x]));
            nodes.push(Node::new("Reshape", &[x, "split"], &[&format!("{x}r")]));
            nodes.push(Node::new("Transpose", &[&format!("{x}r")], &[&format!("{x}h")]).attr("perm", perm(&[0, 2, 1, 3])));
        }
        nodes.push(Node::new("Transpose", &["kh"], &["kt"]).attr("perm", perm(&[0, 1, 3, 2])));
        nodes.push(Node::new("MatMul", &["qh", "kt"], &["s"]));
        nodes.push(Node::new("Mul", &["s", "scale"], &["scaled"]));
        let scores = if mask {
            nodes.push(Node::new("Add", &["scaled", "mask"], &["masked"]));
            "masked"
        } else {
            "scaled"
        };
        nodes.push(Node::new("Softmax", &[scores], &["p"]).attr("axis", Attr::Int(-1)));
        nodes.push(Node::new("MatMul", &["p", "vh"], &["o"]));
        nodes.push(Node::new("Transpose", &["o"], &["ot"]).attr("perm", perm(&[0, 2, 1, 3])));
        nodes.push(Node::new("Reshape", &["ot", "merge"], &["a"]).named("merge_heads"));
        nodes.push(Node::new("Add", &["x", "a"], &["y"]));
        let mut initializers = vec![
            Tensor::raw("wq", vec![HIDDEN as i64; 2], DataType::Float, weight(7)),
            Tensor::raw("wk", vec![HIDDEN as i64; 2], DataType::Float, weight(11)),
            Tensor::raw("wv", vec![HIDDEN as i64; 2], DataType::Float, weight(13)),
            Tensor::raw("split", vec![4], DataType::Int64, i64s(&[0, -1, HEADS, head_dim])),
            Tensor::raw("merge", vec![3], DataType::Int64, i64s(&[0, -1, HIDDEN as i64])),
            Tensor::raw("scale", vec![], DataType::Float, f32s(vec![1.0 / (head_dim as f32).sqrt()])),
        ];
        if mask {
            let causal = (0..TOKENS * TOKENS).map(|i| if i % TOKENS > i / TOKENS { -1e9 } else { 0.0 }).collect();
            initializers.push(Tensor::raw("mask", vec![TOKENS as i64; 2], DataType::Float, f32s(causal)));
        }
        let info = |name: &str| ValueInfo::new(name, DataType::Float, [1, TOKENS, HIDDEN].map(|d| Dim::Value(d as i64)).to_vec());
        let graph = Graph { nodes, initializers, inputs: vec![info("x")], outputs: vec![info("y")], ..Graph::default() };
        Model { ir_version: 8, producer_name: "", graph, opset_import: vec![OperatorSetId { domain: "", version: 17 }] }.encode()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// (op type, domain) of each node, and the initializers' names.
    fn contents(model: &[u8]) -> (Vec<(String, String)>, Vec<String>) {
        let (mut ops, mut inits) = (Vec::new(), Vec::new());
        for f in Fields(onnx::graph_of(model).unwrap()) {
            match f.unwrap() {
                (graph::NODE, Field::Bytes(b), raw) => {
                    let n = parse_node(raw, b).unwrap();
                    ops.push((n.op_type, n.domain));
                }
                (graph::INITIALIZER, Field::Bytes(b), _) => inits.push(strings(b, tensor::NAME).unwrap().pop().unwrap()),
                _ => {}
            }
        }
        (ops, inits)
    }

    #[test]
    fn the_converters_attention_becomes_one_fused_node_in_its_place() {
        let (fused, n) = fuse_attention(&fixtures::self_attention(false)).unwrap();
        assert_eq!(n, 1);
        let (ops, inits) = contents(&fused);
        let ops: Vec<String> = ops.iter().map(|(op, domain)| format!("{domain}:{op}")).collect();
        assert_eq!(ops, [":MatMul", ":MatMul", ":MatMul", "com.microsoft:MultiHeadAttention", ":Add"]);
        // The shapes and the scale went with the chain; the weights stay.
        assert_eq!(inits, ["wq", "wk", "wv"]);
        let node = Fields(onnx::graph_of(&fused).unwrap())
            .filter_map(|f| match f.unwrap() {
                (graph::NODE, Field::Bytes(b), raw) => Some(parse_node(raw, b).unwrap()),
                _ => None,
            })
            .nth(3)
            .unwrap();
        assert_eq!(
            (node.inputs.as_slice(), node.outputs.as_slice()),
            (&["q".to_string(), "k".into(), "v".into()][..], &["a".to_string()][..])
        );
        assert_eq!(node.ints["num_heads"], [fixtures::HEADS]);
        assert_eq!(node.name, "merge_heads.fused_attention");
        // Fusing again finds nothing more.
        assert_eq!(fuse_attention(&fused).unwrap().1, 0);
    }

    #[test]
    fn the_scale_moves_from_the_scores_onto_the_queries() {
        for mask in [false, true] {
            let (moved, n) = scale_queries(&fixtures::self_attention(mask)).unwrap();
            assert_eq!(n, 1, "mask {mask}");
            let nodes: Vec<Node<'_>> = Fields(onnx::graph_of(&moved).unwrap())
                .filter_map(|f| match f.unwrap() {
                    (graph::NODE, Field::Bytes(b), raw) => Some(parse_node(raw, b).unwrap()),
                    _ => None,
                })
                .collect();
            let io = |n: &Node<'_>| format!("{} {:?} -> {:?}", n.op_type, n.inputs, n.outputs);
            let io: Vec<String> = nodes.iter().map(io).collect();
            // q is scaled where it is made; the scores' MatMul writes what the Mul after it wrote.
            assert_eq!(io[0], r#"MatMul ["x", "wq"] -> ["q.unscaled"]"#);
            assert_eq!(io[1], r#"Mul ["q.unscaled", "scale"] -> ["q"]"#);
            assert!(io.contains(&r#"MatMul ["qh", "kt"] -> ["scaled"]"#.to_string()), "{io:#?}");
            assert_eq!(nodes.iter().filter(|n| n.op_type == "Mul").count(), 1, "{io:#?}");
            assert_eq!(scale_queries(&moved).unwrap().1, 0, "moving again finds nothing");
        }
    }

    #[test]
    fn an_attention_with_a_mask_is_left_as_it_is() {
        let masked = fixtures::self_attention(true);
        let (out, n) = fuse_attention(&masked).unwrap();
        assert_eq!((n, out), (0, masked));
    }
}
