//! Makes a decoder graph compute its `logits` for the last position only, as an in-memory rewrite at
//! load time.
//!
//! Why: every use of Whisper's decoder reads one position's logits: a decoding step the last token's,
//! the prompt step its last token's, and the word-timestamp pass none (it reads the cross-attention
//! scores of every position, see `expose`). Yet the graph projects every position onto the 51,865-token
//! vocabulary: 26.6 M multiply-adds a position for whisper-base, about as many as its six layers
//! below, and for the alignment pass of a window (about 140 positions) a 29 MB tensor that nothing
//! reads.
//!
//! How: the `MatMul` that writes the graph output `logits` reads its hidden states through a new
//! `Slice` (axis 1, from -1 to the end), so the output is [batch, 1, vocabulary]. Everything before
//! it, including the self-attention cache outputs and the scores, is computed as before, and the last
//! position's logits are the same numbers. Every other byte of the model is copied as it was.

use crate::onnx::nodes::{GraphError, parse_node};
use crate::onnx::wire::{Field, Fields, put_bytes};
use crate::onnx::{self, DataType, Node, Tensor, graph};

/// The graph output this rewrite shortens.
pub const LOGITS: &str = "logits";

/// `model` with its [`LOGITS`] computed for the last position only (see the module docs), and whether
/// it was changed: `false` when no `MatMul` writes [`LOGITS`] or it already reads a single position
/// through this rewrite's `Slice`.
///
/// # Errors
/// The bytes are not an ONNX model, or its graph has subgraphs.
pub fn last_position_logits(model: &[u8]) -> Result<(Vec<u8>, bool), GraphError> {
    let graph_bytes = onnx::graph_of(model)?;
    let sliced = format!("{LOGITS}.last_position");
    let mut g = Vec::with_capacity(graph_bytes.len() + 256);
    let mut changed = false;
    for f in Fields(graph_bytes) {
        let (field, value, raw) = f?;
        let (graph::NODE, Field::Bytes(body)) = (field, value) else {
            g.extend_from_slice(raw);
            continue;
        };
        let node = parse_node(raw, body)?;
        let writes_logits = node.op_type == "MatMul" && node.is_plain() && node.outputs.iter().any(|o| o == LOGITS);
        match node.inputs.as_slice() {
            [hidden, weight] if writes_logits && *hidden != sliced => {
                let slice = Node::new("Slice", &[hidden, "last_position.starts", "last_position.ends", "last_position.axes"], &[&sliced])
                    .named(format!("{LOGITS}.last_position_slice"));
                put_bytes(&mut g, graph::NODE, &slice.encode());
                let matmul = Node::new("MatMul", &[&sliced, weight], &[LOGITS]);
                let matmul = if node.name.is_empty() { matmul } else { matmul.named(node.name.clone()) };
                put_bytes(&mut g, graph::NODE, &matmul.encode());
                changed = true;
            }
            _ => g.extend_from_slice(raw),
        }
    }
    if !changed {
        return Ok((model.to_vec(), false));
    }
    for (name, value) in [("last_position.starts", -1), ("last_position.ends", i64::MAX), ("last_position.axes", 1)] {
        Tensor::raw(name, vec![1], DataType::Int64, value.to_le_bytes().to_vec()).put(&mut g, graph::INITIALIZER);
    }
    Ok((onnx::with_graph(model, &g)?, true))
}

/// A decoder's head as the converter writes it, for tests here and in the worker (which runs it in
/// ONNX Runtime against its rewrite).
#[cfg(any(test, feature = "testing"))]
pub mod fixtures {
    use super::LOGITS;
    use crate::onnx::{DataType, Graph, Model, Node, OperatorSetId, Tensor, ValueInfo};

    /// Hidden size and vocabulary of [`head`].
    pub const HIDDEN: usize = 4;
    pub const VOCAB: usize = 6;

    /// h [batch, positions, HIDDEN] → LayerNormalization → MatMul(·, embeddingᵀ) → logits
    /// [batch, positions, VOCAB]. ONNX opset 17 bytes.
    pub fn head() -> Vec<u8> {
        let f32s = |v: Vec<f32>| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let vi = |n: &str| ValueInfo::new(n, DataType::Float, vec!["batch".into(), "positions".into(), "width".into()]);
        Model {
            ir_version: 8,
            producer_name: "",
            graph: Graph {
                nodes: vec![
                    Node::new("LayerNormalization", &["h", "gain", "bias"], &["n"]),
                    Node::new("Transpose", &["embedding"], &["embedding_t"]),
                    Node::new("MatMul", &["n", "embedding_t"], &[LOGITS]).named("proj"),
                ],
                initializers: vec![
                    Tensor::raw("gain", vec![HIDDEN as i64], DataType::Float, f32s(vec![1.0, 0.5, 2.0, 1.5])),
                    Tensor::raw("bias", vec![HIDDEN as i64], DataType::Float, f32s(vec![0.1, -0.2, 0.0, 0.3])),
                    Tensor::raw(
                        "embedding",
                        vec![VOCAB as i64, HIDDEN as i64],
                        DataType::Float,
                        f32s((0..VOCAB * HIDDEN).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect()),
                    ),
                ],
                inputs: vec![vi("h")],
                outputs: vec![vi(LOGITS)],
                ..Graph::default()
            },
            opset_import: vec![OperatorSetId { domain: "", version: 17 }],
        }
        .encode()
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::head;
    use super::*;

    fn nodes(model: &[u8]) -> Vec<(String, Vec<String>, Vec<String>)> {
        Fields(onnx::graph_of(model).unwrap())
            .filter_map(|f| match f.unwrap() {
                (graph::NODE, Field::Bytes(b), raw) => {
                    let n = parse_node(raw, b).unwrap();
                    Some((n.op_type, n.inputs, n.outputs))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_logits_matmul_reads_the_last_position_and_a_second_pass_finds_nothing() {
        let (out, changed) = last_position_logits(&head()).unwrap();
        assert!(changed);
        let n = nodes(&out);
        assert_eq!(n.len(), 4, "{n:?}");
        let sliced = format!("{LOGITS}.last_position");
        assert_eq!(n[2].0, "Slice");
        assert_eq!(n[2].1[0], "n");
        assert_eq!(n[2].2, std::slice::from_ref(&sliced));
        assert_eq!(
            (n[3].0.as_str(), n[3].1.clone(), n[3].2.clone()),
            ("MatMul", vec![sliced, "embedding_t".into()], vec![LOGITS.to_string()])
        );
        let (again, changed) = last_position_logits(&out).unwrap();
        assert!(!changed);
        assert_eq!(again, out);
    }

    #[test]
    fn a_graph_without_a_logits_matmul_is_left_as_it_is() {
        let model = crate::attention::fixtures::self_attention(false);
        assert_eq!(last_position_logits(&model).unwrap(), (model, false));
    }
}
