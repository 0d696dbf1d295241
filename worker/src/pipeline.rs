//! The seam between the runtime and the work: a [`Pipeline`] turns one validated task into results,
//! and its [`Persist`] output writes them inside the runtime's transaction.
//!
//! The runtime owns everything around it (parsing, media checks, job bookkeeping, the transaction, the
//! ack, retries), so a new task kind is a new `Pipeline` and nothing else.

use std::future::Future;
use std::sync::Mutex;
use std::time::Instant;

use heimdex_shared::TaskOptions;
use heimdex_shared::contract::TaskKind;
use heimdex_shared::jobs::{FencedRun, Run};
use heimdex_shared::media::Probe;
use heimdex_shared::query::Embeddings;
use uuid::Uuid;

use crate::engine::WarmupReport;
use crate::error::TaskError;

/// A model as it is shown in fleet status.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub path: String,
}

/// One task, after the runtime has validated the message and the media.
#[derive(Clone, Debug)]
pub struct TaskInput {
    /// The run of the job this task carries out (ids as Heimdex holds them, the token that fences its
    /// writes, the attempt).
    pub run: Run,
    /// Where a pipeline may keep progress during the run (index checkpoints): the run's writes, fenced
    /// by its token like the results; `None` outside a worker.
    pub fenced: Option<FencedRun>,
    pub kind: TaskKind,
    /// A local file: under the media root, or remote media downloaded to a temporary file.
    pub media: String,
    /// What ffprobe said about the media.
    pub probe: Probe,
    pub options: TaskOptions,
}

/// Wall-clock time of each stage of a task, stored as jsonb on the job.
#[derive(Debug, Default)]
pub struct StageTimings(Mutex<Vec<(String, f64)>>);

impl StageTimings {
    /// Records `stage` as having taken the time since `started`.
    pub fn record(&self, stage: &str, started: Instant) {
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        self.0.lock().expect("timings lock").push((stage.to_string(), ms));
    }

    /// Times a future as `stage`.
    pub async fn time<T>(&self, stage: &str, fut: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let out = fut.await;
        self.record(stage, started);
        out
    }

    pub fn to_json(&self) -> serde_json::Value {
        let stages = self.0.lock().expect("timings lock");
        let mut map = serde_json::Map::new();
        for (stage, ms) in stages.iter() {
            let total = map.get(stage).and_then(serde_json::Value::as_f64).unwrap_or(0.0) + ms;
            map.insert(stage.clone(), serde_json::json!((total * 10.0).round() / 10.0));
        }
        serde_json::Value::Object(map)
    }
}

/// Results that know how to replace their earlier version in the database.
pub trait Persist: Send + 'static {
    /// Deletes this video's earlier results of the same kind and inserts these, on `conn`, which is
    /// inside the task's transaction (so a redelivered task replaces, never duplicates).
    fn write(&self, conn: &mut sqlx::PgConnection, video_id: Uuid) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// A short summary for logs and `jobs.summary` (`{"frames": 25, "faces": 2}`).
    fn summary(&self) -> serde_json::Value;
}

/// A task kind's work. Loaded once per process (models preloaded), warmed up, then shared by every
/// concurrent task.
pub trait Pipeline: Send + Sync + 'static {
    type Output: Persist;

    fn kind(&self) -> TaskKind;

    /// The models this pipeline holds, for fleet status.
    fn models(&self) -> Vec<ModelInfo>;

    /// Runs every model at every batch shape production uses, before the worker takes work.
    fn warm_up(&self) -> impl Future<Output = Result<Vec<WarmupReport>, TaskError>> + Send;

    /// Processes one task.
    fn process(&self, input: &TaskInput, timings: &StageTimings) -> impl Future<Output = Result<Self::Output, TaskError>> + Send;

    /// The name of the model [`Pipeline::embed_query`] embeds with, as it is stored beside the
    /// vectors (checked against a query's expected model before any inference).
    fn query_model(&self) -> &str;

    /// Embeds search queries (see `heimdex_shared::query`) with the model whose vectors this kind
    /// stores, on the same model thread as tasks (so they share batches with them), and names that
    /// model as it is stored beside the vectors.
    fn embed_query(&self, texts: Vec<String>) -> impl Future<Output = Result<Embeddings, TaskError>> + Send;
}

/// What a pipeline's loader gets: the settings, the engine that owns the sessions, and the model
/// registry that resolves and verifies model files.
pub struct LoadContext<'a> {
    pub settings: &'a heimdex_shared::Settings,
    pub engine: &'a crate::engine::Engine,
    pub models: &'a heimdex_models::registry::ModelRegistry,
}
