//! Heimdex model files: which ones, where they come from, whether they are intact, and the byte-level
//! ONNX work done on them. None of it runs a model: this crate links no ONNX Runtime, tokenizer or
//! HTTP server, so the `heimdex-models` tool stays small and the worker crate holds only what runs.
//!
//! - [`catalog`]: the default models, every upstream file pinned by revision and sha256.
//! - [`download`], [`install`]: fetch a model's sources (bounded, resumable, checked), build what
//!   upstream does not ship, move the files into place (`heimdex-models download`).
//! - [`registry`]: a model directory as a worker sees it: resolve a file, verify its sha256 once.
//! - [`convert`]: the builders of Whisper's ONNX graphs and filterbank (from CTranslate2 weights) and
//!   MiniLM's ONNX encoder (from safetensors), byte-identical to the offline bundle's.
//! - [`onnx`]: the ONNX file format, once: field numbers per message, element types, the one reader,
//!   the one writer with typed messages (byte-identical to Python's `onnx`), and IEEE half floats.
//! - [`attention`], [`carve`], [`expose`], [`logits`], [`quantize`], [`shapes`]: in-memory rewrites a
//!   worker applies at load (an encoder's self-attention as one fused operator; the with-past
//!   decoder's missing cross-attention part; its cross-attention scores as outputs, for word
//!   timestamps; its logits for the last position only; 8-bit weights; YuNet at each frame's own
//!   size).
//!
//! The `testing` feature adds fixtures other crates' tests use (a model with each weight form the
//! int8 rewrite handles, which the worker runs in ONNX Runtime).

pub mod attention;
pub mod carve;
pub mod catalog;
pub mod convert;
pub mod download;
pub mod expose;
pub mod install;
pub mod logits;
pub mod onnx;
pub mod quantize;
pub mod registry;
pub mod shapes;
