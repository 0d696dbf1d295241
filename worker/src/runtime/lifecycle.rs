//! The worker's lifecycle and the live facts about it that health checks, metrics and the Redis
//! heartbeat all read: one place, so they can never disagree.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use heimdex_shared::fleet::{ModelStatus, WorkerState, WorkerStatus};
use tokio::sync::watch;

use crate::metrics::Metrics;

pub struct Lifecycle {
    pub id: String,
    pub kind: String,
    pub concurrency: usize,
    state: watch::Sender<WorkerState>,
    details: Mutex<Details>,
    /// Jobs being processed now (shown in `heimdex status`).
    in_flight: Mutex<BTreeSet<String>>,
    tasks_done: AtomicU64,
    started_at: DateTime<Utc>,
}

#[derive(Default)]
struct Details {
    health_addr: String,
    models: Vec<ModelStatus>,
    warmup_ms: Option<f64>,
}

impl Lifecycle {
    pub fn new(id: String, kind: String, concurrency: usize) -> Self {
        let (state, _) = watch::channel(WorkerState::Cold);
        Self {
            id,
            kind,
            concurrency,
            state,
            details: Mutex::default(),
            in_flight: Mutex::default(),
            tasks_done: AtomicU64::new(0),
            started_at: Utc::now(),
        }
    }

    pub fn state(&self) -> WorkerState {
        *self.state.borrow()
    }

    /// Moves to `state`, logs it and mirrors it into the metrics.
    pub fn set_state(&self, state: WorkerState, metrics: &Metrics) {
        let previous = self.state.send_replace(state);
        if previous != state {
            tracing::info!(from = previous.as_str(), to = state.as_str(), "worker state");
        }
        let all: Vec<&str> = WorkerState::ALL.iter().map(|s| s.as_str()).collect();
        metrics.set_state(state.as_str(), &all);
    }

    /// Wakes on every state change (the heartbeat publishes at once).
    pub fn subscribe(&self) -> watch::Receiver<WorkerState> {
        self.state.subscribe()
    }

    pub fn set_health_addr(&self, addr: String) {
        self.details.lock().expect("lifecycle lock").health_addr = addr;
    }

    pub fn set_models(&self, models: Vec<ModelStatus>, warmup_ms: Option<f64>) {
        let mut d = self.details.lock().expect("lifecycle lock");
        d.models = models;
        d.warmup_ms = warmup_ms;
    }

    pub fn task_started(&self, job: &str) {
        self.in_flight.lock().expect("lifecycle lock").insert(job.to_string());
    }

    /// Whether a task is in flight now.
    pub fn busy(&self) -> bool {
        !self.in_flight.lock().expect("lifecycle lock").is_empty()
    }

    pub fn task_finished(&self, job: &str) {
        self.in_flight.lock().expect("lifecycle lock").remove(job);
        self.tasks_done.fetch_add(1, Ordering::Relaxed);
    }

    pub fn status(&self) -> WorkerStatus {
        let d = self.details.lock().expect("lifecycle lock");
        WorkerStatus {
            id: self.id.clone(),
            kind: self.kind.clone(),
            state: self.state(),
            host: hostname(),
            pid: std::process::id(),
            health_addr: d.health_addr.clone(),
            concurrency: self.concurrency,
            models: d.models.clone(),
            warmup_ms: d.warmup_ms,
            in_flight: self.in_flight.lock().expect("lifecycle lock").iter().cloned().collect(),
            tasks_done: self.tasks_done.load(Ordering::Relaxed),
            started_at: self.started_at,
            updated_at: Utc::now(),
        }
    }
}

pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_else(|| "localhost".into())
}
