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

/// `TensorProto.DataType` values used here.
pub(crate) const FLOAT: i32 = 1;
pub(crate) const INT64: i32 = 7;
pub(crate) const FLOAT16: i32 = 10;

const VARINT: u32 = 0;
const FIXED32: u32 = 5;
const LEN: u32 = 2;

fn varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

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

/// f32 to IEEE half, rounding to nearest even (as numpy's `astype(float16)`).
pub(crate) fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x007f_ffff;
    if exp == 0xff {
        // Infinity, or NaN with its payload's top bits (kept non-zero), as numpy does.
        let h = 0x7c00 | (man >> 13) as u16;
        return sign | if man != 0 && h == 0x7c00 { h + 1 } else { h };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        // Subnormal half: value = r * 2^-24, with the implicit bit made explicit.
        let m = man | 0x0080_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let mut r = m >> shift;
        let rem = m & ((1u32 << shift) - 1);
        if rem > half || (rem == half && r & 1 == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut h = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    // A carry out of the mantissa steps the exponent, up to infinity: what rounding should do.
    if rem > 0x1000 || (rem == 0x1000 && h & 1 == 1) {
        h += 1;
    }
    sign | h as u16
}

/// IEEE half to f32 (exact).
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x03ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: normalise the mantissa.
            let mut e: i32 = -14;
            let mut m = man;
            while m & 0x0400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | (((e + 127) as u32) << 23) | ((m & 0x03ff) << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_round_trips_every_value_nan_payloads_included() {
        for h in 0..=u16::MAX {
            assert_eq!(f32_to_f16(f16_to_f32(h)), h, "{h:#06x}");
        }
    }

    #[test]
    fn half_rounds_to_nearest_even() {
        // 1 + 2^-11 is halfway between 1 and the next half (1 + 2^-10): ties to the even one, 1.
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3c00);
        // 1 + 3 * 2^-11 is halfway between 1 + 2^-10 (odd) and 1 + 2^-9: ties up.
        assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
        assert_eq!(f32_to_f16(65520.0), 0x7c00);
        assert_eq!(f32_to_f16(2f32.powi(-25)), 0);
        assert_eq!(f32_to_f16(2f32.powi(-25) * 1.5), 1);
    }

    #[test]
    fn negative_ints_take_ten_bytes() {
        let mut buf = Vec::new();
        int_field(&mut buf, 3, -1);
        assert_eq!(buf, [0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
    }
}
