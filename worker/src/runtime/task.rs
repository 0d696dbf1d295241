//! One delivery, start to finish: parse → mark running → check media → probe → pipeline → one
//! transaction (results + job `succeeded`) → ack. Failures are routed by [`TaskError`]: permanent to
//! the dead-letter queue, retryable to the retry queue (then the DLQ), unavailable back to the queue.
//!
//! [`Worker::process_one`] is public so tests can drive a worker one delivery at a time.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use heimdex_shared::contract::TaskMessage;
use heimdex_shared::jobs::{self, Start, status};
use heimdex_shared::media;
use heimdex_shared::topology::{self, ATTEMPT_HEADER, ERROR_HEADER, Topology, WORKER_HEADER};
use heimdex_shared::Settings;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use sqlx::PgPool;
use tracing::Instrument;
use uuid::Uuid;

use super::lifecycle::Lifecycle;
use crate::error::TaskError;
use crate::metrics::Metrics;
use crate::pipeline::{Persist, Pipeline, StageTimings, TaskInput};

/// What became of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Results committed, message acked.
    Succeeded,
    /// The job had already succeeded (redelivery after a commit): acked without work.
    AlreadyDone,
    /// Permanent failure: job `failed`, message in the DLQ.
    Failed(String),
    /// Retryable failure: job `retrying`, message in a retry queue.
    Retried(String),
    /// Out of attempts: job `dead`, message in the DLQ.
    Dead(String),
    /// A dependency is down: message back on the queue, attempt not counted.
    Requeued(String),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::AlreadyDone => "already_done",
            Outcome::Failed(_) => "failed",
            Outcome::Retried(_) => "retried",
            Outcome::Dead(_) => "dead",
            Outcome::Requeued(_) => "requeued",
        }
    }
}

/// Everything a task needs, shared by all tasks of the process.
pub struct Worker<P: Pipeline> {
    pub pipeline: Arc<P>,
    pub pool: PgPool,
    /// Publishes retries and dead letters (confirms on); separate from the consuming channel so that
    /// broker flow control on publishes never stalls deliveries.
    pub publisher: Channel,
    pub topology: Topology,
    pub settings: Arc<Settings>,
    pub lifecycle: Arc<Lifecycle>,
    pub metrics: Arc<Metrics>,
    /// Told when the database looks down, so the consume loop pauses.
    pub db_down: Arc<tokio::sync::Notify>,
}

impl<P: Pipeline> Worker<P> {
    /// Handles one delivery completely, including its ack, and reports what happened.
    pub async fn process_one(&self, delivery: Delivery) -> Outcome {
        let attempt = topology::header_u32(&delivery.properties, ATTEMPT_HEADER).unwrap_or(1).max(1);
        let job_hint = delivery.properties.message_id().as_ref().and_then(|id| Uuid::parse_str(id.as_str()).ok());
        let timings = StageTimings::default();
        let message = match TaskMessage::parse(&delivery.data) {
            Ok(m) if m.kind != self.pipeline.kind() => Err(TaskError::permanent(format!(
                "task kind {} delivered to a {} worker (check the queue bindings)",
                m.kind,
                self.pipeline.kind()
            ))),
            Ok(m) => Ok(m),
            Err(e) => Err(TaskError::from(e)),
        };
        let (outcome, job) = match message {
            Err(error) => (self.fail(&delivery, job_hint, attempt, error, &timings).await, job_hint),
            Ok(msg) => {
                let span = tracing::info_span!("task", job_id = %msg.job_id, video_id = %msg.video_id, kind = %msg.kind, attempt);
                let job = msg.job_id.to_string();
                self.lifecycle.task_started(&job);
                self.metrics.in_flight().inc();
                let outcome = self.run_task(&delivery, &msg, attempt, &timings).instrument(span).await;
                self.metrics.in_flight().dec();
                self.lifecycle.task_finished(&job);
                (outcome, Some(msg.job_id))
            }
        };
        self.metrics.task_finished(self.pipeline.kind().as_str(), outcome.label());
        match &outcome {
            Outcome::Succeeded | Outcome::AlreadyDone => tracing::info!(job = ?job, outcome = outcome.label(), "task done"),
            other => tracing::warn!(job = ?job, outcome = other.label(), reason = ?other, "task did not succeed"),
        }
        outcome
    }

    async fn run_task(&self, delivery: &Delivery, msg: &TaskMessage, attempt: u32, timings: &StageTimings) -> Outcome {
        let started = std::time::Instant::now();
        let work = AssertUnwindSafe(self.execute(msg, attempt, timings)).catch_unwind();
        let result = match tokio::time::timeout(self.settings.worker.task_timeout(), work).await {
            Err(_) => Err(TaskError::retryable(format!(
                "timed out after {:?} (worker.task_timeout_ms)",
                self.settings.worker.task_timeout()
            ))),
            Ok(Err(panic)) => Err(TaskError::retryable(format!("task panicked: {}", panic_message(&*panic)))),
            Ok(Ok(result)) => result,
        };
        self.metrics.observe_stage("total", started.elapsed().as_secs_f64());
        match result {
            Ok(start) => {
                if self.settings.worker.failpoint == "hang_before_ack" {
                    tracing::warn!("failpoint hang_before_ack: parking after the commit, before the ack");
                    std::future::pending::<()>().await;
                }
                ack(delivery).await;
                if start == Start::AlreadyDone { Outcome::AlreadyDone } else { Outcome::Succeeded }
            }
            Err(error) => self.fail(delivery, Some(msg.job_id), attempt, error, timings).await,
        }
    }

    /// Everything up to and including the commit. Returns before the ack.
    async fn execute(&self, msg: &TaskMessage, attempt: u32, timings: &StageTimings) -> Result<Start, TaskError> {
        let worker_id = &self.lifecycle.id;
        if jobs::start_attempt(&self.pool, msg, worker_id, attempt).await? == Start::AlreadyDone {
            return Ok(Start::AlreadyDone);
        }
        if self.settings.worker.failpoint == "panic" {
            panic!("failpoint panic: simulated bug in a task");
        }
        let media_settings = &self.settings.media;
        let uri = media::resolve(&msg.media_uri, &media_settings.root, media_settings.allow_http)
            .map_err(|e| TaskError::permanent(e.to_string()))?;
        let probe = timings.time("probe", media::probe(&uri)).await.map_err(|e| TaskError::permanent(e.to_string()))?;
        let input = TaskInput {
            job_id: msg.job_id,
            video_id: msg.video_id,
            kind: msg.kind,
            media: uri,
            probe,
            options: msg.options.clone(),
            attempt,
        };
        let output = self.pipeline.process(&input, timings).await?;
        let persist_started = std::time::Instant::now();
        let mut tx = self.pool.begin().await?;
        output.write(&mut tx, msg.video_id).await?;
        jobs::update_probe(&mut tx, msg.video_id, &input.probe).await?;
        timings.record("persist", persist_started);
        jobs::finish_success(&mut tx, msg, &timings.to_json(), &output.summary()).await?;
        tx.commit().await?;
        for (stage, ms) in timings.to_json().as_object().into_iter().flatten() {
            self.metrics.observe_stage(stage, ms.as_f64().unwrap_or(0.0) / 1000.0);
        }
        Ok(Start::Run)
    }

    /// Routes a failure: DLQ, retry queue, or back to the queue.
    async fn fail(&self, delivery: &Delivery, job: Option<Uuid>, attempt: u32, error: TaskError, timings: &StageTimings) -> Outcome {
        let reason = error.to_string();
        let kind = self.pipeline.kind();
        let max = self.settings.worker.max_attempts;
        let (new_status, outcome) = match error {
            TaskError::Unavailable(_) => {
                self.db_down.notify_one();
                nack_requeue(delivery).await;
                return Outcome::Requeued(reason);
            }
            TaskError::Permanent(_) => (status::FAILED, Outcome::Failed(reason.clone())),
            TaskError::Retryable(_) if attempt >= max => {
                (status::DEAD, Outcome::Dead(format!("gave up after {attempt} attempts: {reason}")))
            }
            TaskError::Retryable(_) => (status::RETRYING, Outcome::Retried(reason.clone())),
        };
        let stored_reason = match &outcome {
            Outcome::Dead(r) => r.clone(),
            _ => reason.clone(),
        };
        if let Some(job) = job {
            let recorded = jobs::record_failure(&self.pool, job, new_status, &stored_reason, attempt, &self.lifecycle.id, &timings.to_json()).await;
            if let Err(e) = recorded {
                if heimdex_shared::db::is_unavailable(&e) {
                    // The outcome could not be recorded: keep the message and pause.
                    self.db_down.notify_one();
                    nack_requeue(delivery).await;
                    return Outcome::Requeued(format!("{reason} (and the database is unavailable: {e})"));
                }
                tracing::warn!(error = %e, "could not record the failure on the job");
            }
        }
        let headers = [
            (ERROR_HEADER, topology::text(&stored_reason)),
            (WORKER_HEADER, topology::text(&self.lifecycle.id)),
        ];
        let (queue, properties) = if new_status == status::RETRYING {
            let delay = Topology::backoff_ms(&self.settings.worker, attempt);
            let mut headers = headers.to_vec();
            headers.push((ATTEMPT_HEADER, AMQPValue::LongUInt(attempt + 1)));
            (self.topology.retry_queue(kind, delay), topology::with_headers(&delivery.properties, &headers))
        } else {
            let mut headers = headers.to_vec();
            headers.push((ATTEMPT_HEADER, AMQPValue::LongUInt(attempt)));
            (self.topology.dlq(kind), topology::with_headers(&delivery.properties, &headers))
        };
        match topology::publish_confirmed(&self.publisher, "", &queue, &delivery.data, properties).await {
            Ok(()) => ack(delivery).await,
            Err(e) => {
                // Not safely elsewhere yet: leave it on the work queue rather than lose it.
                tracing::error!(error = %e, queue, "could not move the message; requeueing it");
                nack_requeue(delivery).await;
            }
        }
        outcome
    }
}

async fn ack(delivery: &Delivery) {
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        tracing::warn!(error = %e, "ack failed; the broker will redeliver");
    }
}

async fn nack_requeue(delivery: &Delivery) {
    if let Err(e) = delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await {
        tracing::warn!(error = %e, "nack failed; the broker will redeliver");
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
