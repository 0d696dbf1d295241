//! A minimal ONNX `ModelProto` writer: just the messages and fields the converters use.
//!
//! Why hand-written: the converters must produce the bytes Python's `onnx` package produces for the
//! same graph (the catalog pins the outputs' sha256, and the bundle was built with Python), and that
//! needs control over every byte. It also keeps a protobuf code generator out of the build.
//!
//! The encoding follows Python protobuf's `SerializeToString` for `onnx.proto` (proto2): fields in
//! field-number order, only fields that were set, `repeated int64` unpacked (dims, attribute ints),
//! `float_data` packed. Large tensor payloads are kept as separate chunks and streamed to the file, so
//! a model is never copied into one buffer.

use std::io::{self, Write};

use crate::proto::put_varint as varint;

/// `TensorProto.DataType` values used here.
pub(crate) const FLOAT: i32 = 1;
pub(crate) const INT64: i32 = 7;
pub(crate) const FLOAT16: i32 = 10;

const VARINT: u32 = 0;
const FIXED32: u32 = 5;
const LEN: u32 = 2;

fn key(buf: &mut Vec<u8>, field: u32, wire: u32) {
    varint(buf, u64::from((field << 3) | wire));
}

fn int_field(buf: &mut Vec<u8>, field: u32, v: i64) {
    key(buf, field, VARINT);
    // protobuf writes a negative int64 as its two's complement: ten bytes.
    varint(buf, v as u64);
}

fn bytes_field(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(buf, field, LEN);
    varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// A tensor (an initializer, or an attribute value) with its data already little-endian bytes.
#[derive(Debug, Clone)]
pub(crate) struct Tensor {
    pub name: String,
    pub dims: Vec<i64>,
    pub data_type: i32,
    pub data: TensorData,
}

/// How a tensor's values are stored: `raw_data` (what `numpy_helper.from_array` writes) or the typed
/// `float_data` field (what `helper.make_tensor` writes when not asked for raw).
#[derive(Debug, Clone)]
pub(crate) enum TensorData {
    Raw(Vec<u8>),
    Floats(Vec<f32>),
}

impl Tensor {
    /// `TensorProto` bytes without its payload, and the payload's field bytes, in field order
    /// (dims 1, data_type 2, float_data 4, name 8, raw_data 9). Returned as chunks so that a large
    /// `raw_data` is not copied.
    fn encode(self) -> Vec<Vec<u8>> {
        let mut head = Vec::with_capacity(64 + self.name.len());
        for d in &self.dims {
            int_field(&mut head, 1, *d);
        }
        int_field(&mut head, 2, i64::from(self.data_type));
        match self.data {
            TensorData::Floats(values) => {
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                bytes_field(&mut head, 4, &bytes);
                bytes_field(&mut head, 8, self.name.as_bytes());
                vec![head]
            }
            TensorData::Raw(raw) => {
                bytes_field(&mut head, 8, self.name.as_bytes());
                key(&mut head, 9, LEN);
                varint(&mut head, raw.len() as u64);
                vec![head, raw]
            }
        }
    }
}

/// An attribute value; the kinds the converters use.
#[derive(Debug, Clone)]
pub(crate) enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
    Tensor(Tensor),
}

/// A graph node. `helper.make_node` leaves `name` and `domain` unset and sorts attributes by name;
/// [`Node::encode`] does the same.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub op_type: &'static str,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attrs: Vec<(&'static str, Attr)>,
}

impl Node {
    fn encode(mut self) -> Vec<u8> {
        let mut buf = Vec::new();
        for i in &self.inputs {
            bytes_field(&mut buf, 1, i.as_bytes());
        }
        for o in &self.outputs {
            bytes_field(&mut buf, 2, o.as_bytes());
        }
        bytes_field(&mut buf, 4, self.op_type.as_bytes());
        self.attrs.sort_by(|a, b| a.0.cmp(b.0));
        for (name, value) in self.attrs {
            let mut a = Vec::new();
            bytes_field(&mut a, 1, name.as_bytes());
            // AttributeProto.type: FLOAT 1, INT 2, TENSOR 4, INTS 7 (field 20, after the value).
            let kind = match value {
                Attr::Float(f) => {
                    key(&mut a, 2, FIXED32);
                    a.extend_from_slice(&f.to_le_bytes());
                    1
                }
                Attr::Int(i) => {
                    int_field(&mut a, 3, i);
                    2
                }
                Attr::Tensor(t) => {
                    let bytes = t.encode().concat();
                    bytes_field(&mut a, 5, &bytes);
                    4
                }
                Attr::Ints(ints) => {
                    for i in ints {
                        int_field(&mut a, 8, i);
                    }
                    7
                }
            };
            int_field(&mut a, 20, kind);
            bytes_field(&mut buf, 5, &a);
        }
        buf
    }
}

/// One dimension of a graph input's or output's shape.
#[derive(Debug, Clone)]
pub(crate) enum Dim {
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

/// A graph input or output: `helper.make_tensor_value_info(name, elem_type, shape)`.
#[derive(Debug, Clone)]
pub(crate) struct ValueInfo {
    pub name: String,
    pub elem_type: i32,
    pub shape: Vec<Dim>,
}

impl ValueInfo {
    pub fn new(name: impl Into<String>, elem_type: i32, shape: Vec<Dim>) -> Self {
        Self { name: name.into(), elem_type, shape }
    }

    fn encode(&self) -> Vec<u8> {
        let mut shape = Vec::new();
        for d in &self.shape {
            let mut dim = Vec::new();
            match d {
                Dim::Value(v) => int_field(&mut dim, 1, *v),
                Dim::Param(p) => bytes_field(&mut dim, 2, p.as_bytes()),
            }
            bytes_field(&mut shape, 1, &dim);
        }
        let mut tensor_type = Vec::new();
        int_field(&mut tensor_type, 1, i64::from(self.elem_type));
        bytes_field(&mut tensor_type, 2, &shape);
        let mut type_proto = Vec::new();
        bytes_field(&mut type_proto, 1, &tensor_type);
        let mut buf = Vec::new();
        bytes_field(&mut buf, 1, self.name.as_bytes());
        bytes_field(&mut buf, 2, &type_proto);
        buf
    }
}

/// A whole model: one graph, the default-domain opset, IR version and producer name.
#[derive(Debug)]
pub(crate) struct Model {
    pub ir_version: i64,
    pub opset: i64,
    pub producer_name: &'static str,
    pub graph_name: String,
    pub nodes: Vec<Node>,
    pub initializers: Vec<Tensor>,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
}

impl Model {
    /// Serialises the model into `w`. Consumes it, so each initializer's payload is moved into the
    /// output chunks instead of copied.
    ///
    /// # Errors
    /// Writing to `w` failed.
    pub fn write_to(self, w: &mut impl Write) -> io::Result<()> {
        // GraphProto fields in number order: node 1, name 2, initializer 5, input 11, output 12.
        let mut graph: Vec<Vec<u8>> = Vec::new();
        let mut nodes = Vec::new();
        for n in self.nodes {
            bytes_field(&mut nodes, 1, &n.encode());
        }
        bytes_field(&mut nodes, 2, self.graph_name.as_bytes());
        graph.push(nodes);
        for t in self.initializers {
            let chunks = t.encode();
            let len: usize = chunks.iter().map(Vec::len).sum();
            let mut head = Vec::new();
            key(&mut head, 5, LEN);
            varint(&mut head, len as u64);
            graph.push(head);
            graph.extend(chunks);
        }
        let mut tail = Vec::new();
        for i in &self.inputs {
            bytes_field(&mut tail, 11, &i.encode());
        }
        for o in &self.outputs {
            bytes_field(&mut tail, 12, &o.encode());
        }
        graph.push(tail);
        let graph_len: usize = graph.iter().map(Vec::len).sum();

        // ModelProto: ir_version 1, producer_name 2, graph 7, opset_import 8.
        let mut head = Vec::new();
        int_field(&mut head, 1, self.ir_version);
        bytes_field(&mut head, 2, self.producer_name.as_bytes());
        key(&mut head, 7, LEN);
        varint(&mut head, graph_len as u64);
        w.write_all(&head)?;
        for chunk in graph {
            w.write_all(&chunk)?;
        }
        let mut opset = Vec::new();
        bytes_field(&mut opset, 1, b""); // domain "" is set explicitly by make_opsetid
        int_field(&mut opset, 2, self.opset);
        let mut tail = Vec::new();
        bytes_field(&mut tail, 8, &opset);
        w.write_all(&tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_ints_take_ten_bytes() {
        let mut buf = Vec::new();
        int_field(&mut buf, 3, -1);
        assert_eq!(buf, [0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
    }
}
