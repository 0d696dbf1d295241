//! Carves a sub-model out of an ONNX file: the nodes and initializers that compute some of its outputs
//! from some of its inputs, as a new, small ONNX model (bytes for `commit_from_memory`).
//!
//! Why: Whisper's `decoder_model.onnx` holds the whole decoder (about 310 MB once ONNX Runtime has
//! folded its weights to fp32), although `decoder_with_past_model.onnx` holds the same weights and,
//! given an empty past, computes the same prompt step. The one thing only `decoder_model` computes is
//! the cross-attention cache (`present.*.encoder.*`) from the encoder's output: a few small projections.
//! Carving those out lets the worker load the decoder's weights once.
//!
//! How: a minimal protobuf reader walks `ModelProto` → `GraphProto` and keeps every node and
//! initializer on a path from the wanted outputs back to the given inputs, copied byte for byte (so
//! attributes, types and data are exactly the original's); the writer wraps them in a new graph with
//! the original's opsets and IR version. Nodes with subgraphs that read outer names (If, Loop) are not
//! followed into; such a model is refused when a name cannot be resolved.

use std::collections::{HashMap, HashSet};

use crate::proto::*;

/// Why a model could not be carved.
#[derive(Debug, thiserror::Error)]
pub enum CarveError {
    #[error(transparent)]
    Malformed(#[from] Malformed),
    #[error("the model has no value named {0} (neither a graph input, an initializer nor a node output)")]
    Unresolved(String),
}

/// The string fields number `field` of a message.
fn strings(msg: &[u8], field: u64) -> Result<Vec<String>, CarveError> {
    let mut out = Vec::new();
    for f in Fields(msg) {
        if let (n, Field::Bytes(b), _) = f?
            && n == field
        {
            out.push(text(b));
        }
    }
    Ok(out)
}

/// Names of the graph outputs of `model`.
///
/// # Errors
/// The bytes are not an ONNX model.
pub fn outputs(model: &[u8]) -> Result<Vec<String>, CarveError> {
    let mut graph = None;
    for f in Fields(model) {
        if let (MODEL_GRAPH, Field::Bytes(b), _) = f? {
            graph = Some(b);
        }
    }
    let mut out = Vec::new();
    for f in Fields(graph.ok_or(CarveError::Malformed(Malformed("no graph")))?) {
        if let (GRAPH_OUTPUT, Field::Bytes(b), _) = f? {
            out.extend(strings(b, VALUE_INFO_NAME)?);
        }
    }
    Ok(out)
}

/// The model that computes `outputs` of `model` from its graph inputs `inputs`, as ONNX bytes.
///
/// # Errors
/// The bytes are not an ONNX model, or an output needs a value that is neither one of `inputs`, an
/// initializer nor a node output.
pub fn carve(model: &[u8], inputs: &[String], outputs: &[String]) -> Result<Vec<u8>, CarveError> {
    let (mut ir_version, mut opsets, mut graph) = (None, Vec::new(), None);
    for f in Fields(model) {
        match f? {
            (MODEL_IR_VERSION, Field::Varint(v), _) => ir_version = Some(v),
            (MODEL_OPSET_IMPORT, Field::Bytes(b), _) => opsets.push(b),
            (MODEL_GRAPH, Field::Bytes(b), _) => graph = Some(b),
            _ => {}
        }
    }
    let graph = graph.ok_or(CarveError::Malformed(Malformed("no graph")))?;
    let (mut nodes, mut inits, mut value_infos) = (Vec::new(), HashMap::new(), HashMap::new());
    for f in Fields(graph) {
        match f? {
            (GRAPH_NODE, Field::Bytes(b), _) => nodes.push((b, strings(b, NODE_INPUT)?, strings(b, NODE_OUTPUT)?)),
            (GRAPH_INITIALIZER, Field::Bytes(b), _) => {
                let name = strings(b, TENSOR_NAME)?.pop().ok_or(CarveError::Malformed(Malformed("unnamed initializer")))?;
                inits.insert(name, b);
            }
            (GRAPH_INPUT | GRAPH_OUTPUT, Field::Bytes(b), _) => {
                let name = strings(b, VALUE_INFO_NAME)?.pop().ok_or(CarveError::Malformed(Malformed("unnamed value info")))?;
                value_infos.insert(name, b);
            }
            _ => {}
        }
    }
    let producer: HashMap<&str, usize> =
        nodes.iter().enumerate().flat_map(|(i, (_, _, outs))| outs.iter().map(move |o| (o.as_str(), i))).collect();
    let given: HashSet<&str> = inputs.iter().map(String::as_str).collect();
    let (mut keep_nodes, mut keep_inits) = (HashSet::new(), Vec::new());
    let mut seen: HashSet<&str> = HashSet::new();
    let mut todo: Vec<&str> = outputs.iter().map(String::as_str).collect();
    while let Some(name) = todo.pop() {
        if name.is_empty() || !seen.insert(name) || given.contains(name) {
            continue;
        }
        if let Some(&i) = producer.get(name) {
            keep_nodes.insert(i);
            todo.extend(nodes[i].1.iter().map(String::as_str));
        } else if let Some((n, b)) = inits.get_key_value(name) {
            keep_inits.push((n.as_str(), *b));
        } else {
            return Err(CarveError::Unresolved(name.to_string()));
        }
    }
    keep_inits.sort_by_key(|(n, _)| *n);
    let mut g = Vec::new();
    for (i, (bytes, _, _)) in nodes.iter().enumerate() {
        if keep_nodes.contains(&i) {
            put_bytes(&mut g, GRAPH_NODE, bytes);
        }
    }
    put_bytes(&mut g, GRAPH_NAME, b"carved");
    for (_, bytes) in keep_inits {
        put_bytes(&mut g, GRAPH_INITIALIZER, bytes);
    }
    for (field, names) in [(GRAPH_INPUT, inputs), (GRAPH_OUTPUT, outputs)] {
        for name in names {
            let info = value_infos.get(name).ok_or_else(|| CarveError::Unresolved(name.clone()))?;
            put_bytes(&mut g, field, info);
        }
    }
    let mut out = Vec::with_capacity(g.len() + 64);
    if let Some(v) = ir_version {
        put_uint(&mut out, MODEL_IR_VERSION, v);
    }
    put_bytes(&mut out, MODEL_GRAPH, &g);
    for o in opsets {
        put_bytes(&mut out, MODEL_OPSET_IMPORT, o);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(fields: &[(u64, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, b) in fields {
            put_bytes(&mut out, *n, b);
        }
        out
    }

    /// x → A → y → B → z, and an unrelated node C; carving z from x keeps A and B only.
    #[test]
    fn keeps_only_the_path_to_the_outputs() {
        let node = |name: &str, i: &str, o: &str| msg(&[(NODE_INPUT, i.as_bytes()), (NODE_OUTPUT, o.as_bytes()), (3, name.as_bytes())]);
        let vi = |n: &str| msg(&[(VALUE_INFO_NAME, n.as_bytes())]);
        let graph = [
            msg(&[(GRAPH_NODE, &node("A", "x", "y")), (GRAPH_NODE, &node("C", "x", "w")), (GRAPH_NODE, &node("B", "y", "z"))]),
            msg(&[(GRAPH_INPUT, &vi("x")), (GRAPH_OUTPUT, &vi("z")), (GRAPH_OUTPUT, &vi("w"))]),
        ]
        .concat();
        let model = msg(&[(MODEL_GRAPH, &graph)]);
        let carved = carve(&model, &["x".into()], &["z".into()]).unwrap();
        let g = Fields(&carved).find_map(|f| match f.unwrap() {
            (MODEL_GRAPH, Field::Bytes(b), _) => Some(b.to_vec()),
            _ => None,
        });
        let g = g.unwrap();
        let names: Vec<String> = Fields(&g)
            .filter_map(|f| match f.unwrap() {
                (GRAPH_NODE, Field::Bytes(b), _) => strings(b, 3).unwrap().pop(),
                _ => None,
            })
            .collect();
        assert_eq!(names, ["A", "B"]);
        assert!(matches!(carve(&model, &[], &["z".into()]), Err(CarveError::Unresolved(n)) if n == "x"));
    }
}
