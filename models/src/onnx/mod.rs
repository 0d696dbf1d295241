//! The ONNX file format, as far as Heimdex reads and writes it: the one place that knows its field
//! numbers ([`model`], [`graph`], [`node`], ... one module per message of `onnx.proto`), its element
//! types ([`DataType`]), the protobuf wire format ([`wire`]: one reader, the writer's primitives), the
//! typed messages the converters, the int8 rewrite and the tests write ([`mod@write`]), the rewrites'
//! reader of a graph's nodes ([`nodes`]), and IEEE half floats ([`half`]).
//!
//! Why hand-written rather than generated: the writer must produce exactly the bytes Python's `onnx`
//! package does (the catalog pins the converted files' sha256, and the offline bundle was built in
//! Python); the in-memory rewrites at load ([`crate::carve`], [`crate::quantize`], [`crate::shapes`])
//! copy every field they do not touch byte for byte, which a decode-and-re-encode would not; large
//! tensor payloads are streamed to the file rather than copied into one buffer; and no protobuf code
//! generator joins the build. Only the messages and fields those uses need are named here.

pub mod half;
pub mod nodes;
pub mod wire;
pub mod write;

pub use half::{f16_to_f32, f32_to_f16};
pub use wire::{Field, Fields, Malformed};
pub use write::{Attr, Dim, Graph, Model, Node, OperatorSetId, Tensor, TensorData, ValueInfo};

/// `TensorProto.DataType`: the element types used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum DataType {
    Float = 1,
    Uint8 = 2,
    Int8 = 3,
    Int32 = 6,
    Int64 = 7,
    Float16 = 10,
}

impl DataType {
    /// The type a `data_type` or `elem_type` field holds, if it is one of these.
    pub fn from_wire(v: u64) -> Option<Self> {
        [Self::Float, Self::Uint8, Self::Int8, Self::Int32, Self::Int64, Self::Float16].into_iter().find(|t| *t as u64 == v)
    }
}

/// `ModelProto` field numbers.
pub mod model {
    pub const IR_VERSION: u64 = 1;
    pub const PRODUCER_NAME: u64 = 2;
    pub const GRAPH: u64 = 7;
    pub const OPSET_IMPORT: u64 = 8;
}

/// `OperatorSetIdProto` field numbers.
pub mod opset {
    pub const DOMAIN: u64 = 1;
    pub const VERSION: u64 = 2;
}

/// The graph of an ONNX model (its `ModelProto.graph`; the last one, as protobuf reads a field that
/// comes twice).
///
/// # Errors
/// The bytes are malformed, or they hold no graph.
pub fn graph_of(model: &[u8]) -> Result<&[u8], Malformed> {
    let mut graph = None;
    for f in Fields(model) {
        if let (model::GRAPH, Field::Bytes(b), _) = f? {
            graph = Some(b);
        }
    }
    graph.ok_or(Malformed("no graph"))
}

/// `model` with `graph` as its graph: every other field copied byte for byte, in its place. The one
/// way the load-time rewrites write their graph back into the model.
///
/// # Errors
/// The model's bytes are malformed.
pub fn with_graph(model: &[u8], graph: &[u8]) -> Result<Vec<u8>, Malformed> {
    let mut out = Vec::with_capacity(model.len().max(graph.len()) + 64);
    for f in Fields(model) {
        match f? {
            (model::GRAPH, _, _) => wire::put_bytes(&mut out, model::GRAPH, graph),
            (_, _, raw) => out.extend_from_slice(raw),
        }
    }
    Ok(out)
}

/// `GraphProto` field numbers.
pub mod graph {
    pub const NODE: u64 = 1;
    pub const NAME: u64 = 2;
    pub const INITIALIZER: u64 = 5;
    pub const INPUT: u64 = 11;
    pub const OUTPUT: u64 = 12;
    pub const VALUE_INFO: u64 = 13;
}

/// `NodeProto` field numbers.
pub mod node {
    pub const INPUT: u64 = 1;
    pub const OUTPUT: u64 = 2;
    pub const NAME: u64 = 3;
    pub const OP_TYPE: u64 = 4;
    pub const ATTRIBUTE: u64 = 5;
    pub const DOMAIN: u64 = 7;
}

/// `AttributeProto` field numbers, and the values of its `type` field.
pub mod attr {
    pub const NAME: u64 = 1;
    pub const F: u64 = 2;
    pub const I: u64 = 3;
    pub const T: u64 = 5;
    pub const G: u64 = 6;
    pub const INTS: u64 = 8;
    pub const GRAPHS: u64 = 11;
    pub const TYPE: u64 = 20;

    /// `AttributeProto.AttributeType`.
    pub mod kind {
        pub const FLOAT: i64 = 1;
        pub const INT: i64 = 2;
        pub const TENSOR: i64 = 4;
        pub const GRAPH: i64 = 5;
        pub const INTS: i64 = 7;
    }
}

/// `TensorProto` field numbers.
pub mod tensor {
    pub const DIMS: u64 = 1;
    pub const DATA_TYPE: u64 = 2;
    pub const FLOAT_DATA: u64 = 4;
    pub const INT32_DATA: u64 = 5;
    pub const NAME: u64 = 8;
    pub const RAW_DATA: u64 = 9;
    pub const DATA_LOCATION: u64 = 14;
}

/// `ValueInfoProto` field numbers.
pub mod value_info {
    pub const NAME: u64 = 1;
    pub const TYPE: u64 = 2;
}

/// `TypeProto` field numbers.
pub mod type_proto {
    pub const TENSOR_TYPE: u64 = 1;
}

/// `TypeProto.Tensor` field numbers.
pub mod tensor_type {
    pub const ELEM_TYPE: u64 = 1;
    pub const SHAPE: u64 = 2;
}

/// `TensorShapeProto` field numbers.
pub mod shape {
    pub const DIM: u64 = 1;
}

/// `TensorShapeProto.Dimension` field numbers.
pub mod dim {
    pub const VALUE: u64 = 1;
    pub const PARAM: u64 = 2;
}
