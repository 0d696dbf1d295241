//! Prometheus metrics served on `/metrics`: tasks by kind and outcome, stage latencies, inference batch
//! sizes and latencies, warm-up duration, worker state and in-flight tasks.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub kind: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

/// Every metric of one worker process.
pub struct Metrics {
    registry: Registry,
    tasks: Family<TaskLabels, Counter>,
    stage_seconds: Family<StageLabels, Histogram>,
    batch_size: Family<ModelLabels, Histogram>,
    inference_seconds: Family<ModelLabels, Histogram>,
    warmup_seconds: Family<ModelLabels, Gauge<f64, AtomicU64>>,
    state: Family<StateLabels, Gauge>,
    in_flight: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("heimdex");
        let tasks = Family::<TaskLabels, Counter>::default();
        let stage_seconds = Family::<StageLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.005, 2.0, 16))) as fn() -> Histogram,
        );
        let batch_size = Family::<ModelLabels, Histogram>::new_with_constructor(
            (|| Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])) as fn() -> Histogram,
        );
        let inference_seconds = Family::<ModelLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.001, 2.0, 16))) as fn() -> Histogram,
        );
        let warmup_seconds = Family::<ModelLabels, Gauge<f64, AtomicU64>>::default();
        let state = Family::<StateLabels, Gauge>::default();
        let in_flight = Gauge::default();
        registry.register("tasks", "Tasks finished, by kind and outcome", tasks.clone());
        registry.register("stage_seconds", "Time spent in each task stage", stage_seconds.clone());
        registry.register("inference_batch_size", "Requests per inference batch", batch_size.clone());
        registry.register("inference_seconds", "Time of one inference batch", inference_seconds.clone());
        registry.register("warmup_seconds", "Warm-up time of each model", warmup_seconds.clone());
        registry.register("worker_state", "1 for the worker's current lifecycle state", state.clone());
        registry.register("tasks_in_flight", "Tasks being processed now", in_flight.clone());
        Self { registry, tasks, stage_seconds, batch_size, inference_seconds, warmup_seconds, state, in_flight }
    }

    pub fn task_finished(&self, kind: &str, outcome: &str) {
        self.tasks.get_or_create(&TaskLabels { kind: kind.into(), outcome: outcome.into() }).inc();
    }

    pub fn observe_stage(&self, stage: &str, seconds: f64) {
        self.stage_seconds.get_or_create(&StageLabels { stage: stage.into() }).observe(seconds);
    }

    pub fn observe_batch(&self, model: &str, size: usize, elapsed: Duration) {
        let labels = ModelLabels { model: model.into() };
        self.batch_size.get_or_create(&labels).observe(size as f64);
        self.inference_seconds.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }

    pub fn set_warmup(&self, model: &str, elapsed: Duration) {
        self.warmup_seconds.get_or_create(&ModelLabels { model: model.into() }).set(elapsed.as_secs_f64());
    }

    pub fn set_state(&self, current: &str, all: &[&str]) {
        for s in all {
            self.state.get_or_create(&StateLabels { state: (*s).into() }).set(i64::from(*s == current));
        }
    }

    pub fn in_flight(&self) -> &Gauge {
        &self.in_flight
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
