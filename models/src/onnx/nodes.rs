//! The one reader of a graph's nodes for the load-time rewrites ([`crate::quantize`],
//! [`crate::attention`]): what each looks at of a node, and the node's bytes to copy it unchanged.

use std::collections::HashMap;

use super::wire::{Field, Fields, Malformed, packed_varints, text};
use super::{attr, node};

/// Why a graph's nodes could not be read for a rewrite.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error(transparent)]
    Malformed(#[from] Malformed),
    /// Names used inside subgraphs (If, Loop, Scan) are not tracked, so a rewrite could drop a value
    /// they read.
    #[error("node {0:?} has a subgraph attribute, which the rewrites do not follow")]
    Subgraph(String),
}

/// A node of the top-level graph, with what the rewrites look at.
pub struct Node<'a> {
    /// The node's whole field, to copy it as it was.
    pub raw: &'a [u8],
    pub name: String,
    pub op_type: String,
    pub domain: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    /// Integer and integer-list attributes by name (`to` of Cast, `perm` of Transpose, `axis`).
    pub ints: HashMap<String, Vec<i64>>,
}

impl Node<'_> {
    /// Whether the node is of the default domain.
    pub fn is_plain(&self) -> bool {
        self.domain.is_empty() || self.domain == "ai.onnx"
    }
}

/// The node whose field is `raw` and whose message is `body`.
///
/// # Errors
/// The message is malformed, or the node has a subgraph attribute.
pub fn parse_node<'a>(raw: &'a [u8], body: &[u8]) -> Result<Node<'a>, GraphError> {
    let mut parsed = Node {
        raw,
        name: String::new(),
        op_type: String::new(),
        domain: String::new(),
        inputs: Vec::new(),
        outputs: Vec::new(),
        ints: HashMap::new(),
    };
    let mut attrs = Vec::new();
    for f in Fields(body) {
        match f? {
            (node::INPUT, Field::Bytes(b), _) => parsed.inputs.push(text(b)),
            (node::OUTPUT, Field::Bytes(b), _) => parsed.outputs.push(text(b)),
            (node::NAME, Field::Bytes(b), _) => parsed.name = text(b),
            (node::OP_TYPE, Field::Bytes(b), _) => parsed.op_type = text(b),
            (node::DOMAIN, Field::Bytes(b), _) => parsed.domain = text(b),
            (node::ATTRIBUTE, Field::Bytes(b), _) => attrs.push(b),
            _ => {}
        }
    }
    for attr in attrs {
        let (mut name, mut values) = (String::new(), Vec::new());
        for f in Fields(attr) {
            match f? {
                (attr::NAME, Field::Bytes(b), _) => name = text(b),
                (attr::I, Field::Varint(v), _) | (attr::INTS, Field::Varint(v), _) => values.push(v as i64),
                (attr::INTS, Field::Bytes(packed), _) => values.extend(packed_varints(packed)?.into_iter().map(|v| v as i64)),
                (attr::G | attr::GRAPHS, _, _) => return Err(GraphError::Subgraph(parsed.name.clone())),
                _ => {}
            }
        }
        parsed.ints.insert(name, values);
    }
    Ok(parsed)
}
