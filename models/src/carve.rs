//! Carves a sub-model out of an ONNX file: the nodes and initializers that compute some of its outputs
//! from some of its inputs, as a new, small ONNX model (bytes for `commit_from_memory`).
//!
//! Why: Whisper's `decoder_model.onnx` holds the whole decoder (about 310 MB once ONNX Runtime has
//! folded its weights to fp32), although `decoder_with_past_model.onnx` holds the same weights and,
//! given an empty past, computes the same prompt step. The one thing only `decoder_model` computes is
//! the cross-attention cache (`present.*.encoder.*`) from the encoder's output: a few small projections.
//! Carving those out lets the worker load the decoder's weights once.
//!
//! How: the [`crate::onnx`] reader walks `ModelProto` → `GraphProto` and keeps every node and
//! initializer on a path from the wanted outputs back to the given inputs, copied byte for byte (so
//! attributes, types and data are exactly the original's); the writer wraps them in a new graph with
//! the original's opsets and IR version. Nodes with subgraphs that read outer names (If, Loop) are not
//! followed into; such a model is refused when a name cannot be resolved.

use std::collections::{HashMap, HashSet};

use crate::onnx::wire::{Field, Fields, Malformed, put_bytes, put_int, strings};
use crate::onnx::{graph, graph_of, model, node, tensor, value_info};

/// Why a model could not be carved.
#[derive(Debug, thiserror::Error)]
pub enum CarveError {
    #[error(transparent)]
    Malformed(#[from] Malformed),
    #[error("the model has no value named {0} (neither a graph input, an initializer nor a node output)")]
    Unresolved(String),
}

/// Names of the graph outputs of `model`.
///
/// # Errors
/// The bytes are not an ONNX model.
pub fn outputs(model: &[u8]) -> Result<Vec<String>, CarveError> {
    let mut out = Vec::new();
    for f in Fields(graph_of(model)?) {
        if let (graph::OUTPUT, Field::Bytes(b), _) = f? {
            out.extend(strings(b, value_info::NAME)?);
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
            (model::IR_VERSION, Field::Varint(v), _) => ir_version = Some(v),
            (model::OPSET_IMPORT, Field::Bytes(b), _) => opsets.push(b),
            (model::GRAPH, Field::Bytes(b), _) => graph = Some(b),
            _ => {}
        }
    }
    let graph = graph.ok_or(CarveError::Malformed(Malformed("no graph")))?;
    let (mut nodes, mut inits, mut value_infos) = (Vec::new(), HashMap::new(), HashMap::new());
    for f in Fields(graph) {
        match f? {
            (graph::NODE, Field::Bytes(b), _) => nodes.push((b, strings(b, node::INPUT)?, strings(b, node::OUTPUT)?)),
            (graph::INITIALIZER, Field::Bytes(b), _) => {
                let name = strings(b, tensor::NAME)?.pop().ok_or(CarveError::Malformed(Malformed("unnamed initializer")))?;
                inits.insert(name, b);
            }
            (graph::INPUT | graph::OUTPUT, Field::Bytes(b), _) => {
                let name = strings(b, value_info::NAME)?.pop().ok_or(CarveError::Malformed(Malformed("unnamed value info")))?;
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
            put_bytes(&mut g, graph::NODE, bytes);
        }
    }
    put_bytes(&mut g, graph::NAME, b"carved");
    for (_, bytes) in keep_inits {
        put_bytes(&mut g, graph::INITIALIZER, bytes);
    }
    for (field, names) in [(graph::INPUT, inputs), (graph::OUTPUT, outputs)] {
        for name in names {
            let info = value_infos.get(name).ok_or_else(|| CarveError::Unresolved(name.clone()))?;
            put_bytes(&mut g, field, info);
        }
    }
    let mut out = Vec::with_capacity(g.len() + 64);
    if let Some(v) = ir_version {
        put_int(&mut out, model::IR_VERSION, v as i64);
    }
    put_bytes(&mut out, model::GRAPH, &g);
    for o in opsets {
        put_bytes(&mut out, model::OPSET_IMPORT, o);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{DataType, Graph, Model, Node, ValueInfo};

    /// x → A → y → B → z, and an unrelated node C; carving z from x keeps A and B only.
    #[test]
    fn keeps_only_the_path_to_the_outputs() {
        let vi = |n: &str| ValueInfo::new(n, DataType::Float, vec![]);
        let model = Model {
            ir_version: 8,
            producer_name: "",
            graph: Graph {
                nodes: vec![
                    Node::new("Relu", &["x"], &["y"]).named("A"),
                    Node::new("Relu", &["x"], &["w"]).named("C"),
                    Node::new("Relu", &["y"], &["z"]).named("B"),
                ],
                inputs: vec![vi("x")],
                outputs: vec![vi("z"), vi("w")],
                ..Graph::default()
            },
            opset_import: vec![],
        }
        .encode();
        let carved = carve(&model, &["x".into()], &["z".into()]).unwrap();
        let names: Vec<String> = Fields(graph_of(&carved).unwrap())
            .filter_map(|f| match f.unwrap() {
                (graph::NODE, Field::Bytes(b), _) => strings(b, node::NAME).unwrap().pop(),
                _ => None,
            })
            .collect();
        assert_eq!(names, ["A", "B"]);
        assert!(matches!(carve(&model, &[], &["z".into()]), Err(CarveError::Unresolved(n)) if n == "x"));
    }
}
