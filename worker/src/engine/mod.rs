//! The inference engine: one ONNX Runtime session per model per process, each owned by a model thread
//! that batches requests from every concurrent task.
//!
//! - [`batcher`]: the owner thread, its bounded request channel and dynamic batching.
//!
//! Model files (where they are, their sha256) and the in-memory rewrites done at load (the carved
//! cross-attention model, the int8 MatMuls, YuNet's free input size) are the `heimdex_models`
//! crate's; this module only runs what it is given.
//!
//! Why owner threads: `Session::run` takes `&mut self`. A mutex around a session serialises tasks
//! without batching them, and a session per task multiplies memory; one thread per model that drains
//! its queue into one batch gives both the memory of one session and the throughput of batching
//! (RECIPE.md measured an owner thread as the fastest way to drive a session).

pub mod batcher;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use heimdex_models::onnx::nodes::GraphError;
use heimdex_models::quantize::{Scheme, Scope, quantize_matmuls};
use heimdex_shared::config::EngineSettings;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;

pub use batcher::{BatchRunner, ModelHandle};

use crate::metrics::Metrics;

/// Why inference failed. Model failures are retryable: the input was accepted by every check before
/// it reached the model, so a failure here is the engine's, not the video's.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("onnx runtime: {0}")]
    Ort(String),
    #[error("model {model}: {message}")]
    Model { model: String, message: String },
    #[error("model {0} is not running (its thread stopped)")]
    Closed(String),
    /// The model thread panicked; it has stopped, and the worker must restart to get the model back.
    #[error("model {model} panicked: {message}")]
    Panicked { model: String, message: String },
    #[error("cannot load onnx runtime library: {0}")]
    Library(String),
}

impl<T> From<ort::Error<T>> for InferenceError {
    fn from(e: ort::Error<T>) -> Self {
        InferenceError::Ort(e.to_string())
    }
}

/// Shared engine state: the ONNX Runtime environment, the session options and the metrics sink.
#[derive(Clone)]
pub struct Engine {
    env: ort::environment::Environment,
    settings: EngineSettings,
    metrics: Arc<Metrics>,
    /// Testing hook (`worker.failpoint = model_panic:NAME`), armed by the runtime once warm: the
    /// next task batch of model NAME panics inside its owner thread.
    panic_next: batcher::Failpoint,
}

impl Engine {
    /// Loads the ONNX Runtime library (from `ORT_DYLIB_PATH`, else the system's `libonnxruntime.so`)
    /// and creates the environment.
    ///
    /// # Errors
    /// The library cannot be found or is older than the API this build needs (1.31).
    pub fn new(settings: EngineSettings, metrics: Arc<Metrics>) -> Result<Self, InferenceError> {
        let path = std::env::var("ORT_DYLIB_PATH").unwrap_or_else(|_| "libonnxruntime.so".into());
        let env = ort::init_from(&path)
            .map_err(|e| InferenceError::Library(format!("{path}: {e} (run scripts/setup, or set ORT_DYLIB_PATH)")))?
            .with_name("heimdex")
            .build()?;
        Ok(Self { env, settings, metrics, panic_next: Arc::default() })
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// This engine with one intra-op thread per session, for a small model that runs beside a large
    /// one: on the large model's cores, a pool of its own only adds contention and spinning.
    #[must_use]
    pub fn single_threaded(&self) -> Self {
        let mut engine = self.clone();
        engine.settings.intra_threads = 1;
        engine
    }

    /// This engine with intra-op threads that spin as `spinning` says, unless `engine.allow_spinning`
    /// is set (see there).
    #[must_use]
    pub fn spinning_by_default(&self, spinning: bool) -> Self {
        let mut engine = self.clone();
        engine.settings.allow_spinning.get_or_insert(spinning);
        engine
    }

    /// Creates a session for `path` with the configured threads; called once per model at start-up.
    ///
    /// # Errors
    /// The file is not a model ONNX Runtime can load.
    pub fn session(&self, path: &Path) -> Result<Session, InferenceError> {
        self.session_with(path, Memory::Arena)
    }

    /// As [`Engine::session`], with the given memory policy.
    ///
    /// # Errors
    /// The file is not a model ONNX Runtime can load.
    pub fn session_with(&self, path: &Path, memory: Memory) -> Result<Session, InferenceError> {
        self.builder(memory)?
            .commit_from_file(path)
            .map_err(|e| InferenceError::Model { model: path.display().to_string(), message: e.to_string() })
    }

    /// As [`Engine::session_with`], for a model built in memory (a carved sub-model); `name` names it
    /// in errors.
    ///
    /// # Errors
    /// The bytes are not a model ONNX Runtime can load.
    pub fn session_from_memory(&self, name: &str, model: &[u8], memory: Memory) -> Result<Session, InferenceError> {
        self.builder(memory)?
            .commit_from_memory(model)
            .map_err(|e| InferenceError::Model { model: name.to_string(), message: e.to_string() })
    }

    fn builder(&self, memory: Memory) -> Result<ort::session::builder::SessionBuilder, InferenceError> {
        let builder = Session::builder(&self.env)?
            .with_optimization_level(GraphOptimizationLevel::All)?
            .with_intra_threads(self.settings.threads())?
            .with_intra_op_spinning(self.settings.spinning())?;
        Ok(match memory {
            Memory::Arena => builder,
            Memory::Bounded => {
                large_buffers_to_mmap();
                builder
                    .with_execution_providers([ort::ep::CPU::default().with_arena_allocator(false).build()])?
                    .with_memory_pattern(false)?
            }
        })
    }

    /// Starts the owner thread of a model with the configured batching: a batch runs when it is full
    /// or `engine.max_wait_ms` after its first request, so requests sent close together share it.
    pub fn spawn<R: BatchRunner>(&self, name: &str, runner: R, max_batch: usize) -> ModelHandle<R> {
        self.spawn_waiting(name, runner, max_batch, self.settings.max_wait())
    }

    /// Starts the owner thread of a model whose callers send each batch at once (a task embeds all
    /// of its transcript in one call; a search query is one text): it runs whatever is queued without
    /// waiting for more, so a lone query does not pay the batching wait (measured by bench-query:
    /// p50 16.9 ms with the 5 ms wait, 9.9 ms without).
    pub fn spawn_eager<R: BatchRunner>(&self, name: &str, runner: R, max_batch: usize) -> ModelHandle<R> {
        self.spawn_waiting(name, runner, max_batch, Duration::ZERO)
    }

    fn spawn_waiting<R: BatchRunner>(&self, name: &str, runner: R, max_batch: usize, max_wait: Duration) -> ModelHandle<R> {
        ModelHandle::spawn(
            name,
            runner,
            batcher::BatchConfig { max_batch: max_batch.max(1), max_wait, queue_capacity: self.settings.queue_capacity.max(1) },
            self.metrics.clone(),
            self.panic_next.clone(),
        )
    }

    /// Testing hook: the next batch of task requests (not an exact warm-up batch) of `model` panics
    /// in its owner thread, as a bug in a runner would.
    pub fn arm_model_panic(&self, model: &str) {
        *self.panic_next.lock().expect("failpoint lock") = Some(model.to_string());
    }
}

/// `model` with its MatMuls in `scope` in int8 by `scheme` (see [`heimdex_models::quantize`]); `name`
/// names it in errors and in the log. Takes the bytes so that they are freed as soon as the rewrite
/// is made.
///
/// # Errors
/// The bytes are not an ONNX model the rewrite can read, or lack the scope's output.
pub fn int8(name: &str, model: Vec<u8>, scheme: Scheme, scope: Scope<'_>) -> Result<Vec<u8>, InferenceError> {
    let started = std::time::Instant::now();
    let (out, stats) = quantize_matmuls(&model, scheme, scope)
        .map_err(|e| InferenceError::Model { model: name.into(), message: format!("rewriting with int8 weights: {e}") })?;
    drop(model);
    tracing::info!(
        model = name,
        scheme = ?scheme,
        matmuls = stats.matmuls,
        skipped = stats.skipped,
        outside = stats.outside,
        gathers = stats.gathers,
        mb = out.len() / 1_000_000,
        ms = started.elapsed().as_millis() as u64,
        "int8 weights"
    );
    Ok(out)
}

/// `model` with each self-attention of the converter's unmasked shape as ONNX Runtime's fused
/// `MultiHeadAttention` (see [`heimdex_models::attention`]); `name` names it in errors and in the log.
///
/// # Errors
/// The bytes are not an ONNX model the rewrite can read.
pub fn fused_attention(name: &str, model: Vec<u8>) -> Result<Vec<u8>, InferenceError> {
    rewrite(name, model, "fusing attention", heimdex_models::attention::fuse_attention)
}

/// `model` with each attention's scale moved from its scores onto its queries (see
/// [`heimdex_models::attention::scale_queries`]); `name` names it in errors and in the log.
///
/// # Errors
/// The bytes are not an ONNX model the rewrite can read.
pub fn scaled_queries(name: &str, model: Vec<u8>) -> Result<Vec<u8>, InferenceError> {
    rewrite(name, model, "moving the attention scale onto the queries", heimdex_models::attention::scale_queries)
}

/// `model` with its logits computed for the last position only (see [`heimdex_models::logits`]);
/// `name` names it in errors and in the log.
///
/// # Errors
/// The bytes are not an ONNX model the rewrite can read.
pub fn last_position_logits(name: &str, model: Vec<u8>) -> Result<Vec<u8>, InferenceError> {
    rewrite(name, model, "computing the logits for the last position only", |m| {
        heimdex_models::logits::last_position_logits(m).map(|(out, changed)| (out, usize::from(changed)))
    })
}

/// Runs one of the graph rewrites at load, `what`, and logs how many places it changed and how long
/// it took.
fn rewrite<R>(name: &str, model: Vec<u8>, what: &str, rewrite: R) -> Result<Vec<u8>, InferenceError>
where
    R: FnOnce(&[u8]) -> Result<(Vec<u8>, usize), GraphError>,
{
    let started = std::time::Instant::now();
    let (out, changed) = rewrite(&model).map_err(|e| InferenceError::Model { model: name.into(), message: format!("{what}: {e}") })?;
    tracing::info!(model = name, changed, ms = started.elapsed().as_millis() as u64, "{what}");
    Ok(out)
}

/// How a session holds its working memory (activations between and within runs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Memory {
    /// ONNX Runtime's CPU arena and memory patterns: buffers are kept and reused, so the largest batch
    /// a session ever ran stays resident (the default; fine for models with small activations).
    Arena,
    /// No arena, no memory pattern: a run's buffers go back to the allocator when it ends, so models
    /// that take turns on one thread (Whisper's encoder and decoder) do not each keep their peak.
    /// Measured on the index pipeline: see `IndexPipeline::load`.
    Bounded,
}

/// Buffers of at least [`MMAP_THRESHOLD`] bytes are mapped for themselves and unmapped when freed,
/// process-wide, from the first [`Memory::Bounded`] session on.
///
/// Why: a bounded session hands every run's buffers back to glibc's malloc. By default malloc raises
/// its mmap threshold to the size of the largest mapped buffer freed (up to 32 MiB) and its trim
/// threshold to twice that, so after Whisper's first large free, buffers up to 32 MiB come from the
/// heap arenas of the threads that ran them, and each arena keeps up to 64 MiB free at its top
/// without giving it back. Setting the threshold turns that adjustment off: 16 MiB and more is
/// mapped, and heaps are trimmed at malloc's default 128 KiB. Measured with one 600 s recording
/// (`bench-index --parts rss-long --rss-long 1`, AMD EPYC with AVX-512 VNNI): peak RSS 924 and 926
/// MB (570 after warm-up), with this 669 and 673 MB; 4 MiB (as `MALLOC_MMAP_THRESHOLD_`) gave 621
/// MB and a 1 MiB trim threshold 510 MB, but their runs took 6 % and 58 % longer than 16 MiB's.
/// The workspace's one `unsafe`: a call into the C library, which has no safe wrapper.
#[allow(unsafe_code)]
fn large_buffers_to_mmap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static SET: std::sync::Once = std::sync::Once::new();
        SET.call_once(|| {
            // SAFETY: mallopt only sets a parameter of glibc's allocator; any thread may call it.
            if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) } != 1 {
                tracing::warn!(threshold = MMAP_THRESHOLD, "could not set malloc's mmap threshold");
            }
        });
    }
}

/// See [`large_buffers_to_mmap`].
const MMAP_THRESHOLD: i32 = 16 << 20;

/// How long warm-up of one model took, for Redis, `/metrics` and the benchmark.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WarmupReport {
    pub model: String,
    pub batch_sizes: Vec<usize>,
    pub duration: Duration,
}

/// Scales an embedding to unit length, as every embedder stores it (a zero vector stays zero).
pub fn l2_normalise(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use heimdex_models::quantize::{Activations, QuantizeStats, fixtures};
    use ort::value::Tensor;

    use super::*;

    fn run(engine: &Engine, model: &[u8]) -> Vec<Vec<f32>> {
        let mut s = engine.session_from_memory("test", model, Memory::Bounded).unwrap();
        let x: Vec<f32> = (0..16).map(|i| ((i * 5 % 16) as f32 - 8.0) / 8.0).collect();
        let x = Tensor::from_array(([2usize, 8], x)).unwrap();
        let ids = Tensor::from_array(([2usize], vec![3i64, 6])).unwrap();
        let out = s.run(ort::inputs!["x" => x, "ids" => ids]).unwrap();
        ["y1", "y2", "y3", "y4"].iter().map(|y| out[*y].try_extract_tensor::<f32>().unwrap().1.to_vec()).collect()
    }

    /// The int8 rewrites, run: each MatMul form agrees with fp32 within int8 error in both schemes
    /// (by rows, in the activation range this CPU computes exactly, and in the 7-bit range, exact
    /// everywhere: the full range on an AVX2 CPU was 4 % of the output's range off), the fp16
    /// Gather is exact, and the rewritten model rewritten again still loads and agrees.
    #[test]
    fn int8_matmuls_match_fp32_within_int8_error() {
        let settings = EngineSettings { intra_threads: 1, ..Default::default() };
        let engine = Engine::new(settings, Arc::new(Metrics::new())).unwrap();
        let model = fixtures::matmul_forms();
        let want = run(&engine, &model);
        for scheme in [Scheme::Blocks, Scheme::Rows(Activations::for_this_cpu()), Scheme::Rows(Activations::Int7)] {
            let (int8, stats) = quantize_matmuls(&model, scheme, Scope::All).unwrap();
            assert_eq!(stats, QuantizeStats { matmuls: 3, skipped: 0, outside: 0, gathers: 1 });
            let got = run(&engine, &int8);
            for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                assert_eq!(w.len(), g.len());
                let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = w.iter().zip(g).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                // Weights to 1/127 and activations to 1/127 (1/63) of their block's (column's, row's) range.
                assert!(err <= 0.03 * scale, "{scheme:?} y{}: max error {err} against max |y| {scale}: {w:?} vs {g:?}", i + 1);
                assert!(err > 0.0 || i == 2, "{scheme:?} y{}: exactly fp32's, so not computed in int8", i + 1);
                if i == 2 {
                    assert_eq!(w, g, "the fp16 gather is exact");
                }
            }
            let (again, _) = quantize_matmuls(&int8, scheme, Scope::All).unwrap();
            assert_eq!(run(&engine, &again), got, "{scheme:?}");
        }
    }

    /// The attention rewrites, run: ONNX Runtime's MultiHeadAttention computes what the converter's
    /// nodes do (to float rounding), alone and under the int8 rewrite by rows that follows it at load;
    /// the scale moved onto the queries gives the same numbers.
    #[test]
    fn the_attention_rewrites_compute_the_graphs_attention() {
        use heimdex_models::attention::fixtures::{self, HIDDEN, TOKENS};
        let settings = EngineSettings { intra_threads: 1, ..Default::default() };
        let engine = Engine::new(settings, Arc::new(Metrics::new())).unwrap();
        let run = |model: &[u8]| {
            let mut s = engine.session_from_memory("test", model, Memory::Bounded).unwrap();
            let x: Vec<f32> = (0..TOKENS * HIDDEN).map(|i| ((i * 7 % 23) as f32 - 11.0) / 6.0).collect();
            let out = s.run(ort::inputs!["x" => Tensor::from_array(([1usize, TOKENS, HIDDEN], x)).unwrap()]).unwrap();
            out["y"].try_extract_tensor::<f32>().unwrap().1.to_vec()
        };
        let model = fixtures::self_attention(false);
        let fused = fused_attention("test", model.clone()).unwrap();
        assert_ne!(fused, model, "nothing was fused");
        let (want, got) = (run(&model), run(&fused));
        let err = want.iter().zip(&got).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err < 1e-5, "max error {err}: {want:?} vs {got:?}");
        let rows = Scheme::Rows(Activations::for_this_cpu());
        let (want, got) =
            (run(&quantize_matmuls(&model, rows, Scope::All).unwrap().0), run(&quantize_matmuls(&fused, rows, Scope::All).unwrap().0));
        let err = want.iter().zip(&got).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err < 1e-5, "under int8 by rows, max error {err}: {want:?} vs {got:?}");
        // The scale on the queries, with and without a mask: the same numbers (the fixture's scale
        // is 1/2, a power of two).
        for mask in [false, true] {
            let model = fixtures::self_attention(mask);
            let moved = scaled_queries("test", model.clone()).unwrap();
            assert_ne!(moved, model, "nothing was moved");
            assert_eq!(run(&model), run(&moved), "mask {mask}");
        }
    }

    /// A pipeline's spinning default fills an unset `engine.allow_spinning` and yields to a set one.
    #[test]
    fn a_pipelines_spinning_default_yields_to_the_setting() {
        let base = Engine::new(EngineSettings::default(), Arc::new(Metrics::new())).unwrap();
        let engine = |set| {
            let mut engine = base.clone();
            engine.settings.allow_spinning = set;
            engine
        };
        assert!(engine(None).settings().spinning(), "ONNX Runtime's default");
        assert!(!engine(None).spinning_by_default(false).settings().spinning());
        assert!(engine(Some(true)).spinning_by_default(false).settings().spinning());
        assert!(!engine(Some(false)).spinning_by_default(true).settings().spinning());
    }

    /// The logits rewrite, run: ONNX Runtime gives [batch, 1, vocabulary], each row's last position's
    /// logits as the whole graph computes them.
    #[test]
    fn the_last_position_logits_are_the_graphs() {
        use heimdex_models::logits::fixtures::{self, HIDDEN, VOCAB};
        let settings = EngineSettings { intra_threads: 1, ..Default::default() };
        let engine = Engine::new(settings, Arc::new(Metrics::new())).unwrap();
        let (batch, positions) = (2, 5);
        let run = |model: &[u8]| {
            let mut s = engine.session_from_memory("test", model, Memory::Bounded).unwrap();
            let h: Vec<f32> = (0..batch * positions * HIDDEN).map(|i| ((i * 5 % 13) as f32 - 6.0) / 3.0).collect();
            let out = s.run(ort::inputs!["h" => Tensor::from_array(([batch, positions, HIDDEN], h)).unwrap()]).unwrap();
            let (shape, logits) = out["logits"].try_extract_tensor::<f32>().unwrap();
            (shape.to_vec(), logits.to_vec())
        };
        let model = fixtures::head();
        let (all_shape, all) = run(&model);
        let (shape, last) = run(&last_position_logits("test", model).unwrap());
        assert_eq!(all_shape, [batch as i64, positions as i64, VOCAB as i64]);
        assert_eq!(shape, [batch as i64, 1, VOCAB as i64]);
        for b in 0..batch {
            let want = &all[(b * positions + positions - 1) * VOCAB..][..VOCAB];
            let got = &last[b * VOCAB..][..VOCAB];
            let err = want.iter().zip(got).fold(0f32, |m, (a, c)| m.max((a - c).abs()));
            assert!(err < 1e-6, "row {b}: max error {err}: {want:?} vs {got:?}");
        }
    }
}
