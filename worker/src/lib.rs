//! Heimdex workers: a runtime shared by every worker binary, the inference engine, media decoding and
//! the pipelines.
//!
//! - [`runtime`]: lifecycle (cold → loading → warming → warm → draining), the consume loop, retries
//!   and dead-lettering, health endpoints, the Redis heartbeat, the query-embedding consumer.
//! - [`pipeline`]: the trait a task kind implements; the runtime calls it and persists its output.
//! - [`error`]: [`TaskError`], whose disposition decides what happens to a message.
//! - [`engine`]: ONNX Runtime sessions behind owner threads with dynamic batching. Model files and
//!   the rewrites done to them at load are the `heimdex_models` crate's.
//! - [`media`]: ffmpeg decoding (audio samples, video frames), streamed.
//! - [`vision`] and [`index`]: the two pipelines.
//! - [`metrics`]: the `/metrics` series.
//! - [`cli`]: the binaries' shared command line and start-up.
//!
//! The `testing` feature adds what tests and the benchmarks (crate `heimdex-bench`) look at beyond the
//! public API: exact batch-size counts per model thread, the no-cache reference decoder, unpacked
//! Whisper windows, the vision pipeline's model threads. Worker binaries never need it.

pub mod cli;
pub mod engine;
pub mod error;
pub mod index;
pub mod media;
pub mod metrics;
pub mod pipeline;
pub mod runtime;
pub mod vision;

pub use error::TaskError;
pub use pipeline::{Persist, Pipeline, StageTimings, TaskInput};

/// The text of a caught panic's payload.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
