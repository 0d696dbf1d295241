//! A graph builder with the naming and constant rules of `whisper_onnx.py`'s `Graph`, so that the
//! same sequence of calls gives the same node and initializer names, in the same order.
//!
//! Every generated name is `{prefix}_{n}` from one counter: `c` for constants, the lower-cased op
//! type for op outputs. Float constants with more than [`FP16_ABOVE`] elements are stored as fp16
//! initializers (`c_n_fp16`) followed by a `Cast` to f32 named `c_n` (when the builder is in fp16
//! mode); everything else is stored as is.

use crate::onnx::{Attr, DataType, Graph, Model, Node, OperatorSetId, Tensor, ValueInfo, f16_to_f32, f32_to_f16};

/// Float arrays with more elements than this are stored as fp16 (in fp16 mode).
pub(crate) const FP16_ABOVE: usize = 1024;

/// ONNX opset and IR version of every converted model (opset 17 needs IR 8 or later; older ONNX
/// Runtime builds still load IR 8).
pub(crate) const OPSET: i64 = 17;
pub(crate) const IR_VERSION: i64 = 8;
pub(crate) const PRODUCER: &str = "heimdex-prepare";

#[derive(Debug)]
pub(crate) struct Builder {
    nodes: Vec<Node>,
    inits: Vec<Tensor>,
    /// The naming counter shared by constants and op outputs.
    n: u32,
    /// Whether large float constants are stored as fp16 + Cast.
    fp16: bool,
}

impl Builder {
    pub fn new(fp16: bool) -> Self {
        Self { nodes: Vec::new(), inits: Vec::new(), n: 0, fp16 }
    }

    pub fn name(&mut self, prefix: &str) -> String {
        self.n += 1;
        format!("{prefix}_{}", self.n)
    }

    /// A float constant of shape `dims` (row-major `data`); returns the name that holds it as f32.
    pub fn const_f32(&mut self, dims: &[usize], data: &[f32]) -> String {
        let name = self.name("c");
        let dims: Vec<i64> = dims.iter().map(|d| *d as i64).collect();
        if self.fp16 && data.len() > FP16_ABOVE {
            let raw: Vec<u8> = data.iter().flat_map(|v| f32_to_f16(*v).to_le_bytes()).collect();
            self.push_fp16(&name, dims, raw);
            return name;
        }
        let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.inits.push(Tensor::raw(name.clone(), dims, DataType::Float, raw));
        name
    }

    /// A float constant given as f16 bytes. Stored as they are when [`Builder::const_f32`] would store
    /// it as fp16 (f16 -> f32 -> f16 is the identity, so this is the same output without the f32
    /// copy: it keeps Whisper's 26M-value embedding from costing 100 MB more); else widened.
    pub fn const_f16_bytes(&mut self, dims: &[usize], bytes: &[u8]) -> String {
        let len = bytes.len() / 2;
        if !(self.fp16 && len > FP16_ABOVE) {
            let data: Vec<f32> = bytes.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect();
            return self.const_f32(dims, &data);
        }
        let name = self.name("c");
        self.push_fp16(&name, dims.iter().map(|d| *d as i64).collect(), bytes.to_vec());
        name
    }

    /// The fp16 initializer `{name}_fp16` and the `Cast` that makes it the f32 `name`.
    fn push_fp16(&mut self, name: &str, dims: Vec<i64>, raw: Vec<u8>) {
        let stored = format!("{name}_fp16");
        self.inits.push(Tensor::raw(stored.clone(), dims, DataType::Float16, raw));
        self.nodes.push(Node::new("Cast", &[&stored], &[name]).attr("to", Attr::Int(DataType::Float as i64)));
    }

    /// A 0-d f32 constant.
    pub fn scalar_f32(&mut self, v: f32) -> String {
        self.const_f32(&[], &[v])
    }

    /// An int64 constant of shape `dims`.
    pub fn const_i64(&mut self, dims: &[usize], vals: &[i64]) -> String {
        let name = self.name("c");
        let raw: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let dims = dims.iter().map(|d| *d as i64).collect();
        self.inits.push(Tensor::raw(name.clone(), dims, DataType::Int64, raw));
        name
    }

    /// A 1-d int64 constant (`g.i64(*vals)`).
    pub fn i64s(&mut self, vals: &[i64]) -> String {
        self.const_i64(&[vals.len()], vals)
    }

    /// A 0-d int64 constant (a 0-d index makes a 0-d `Gather` output).
    pub fn scalar_i64(&mut self, v: i64) -> String {
        self.const_i64(&[], &[v])
    }

    /// Adds an op whose output gets a generated name; returns it.
    /// The erf GELU, `x * (erf(x / sqrt 2) + 1) * 0.5`, in the node order PyTorch exports it (BERT's
    /// and Whisper's activation).
    pub fn gelu(&mut self, x: &str) -> String {
        let c = self.scalar_f32(std::f64::consts::SQRT_2 as f32);
        let div = self.op("Div", &[x, &c], vec![]);
        let e = self.op("Erf", &[&div], vec![]);
        let one = self.scalar_f32(1.0);
        let add = self.op("Add", &[&e, &one], vec![]);
        let mul = self.op("Mul", &[x, &add], vec![]);
        let half = self.scalar_f32(0.5);
        self.op("Mul", &[&mul, &half], vec![])
    }

    pub fn op(&mut self, op_type: &'static str, inputs: &[&str], attrs: Vec<(&'static str, Attr)>) -> String {
        let out = self.name(&op_type.to_lowercase());
        self.op_to(op_type, inputs, &out, attrs)
    }

    /// Adds an op with a fixed output name (a graph output or a cache tensor); returns it. Its
    /// attributes are sorted by name, as `helper.make_node` does.
    pub fn op_to(&mut self, op_type: &'static str, inputs: &[&str], out: &str, mut attrs: Vec<(&'static str, Attr)>) -> String {
        attrs.sort_by(|a, b| a.0.cmp(b.0));
        self.nodes.push(Node { attrs, ..Node::new(op_type, inputs, &[out]) });
        out.to_string()
    }

    /// The finished model.
    pub fn model(self, graph_name: &str, inputs: Vec<ValueInfo>, outputs: Vec<ValueInfo>) -> Model {
        Model {
            ir_version: IR_VERSION,
            producer_name: PRODUCER,
            graph: Graph {
                name: graph_name.to_string(),
                nodes: self.nodes,
                initializers: self.inits,
                inputs,
                outputs,
                value_info: Vec::new(),
            },
            opset_import: vec![OperatorSetId { domain: "", version: OPSET }],
        }
    }
}

/// Shorthand for an int attribute.
pub(crate) fn int(v: i64) -> Attr {
    Attr::Int(v)
}

/// Shorthand for an ints attribute.
pub(crate) fn ints(v: &[i64]) -> Attr {
    Attr::Ints(v.to_vec())
}
