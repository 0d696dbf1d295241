//! Frees the fixed spatial size of a fully convolutional model, in memory at load.
//!
//! Why: YuNet is exported for a 640×640 input, so a 16:9 frame letterboxed into it spends 44 % of
//! the detector's work on padding. Its graph has nothing tied to that size (convolutions, pooling,
//! ×2 resizes by scale, reshapes to `[1, -1, k]`), which is how OpenCV runs it at any size that is a
//! multiple of 32. ONNX Runtime checks inputs against the declared shape, so the declared shapes are
//! what changes: the named input's chosen dimensions become symbolic, and the graph outputs and
//! intermediate values lose their declared shapes (ONNX Runtime infers them per run). Everything
//! else is copied byte for byte.

use crate::onnx::wire::{Field, Fields, Malformed, put_bytes, text};
use crate::onnx::{Dim, graph, model, shape, tensor_type, type_proto, value_info};

/// Why a model's shapes could not be freed.
#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    #[error(transparent)]
    Malformed(#[from] Malformed),
    #[error("the model has no graph input")]
    NoInput,
    #[error("graph input {input} has {rank} dimensions; dimension {dim} cannot be freed")]
    Rank { input: String, rank: usize, dim: usize },
}

/// `model` with dimensions `dims` of its first graph input made symbolic (named `{input}_{dim}`), no
/// declared output shapes and no intermediate value infos, as ONNX bytes.
///
/// # Errors
/// The bytes are not an ONNX model, it has no input, or its first input has fewer dimensions.
pub fn free_input_dims(model: &[u8], dims: &[usize]) -> Result<Vec<u8>, ShapeError> {
    let (mut out, mut graphs) = (Vec::with_capacity(model.len()), 0);
    for f in Fields(model) {
        match f? {
            (model::GRAPH, Field::Bytes(graph), _) => {
                graphs += 1;
                put_bytes(&mut out, model::GRAPH, &graph_with(graph, dims)?);
            }
            (_, _, raw) => out.extend_from_slice(raw),
        }
    }
    if graphs == 1 { Ok(out) } else { Err(Malformed("not exactly one graph").into()) }
}

fn graph_with(graph: &[u8], dims: &[usize]) -> Result<Vec<u8>, ShapeError> {
    let (mut out, mut found) = (Vec::with_capacity(graph.len()), false);
    for f in Fields(graph) {
        match f? {
            (graph::INPUT, Field::Bytes(info), raw) => {
                if found {
                    out.extend_from_slice(raw);
                } else {
                    found = true;
                    let input = name_of(info)?;
                    put_bytes(&mut out, graph::INPUT, &retype(info, |t| tensor_type(t, &input, dims))?);
                }
            }
            (graph::OUTPUT, Field::Bytes(info), _) => put_bytes(&mut out, graph::OUTPUT, &retype(info, drop_shape)?),
            (graph::VALUE_INFO, _, _) => {}
            (_, _, raw) => out.extend_from_slice(raw),
        }
    }
    if found { Ok(out) } else { Err(ShapeError::NoInput) }
}

fn name_of(info: &[u8]) -> Result<String, Malformed> {
    for f in Fields(info) {
        if let (value_info::NAME, Field::Bytes(b), _) = f? {
            return Ok(text(b));
        }
    }
    Ok(String::new())
}

/// A `ValueInfoProto` with its tensor type rewritten by `f`.
fn retype(info: &[u8], f: impl Fn(&[u8]) -> Result<Vec<u8>, ShapeError>) -> Result<Vec<u8>, ShapeError> {
    let mut out = Vec::with_capacity(info.len());
    for field in Fields(info) {
        match field? {
            (value_info::TYPE, Field::Bytes(ty), _) => {
                let mut t = Vec::with_capacity(ty.len());
                for g in Fields(ty) {
                    match g? {
                        (type_proto::TENSOR_TYPE, Field::Bytes(tensor), _) => put_bytes(&mut t, type_proto::TENSOR_TYPE, &f(tensor)?),
                        (_, _, raw) => t.extend_from_slice(raw),
                    }
                }
                put_bytes(&mut out, value_info::TYPE, &t);
            }
            (_, _, raw) => out.extend_from_slice(raw),
        }
    }
    Ok(out)
}

fn drop_shape(tensor: &[u8]) -> Result<Vec<u8>, ShapeError> {
    let mut out = Vec::with_capacity(tensor.len());
    for f in Fields(tensor) {
        match f? {
            (tensor_type::SHAPE, _, _) => {}
            (_, _, raw) => out.extend_from_slice(raw),
        }
    }
    Ok(out)
}

fn tensor_type(tensor: &[u8], input: &str, dims: &[usize]) -> Result<Vec<u8>, ShapeError> {
    let mut out = Vec::with_capacity(tensor.len());
    for f in Fields(tensor) {
        match f? {
            (tensor_type::SHAPE, Field::Bytes(shape), _) => {
                let mut s = Vec::with_capacity(shape.len());
                let mut rank = 0;
                for g in Fields(shape) {
                    match g? {
                        (shape::DIM, _, raw) => {
                            if dims.contains(&rank) {
                                put_bytes(&mut s, shape::DIM, &Dim::Param(format!("{input}_{rank}")).encode());
                            } else {
                                s.extend_from_slice(raw);
                            }
                            rank += 1;
                        }
                        (_, _, raw) => s.extend_from_slice(raw),
                    }
                }
                if let Some(&dim) = dims.iter().find(|&&d| d >= rank) {
                    return Err(ShapeError::Rank { input: input.to_string(), rank, dim });
                }
                put_bytes(&mut out, tensor_type::SHAPE, &s);
            }
            (_, _, raw) => out.extend_from_slice(raw),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{DataType, Graph, Model, ValueInfo};

    fn info(name: &str, dims: &[i64]) -> ValueInfo {
        ValueInfo::new(name, DataType::Float, dims.iter().map(|&d| Dim::Value(d)).collect())
    }

    /// A model whose graph has one input `x` of shape [1, 3, 640, 640], one output `y` of shape
    /// [1, 6400] and one intermediate value info.
    fn model() -> Vec<u8> {
        let graph = Graph {
            name: "g".into(),
            inputs: vec![info("x", &[1, 3, 640, 640])],
            outputs: vec![info("y", &[1, 6400])],
            value_info: vec![info("t", &[1, 8, 320, 320])],
            ..Graph::default()
        };
        Model { ir_version: 8, producer_name: "", graph, opset_import: vec![] }.encode()
    }

    #[test]
    fn frees_the_chosen_input_dims_and_drops_the_other_shapes() {
        let out = free_input_dims(&model(), &[2, 3]).unwrap();
        let x = ValueInfo::new("x", DataType::Float, vec![Dim::Value(1), Dim::Value(3), "x_2".into(), "x_3".into()]);
        let y = ValueInfo { shape: None, ..info("y", &[]) };
        let graph = Graph { name: "g".into(), inputs: vec![x], outputs: vec![y], ..Graph::default() };
        let expected = Model { ir_version: 8, producer_name: "", graph, opset_import: vec![] }.encode();
        assert_eq!(out, expected);
    }

    #[test]
    fn refuses_what_it_cannot_rewrite() {
        assert!(matches!(free_input_dims(&model(), &[4]), Err(ShapeError::Rank { rank: 4, dim: 4, .. })));
        assert!(matches!(free_input_dims(b"", &[2]), Err(ShapeError::Malformed(_))));
        let mut no_input = Vec::new();
        put_bytes(&mut no_input, model::GRAPH, b"");
        assert!(matches!(free_input_dims(&no_input, &[2]), Err(ShapeError::NoInput)));
    }
}
