//! Heimdex's benchmarks (`bench-index`, `bench-vision`, `bench-query`, `bench-search`) and what they share, kept out of the worker
//! crate so that the product carries no measurement code. What they need of the worker beyond its
//! public API (the no-cache reference decoder, unpacked windows, batch histograms, the vision
//! pipeline's model handles) is behind heimdex-worker's `testing` feature.
//!
//! - [`measure`]: medians, timers, peak RSS, fresh child processes that print JSON.
//! - [`score`]: word error rate, shared with the index tests so that both score alike.
//! - [`recording`]: issue 8's long recording built from the bundle's speech clips.
//! - [`chunks`]: collect-then-transcribe baselines for the streaming transcription.
//! - [`scratch`]: a migrated scratch database per run.

pub mod chunks;
pub mod measure;
pub mod recording;
pub mod score;
pub mod scratch;
