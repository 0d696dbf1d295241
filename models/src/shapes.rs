//! Frees the fixed spatial size of a fully convolutional model, in memory at load.
//!
//! Why: YuNet is exported for a 640×640 input, so a 16:9 frame letterboxed into it spends 44 % of
//! the detector's work on padding. Its graph has nothing tied to that size (convolutions, pooling,
//! ×2 resizes by scale, reshapes to `[1, -1, k]`), which is how OpenCV runs it at any size that is a
//! multiple of 32. ONNX Runtime checks inputs against the declared shape, so the declared shapes are
//! what changes: the named input's chosen dimensions become symbolic, and the graph outputs and
//! intermediate values lose their declared shapes (ONNX Runtime infers them per run). Everything
//! else is copied byte for byte.

use crate::proto::*;

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
            (MODEL_GRAPH, Field::Bytes(graph), _) => {
                graphs += 1;
                put_bytes(&mut out, MODEL_GRAPH, &graph_with(graph, dims)?);
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
            (GRAPH_INPUT, Field::Bytes(info), raw) => {
                if found {
                    out.extend_from_slice(raw);
                } else {
                    found = true;
                    let input = name_of(info)?;
                    put_bytes(&mut out, GRAPH_INPUT, &retype(info, |t| tensor_type(t, &input, dims))?);
                }
            }
            (GRAPH_OUTPUT, Field::Bytes(info), _) => put_bytes(&mut out, GRAPH_OUTPUT, &retype(info, drop_shape)?),
            (GRAPH_VALUE_INFO, _, _) => {}
            (_, _, raw) => out.extend_from_slice(raw),
        }
    }
    if found { Ok(out) } else { Err(ShapeError::NoInput) }
}

fn name_of(info: &[u8]) -> Result<String, Malformed> {
    for f in Fields(info) {
        if let (VALUE_INFO_NAME, Field::Bytes(b), _) = f? {
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
            (VALUE_INFO_TYPE, Field::Bytes(ty), _) => {
                let mut t = Vec::with_capacity(ty.len());
                for g in Fields(ty) {
                    match g? {
                        (TYPE_TENSOR, Field::Bytes(tensor), _) => put_bytes(&mut t, TYPE_TENSOR, &f(tensor)?),
                        (_, _, raw) => t.extend_from_slice(raw),
                    }
                }
                put_bytes(&mut out, VALUE_INFO_TYPE, &t);
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
            (TENSOR_TYPE_SHAPE, _, _) => {}
            (_, _, raw) => out.extend_from_slice(raw),
        }
    }
    Ok(out)
}

fn tensor_type(tensor: &[u8], input: &str, dims: &[usize]) -> Result<Vec<u8>, ShapeError> {
    let mut out = Vec::with_capacity(tensor.len());
    for f in Fields(tensor) {
        match f? {
            (TENSOR_TYPE_SHAPE, Field::Bytes(shape), _) => {
                let mut s = Vec::with_capacity(shape.len());
                let mut rank = 0;
                for g in Fields(shape) {
                    match g? {
                        (SHAPE_DIM, _, raw) => {
                            if dims.contains(&rank) {
                                let mut dim = Vec::new();
                                put_bytes(&mut dim, DIM_PARAM, format!("{input}_{rank}").as_bytes());
                                put_bytes(&mut s, SHAPE_DIM, &dim);
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
                put_bytes(&mut out, TENSOR_TYPE_SHAPE, &s);
            }
            (_, _, raw) => out.extend_from_slice(raw),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model whose graph has one input `x` of shape [1, 3, 640, 640], one output `y` of shape
    /// [1, 6400] and one intermediate value info.
    fn model() -> Vec<u8> {
        let dim = |v: u64| {
            let mut d = Vec::new();
            put_uint(&mut d, 1, v);
            d
        };
        let info = |name: &str, dims: &[u64]| {
            let mut shape = Vec::new();
            for &d in dims {
                put_bytes(&mut shape, SHAPE_DIM, &dim(d));
            }
            let mut tensor = Vec::new();
            put_uint(&mut tensor, 1, FLOAT);
            put_bytes(&mut tensor, TENSOR_TYPE_SHAPE, &shape);
            let mut ty = Vec::new();
            put_bytes(&mut ty, TYPE_TENSOR, &tensor);
            let mut v = Vec::new();
            put_bytes(&mut v, VALUE_INFO_NAME, name.as_bytes());
            put_bytes(&mut v, VALUE_INFO_TYPE, &ty);
            v
        };
        let mut graph = Vec::new();
        put_bytes(&mut graph, GRAPH_NAME, b"g");
        put_bytes(&mut graph, GRAPH_INPUT, &info("x", &[1, 3, 640, 640]));
        put_bytes(&mut graph, GRAPH_OUTPUT, &info("y", &[1, 6400]));
        put_bytes(&mut graph, GRAPH_VALUE_INFO, &info("t", &[1, 8, 320, 320]));
        let mut model = Vec::new();
        put_uint(&mut model, MODEL_IR_VERSION, 8);
        put_bytes(&mut model, MODEL_GRAPH, &graph);
        model
    }

    #[test]
    fn frees_the_chosen_input_dims_and_drops_the_other_shapes() {
        let out = free_input_dims(&model(), &[2, 3]).unwrap();
        let mut expected = Vec::new();
        put_uint(&mut expected, MODEL_IR_VERSION, 8);
        let mut graph = Vec::new();
        put_bytes(&mut graph, GRAPH_NAME, b"g");
        let (mut shape, mut d) = (Vec::new(), Vec::new());
        put_uint(&mut d, 1, 1);
        put_bytes(&mut shape, SHAPE_DIM, &d);
        d.clear();
        put_uint(&mut d, 1, 3);
        put_bytes(&mut shape, SHAPE_DIM, &d);
        for name in ["x_2", "x_3"] {
            d.clear();
            put_bytes(&mut d, DIM_PARAM, name.as_bytes());
            put_bytes(&mut shape, SHAPE_DIM, &d);
        }
        let typed = |shape: Option<&[u8]>| {
            let mut tensor = Vec::new();
            put_uint(&mut tensor, 1, FLOAT);
            if let Some(s) = shape {
                put_bytes(&mut tensor, TENSOR_TYPE_SHAPE, s);
            }
            let mut ty = Vec::new();
            put_bytes(&mut ty, TYPE_TENSOR, &tensor);
            ty
        };
        for (field, name, shape) in [(GRAPH_INPUT, "x", Some(shape.as_slice())), (GRAPH_OUTPUT, "y", None)] {
            let mut v = Vec::new();
            put_bytes(&mut v, VALUE_INFO_NAME, name.as_bytes());
            put_bytes(&mut v, VALUE_INFO_TYPE, &typed(shape));
            put_bytes(&mut graph, field, &v);
        }
        put_bytes(&mut expected, MODEL_GRAPH, &graph);
        assert_eq!(out, expected);
    }

    #[test]
    fn refuses_what_it_cannot_rewrite() {
        assert!(matches!(free_input_dims(&model(), &[4]), Err(ShapeError::Rank { rank: 4, dim: 4, .. })));
        assert!(matches!(free_input_dims(b"", &[2]), Err(ShapeError::Malformed(_))));
        let mut no_input = Vec::new();
        put_bytes(&mut no_input, MODEL_GRAPH, b"");
        assert!(matches!(free_input_dims(&no_input, &[2]), Err(ShapeError::NoInput)));
    }
}
