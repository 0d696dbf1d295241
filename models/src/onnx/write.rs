//! The ONNX writer: typed messages ([`Model`], [`Graph`], [`Node`], [`Attr`], [`Tensor`],
//! [`ValueInfo`], [`Dim`], [`OperatorSetId`]) that encode themselves. The converters build whole
//! models with them; the int8 rewrite builds the nodes and initializers it adds, and the tests their
//! fixtures.
//!
//! The encoding follows Python protobuf's `SerializeToString` for `onnx.proto` (proto2), so a model
//! built here has the bytes `onnx` gives for the same model: fields in field-number order, only fields
//! that were set (an empty name, domain or producer is unset; `OperatorSetId::domain` is always set,
//! as `helper.make_opsetid` does), `repeated int64` unpacked (dims, attribute ints), `float_data`
//! packed. Attributes are written in the order given (the converters sort them by name, as
//! `helper.make_node` does). A tensor's `raw_data` is kept as its own chunk, moved and not copied, and
//! [`Model::write_to`] streams the chunks to the file, so a model is never copied into one buffer.

use std::io::{self, Write};

use super::wire::{put_bytes, put_f32, put_int, put_len};
use super::{DataType, attr, dim, graph, model, node, opset, shape, tensor, tensor_type, type_proto, value_info};

/// A tensor (an initializer, or an attribute value) with its data already little-endian bytes.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub name: String,
    pub dims: Vec<i64>,
    pub data_type: DataType,
    pub data: TensorData,
}

/// How a tensor's values are stored: `raw_data` (what `numpy_helper.from_array` writes) or the typed
/// `float_data` field (what `helper.make_tensor` writes when not asked for raw).
#[derive(Debug, Clone)]
pub enum TensorData {
    Raw(Vec<u8>),
    Floats(Vec<f32>),
}

impl Tensor {
    /// A tensor stored as `raw_data`.
    pub fn raw(name: impl Into<String>, dims: Vec<i64>, data_type: DataType, raw: Vec<u8>) -> Self {
        Self { name: name.into(), dims, data_type, data: TensorData::Raw(raw) }
    }

    /// `TensorProto` bytes without its payload, and the payload, in field order (dims, data_type,
    /// float_data, name, raw_data). Two chunks so that a large `raw_data` is not copied.
    fn chunks(self) -> [Vec<u8>; 2] {
        let mut head = Vec::with_capacity(64 + self.name.len());
        for d in &self.dims {
            put_int(&mut head, tensor::DIMS, *d);
        }
        put_int(&mut head, tensor::DATA_TYPE, self.data_type as i64);
        match self.data {
            TensorData::Floats(values) => {
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                put_bytes(&mut head, tensor::FLOAT_DATA, &bytes);
                put_bytes(&mut head, tensor::NAME, self.name.as_bytes());
                [head, Vec::new()]
            }
            TensorData::Raw(raw) => {
                put_bytes(&mut head, tensor::NAME, self.name.as_bytes());
                put_len(&mut head, tensor::RAW_DATA, raw.len());
                [head, raw]
            }
        }
    }

    /// Appends the tensor as field `field` of the message in `out`.
    pub fn put(self, out: &mut Vec<u8>, field: u64) {
        let [head, payload] = self.chunks();
        put_len(out, field, head.len() + payload.len());
        out.extend_from_slice(&head);
        out.extend_from_slice(&payload);
    }
}

/// An attribute value; the kinds used here.
#[derive(Debug, Clone)]
pub enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
    Tensor(Tensor),
    Graph(Graph),
}

impl Attr {
    /// `AttributeProto` bytes: name, the value, then its type (field 20).
    fn encode(self, name: &str) -> Vec<u8> {
        let mut a = Vec::new();
        put_bytes(&mut a, attr::NAME, name.as_bytes());
        let kind = match self {
            Attr::Float(f) => {
                put_f32(&mut a, attr::F, f);
                attr::kind::FLOAT
            }
            Attr::Int(i) => {
                put_int(&mut a, attr::I, i);
                attr::kind::INT
            }
            Attr::Tensor(t) => {
                t.put(&mut a, attr::T);
                attr::kind::TENSOR
            }
            Attr::Graph(g) => {
                put_bytes(&mut a, attr::G, &g.encode());
                attr::kind::GRAPH
            }
            Attr::Ints(ints) => {
                for i in ints {
                    put_int(&mut a, attr::INTS, i);
                }
                attr::kind::INTS
            }
        };
        put_int(&mut a, attr::TYPE, kind);
        a
    }
}

/// A graph node. An empty `name` or `domain` is unset (what `helper.make_node` leaves them).
#[derive(Debug, Clone, Default)]
pub struct Node {
    pub name: String,
    pub op_type: &'static str,
    pub domain: &'static str,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    /// Written in this order.
    pub attrs: Vec<(&'static str, Attr)>,
}

impl Node {
    /// An unnamed node of the default domain without attributes.
    pub fn new(op_type: &'static str, inputs: &[&str], outputs: &[&str]) -> Self {
        let strings = |v: &[&str]| v.iter().map(|s| (*s).to_string()).collect();
        Self { op_type, inputs: strings(inputs), outputs: strings(outputs), ..Self::default() }
    }

    /// The node with `name`.
    #[must_use]
    pub fn named(self, name: impl Into<String>) -> Self {
        Self { name: name.into(), ..self }
    }

    /// The node in operator domain `domain`.
    #[must_use]
    pub fn in_domain(self, domain: &'static str) -> Self {
        Self { domain, ..self }
    }

    /// The node with attribute `name` added after the others.
    #[must_use]
    pub fn attr(mut self, name: &'static str, value: Attr) -> Self {
        self.attrs.push((name, value));
        self
    }

    /// `NodeProto` bytes.
    pub fn encode(self) -> Vec<u8> {
        let mut buf = Vec::new();
        for i in &self.inputs {
            put_bytes(&mut buf, node::INPUT, i.as_bytes());
        }
        for o in &self.outputs {
            put_bytes(&mut buf, node::OUTPUT, o.as_bytes());
        }
        if !self.name.is_empty() {
            put_bytes(&mut buf, node::NAME, self.name.as_bytes());
        }
        put_bytes(&mut buf, node::OP_TYPE, self.op_type.as_bytes());
        for (name, value) in self.attrs {
            put_bytes(&mut buf, node::ATTRIBUTE, &value.encode(name));
        }
        if !self.domain.is_empty() {
            put_bytes(&mut buf, node::DOMAIN, self.domain.as_bytes());
        }
        buf
    }
}

/// One dimension of a declared shape.
#[derive(Debug, Clone)]
pub enum Dim {
    Value(i64),
    Param(String),
}

impl From<i64> for Dim {
    fn from(v: i64) -> Self {
        Dim::Value(v)
    }
}

impl From<&str> for Dim {
    fn from(v: &str) -> Self {
        Dim::Param(v.to_string())
    }
}

impl Dim {
    /// `TensorShapeProto.Dimension` bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        match self {
            Dim::Value(v) => put_int(&mut buf, dim::VALUE, *v),
            Dim::Param(p) => put_bytes(&mut buf, dim::PARAM, p.as_bytes()),
        }
        buf
    }
}

/// A graph input, output or intermediate value: `helper.make_tensor_value_info(name, elem_type,
/// shape)`, where a `None` shape declares none.
#[derive(Debug, Clone)]
pub struct ValueInfo {
    pub name: String,
    pub elem_type: DataType,
    pub shape: Option<Vec<Dim>>,
}

impl ValueInfo {
    /// A tensor value of `shape`.
    pub fn new(name: impl Into<String>, elem_type: DataType, shape: Vec<Dim>) -> Self {
        Self { name: name.into(), elem_type, shape: Some(shape) }
    }

    /// `ValueInfoProto` bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut tensor = Vec::new();
        put_int(&mut tensor, tensor_type::ELEM_TYPE, self.elem_type as i64);
        if let Some(dims) = &self.shape {
            let mut s = Vec::new();
            for d in dims {
                put_bytes(&mut s, shape::DIM, &d.encode());
            }
            put_bytes(&mut tensor, tensor_type::SHAPE, &s);
        }
        let mut ty = Vec::new();
        put_bytes(&mut ty, type_proto::TENSOR_TYPE, &tensor);
        let mut buf = Vec::new();
        put_bytes(&mut buf, value_info::NAME, self.name.as_bytes());
        put_bytes(&mut buf, value_info::TYPE, &ty);
        buf
    }
}

/// A graph. An empty `name` is unset.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub name: String,
    pub nodes: Vec<Node>,
    pub initializers: Vec<Tensor>,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    pub value_info: Vec<ValueInfo>,
}

impl Graph {
    /// `GraphProto` bytes as chunks in field order (node, name, initializer, input, output,
    /// value_info); each initializer's payload is its own chunk, moved and not copied.
    fn chunks(self) -> Vec<Vec<u8>> {
        let mut chunks = Vec::with_capacity(2 * self.initializers.len() + 2);
        let mut head = Vec::new();
        for n in self.nodes {
            put_bytes(&mut head, graph::NODE, &n.encode());
        }
        if !self.name.is_empty() {
            put_bytes(&mut head, graph::NAME, self.name.as_bytes());
        }
        for t in self.initializers {
            let [tensor, payload] = t.chunks();
            put_len(&mut head, graph::INITIALIZER, tensor.len() + payload.len());
            chunks.push(std::mem::take(&mut head));
            chunks.push(tensor);
            chunks.push(payload);
        }
        for (field, infos) in [(graph::INPUT, &self.inputs), (graph::OUTPUT, &self.outputs), (graph::VALUE_INFO, &self.value_info)] {
            for i in infos {
                put_bytes(&mut head, field, &i.encode());
            }
        }
        chunks.push(head);
        chunks
    }

    /// `GraphProto` bytes.
    pub fn encode(self) -> Vec<u8> {
        self.chunks().concat()
    }
}

/// An operator set a model imports. Its domain is always written, even when empty (the default
/// domain), as `helper.make_opsetid` does.
#[derive(Debug, Clone)]
pub struct OperatorSetId {
    pub domain: &'static str,
    pub version: i64,
}

impl OperatorSetId {
    /// `OperatorSetIdProto` bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        put_bytes(&mut buf, opset::DOMAIN, self.domain.as_bytes());
        put_int(&mut buf, opset::VERSION, self.version);
        buf
    }
}

/// A whole model. An empty `producer_name` is unset.
#[derive(Debug, Clone)]
pub struct Model {
    pub ir_version: i64,
    pub producer_name: &'static str,
    pub graph: Graph,
    pub opset_import: Vec<OperatorSetId>,
}

impl Model {
    /// Serialises the model into `w`. Consumes it, so each initializer's payload is moved into the
    /// output chunks instead of copied.
    ///
    /// # Errors
    /// Writing to `w` failed.
    pub fn write_to(self, w: &mut impl Write) -> io::Result<()> {
        let graph = self.graph.chunks();
        let mut head = Vec::new();
        put_int(&mut head, model::IR_VERSION, self.ir_version);
        if !self.producer_name.is_empty() {
            put_bytes(&mut head, model::PRODUCER_NAME, self.producer_name.as_bytes());
        }
        put_len(&mut head, model::GRAPH, graph.iter().map(Vec::len).sum());
        w.write_all(&head)?;
        for chunk in graph {
            w.write_all(&chunk)?;
        }
        let mut tail = Vec::new();
        for o in &self.opset_import {
            put_bytes(&mut tail, model::OPSET_IMPORT, &o.encode());
        }
        w.write_all(&tail)
    }

    /// `ModelProto` bytes (for a model held in memory, such as a test's).
    pub fn encode(self) -> Vec<u8> {
        let mut buf = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = self.write_to(&mut buf);
        buf
    }
}
