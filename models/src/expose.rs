//! Makes the cross-attention scores of some layers of Whisper's with-past decoder graph outputs, so
//! that word timestamps can be read from the alignment heads (see the worker's `index::align`).
//!
//! Why a rewrite at load rather than outputs written by the converter: the converted graphs stay
//! byte-identical to the offline bundle's (the catalog pins their sha256), a worker with word
//! timestamps off loads the graph exactly as converted, and the decoder's weights stay in memory once
//! (the same session runs the decoding steps and the alignment pass).
//!
//! How: in the graph the converter builds, layer `i`'s cross-attention reads its keys from the input
//! `past_key_values.{i}.encoder.key` through a `Transpose`, multiplies the queries by them (`MatMul`),
//! scales (`Mul`) and takes the `Softmax`. The value that enters the `Softmax` is the scaled score
//! (`openai-whisper`'s `qk`); an `Identity` node copies it to a new graph output
//! `cross_attention_scores.{i}` of shape [batch, heads, tokens, encoder positions]. Every other byte
//! of the model is copied as it was; the new node and output are appended to the graph.

use std::collections::HashMap;

use crate::onnx::wire::{Field, Fields, Malformed, put_bytes, strings};
use crate::onnx::{DataType, Dim, Node, ValueInfo, graph, graph_of, node, with_graph};

/// Why the scores could not be exposed.
#[derive(Debug, thiserror::Error)]
pub enum ExposeError {
    #[error(transparent)]
    Malformed(#[from] Malformed),
    #[error("layer {layer}: {reason} (not a with-past Whisper decoder built by the Heimdex converter)")]
    Shape { layer: usize, reason: &'static str },
}

/// The name of the output that carries layer `layer`'s cross-attention scores.
pub fn scores_output(layer: usize) -> String {
    format!("cross_attention_scores.{layer}")
}

/// `model` (a with-past Whisper decoder) with the cross-attention scores of each of `layers` as the
/// output [`scores_output`]`(layer)`.
///
/// # Errors
/// The bytes are not an ONNX model, or a layer's cross-attention does not have the converter's shape.
pub fn cross_attention_scores(model: &[u8], layers: &[usize]) -> Result<Vec<u8>, ExposeError> {
    let graph_bytes = graph_of(model)?;
    // (op type, inputs, outputs) of every node, and which nodes read each value.
    let mut nodes = Vec::new();
    for f in Fields(graph_bytes) {
        if let (graph::NODE, Field::Bytes(b), _) = f? {
            let op = strings(b, node::OP_TYPE)?.pop().unwrap_or_default();
            nodes.push((op, strings(b, node::INPUT)?, strings(b, node::OUTPUT)?));
        }
    }
    let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, (_, inputs, _)) in nodes.iter().enumerate() {
        for name in inputs {
            readers.entry(name.as_str()).or_default().push(i);
        }
    }
    // The one node of type `op` that reads `value`.
    let reader = |value: &str, op: &str| -> Option<usize> {
        let mut found = readers.get(value)?.iter().copied().filter(|&i| nodes[i].0 == op);
        let first = found.next()?;
        found.next().is_none().then_some(first)
    };
    let mut extra = Vec::new();
    for &layer in layers {
        let shape = |reason| ExposeError::Shape { layer, reason };
        let key = format!("past_key_values.{layer}.encoder.key");
        let transpose = reader(&key, "Transpose").ok_or(shape("its encoder keys feed no single Transpose"))?;
        let keys_t = nodes[transpose].2.first().ok_or(shape("the Transpose has no output"))?;
        let matmul = reader(keys_t, "MatMul").ok_or(shape("the transposed keys feed no single MatMul"))?;
        let mut value = nodes[matmul].2.first().ok_or(shape("the MatMul has no output"))?;
        // Through the scaling (and a mask, where one is added) to the Softmax.
        loop {
            if reader(value, "Softmax").is_some() {
                break;
            }
            let next = ["Mul", "Div", "Add"].iter().find_map(|op| reader(value, op)).ok_or(shape("the scores reach no Softmax"))?;
            value = nodes[next].2.first().ok_or(shape("a node on the way to the Softmax has no output"))?;
        }
        let out = scores_output(layer);
        put_bytes(&mut extra, graph::NODE, &Node::new("Identity", &[value], &[&out]).named(format!("expose_{out}")).encode());
        let dims = ["batch_size", "heads", "decoder_sequence_length", "encoder_sequence_length"].map(Dim::from).to_vec();
        put_bytes(&mut extra, graph::OUTPUT, &ValueInfo::new(&out, DataType::Float, dims).encode());
    }
    // Repeated fields may come in any order on the wire: the new node and outputs follow the graph's.
    let mut graph_out = Vec::with_capacity(graph_bytes.len() + extra.len());
    graph_out.extend_from_slice(graph_bytes);
    graph_out.extend_from_slice(&extra);
    Ok(with_graph(model, &graph_out)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{Graph, Model};

    /// Layer 0's cross-attention as the converter writes it: keys → Transpose → MatMul → Mul → Softmax.
    fn attention() -> Vec<u8> {
        let vi = |n: &str| ValueInfo::new(n, DataType::Float, vec![]);
        Model {
            ir_version: 8,
            producer_name: "",
            graph: Graph {
                nodes: vec![
                    Node::new("Transpose", &["past_key_values.0.encoder.key"], &["kt"]),
                    Node::new("MatMul", &["q", "kt"], &["s"]),
                    Node::new("Mul", &["s", "scale"], &["scaled"]),
                    Node::new("Softmax", &["scaled"], &["p"]),
                ],
                inputs: vec![vi("past_key_values.0.encoder.key"), vi("q"), vi("scale")],
                outputs: vec![vi("p")],
                ..Graph::default()
            },
            opset_import: vec![],
        }
        .encode()
    }

    #[test]
    fn the_scaled_scores_become_an_output_and_everything_else_stays() {
        let model = attention();
        let exposed = cross_attention_scores(&model, &[0]).unwrap();
        assert_eq!(crate::carve::outputs(&exposed).unwrap(), ["p", "cross_attention_scores.0"]);
        // The new output is the Softmax's input, copied by one Identity node.
        let inputs = ["past_key_values.0.encoder.key".into(), "q".into(), "scale".into()];
        let carved = crate::carve::carve(&exposed, &inputs, &["cross_attention_scores.0".into()]);
        assert!(carved.is_ok(), "the output is computed from the scaled scores: {carved:?}");
        assert!(exposed.starts_with(&model[..2]), "the model's other fields are copied first, as they were");
    }

    #[test]
    fn a_layer_without_the_converters_shape_is_refused_naming_it() {
        let e = cross_attention_scores(&attention(), &[0, 3]).unwrap_err();
        assert!(e.to_string().contains("layer 3") && e.to_string().contains("Transpose"), "{e}");
    }
}
