//! One delivery, start to finish: parse (bounded) → start a fenced run (attempt counted first) →
//! check media → probe → pipeline → one transaction (results + job `succeeded`, only while the run
//! still holds the job) → ack. Failures are routed by their [`Disposition`]: permanent to the
//! dead-letter queue, retryable to the retry queue (then the DLQ), unavailable back to the queue with
//! the attempt given back.
//!
//! [`Worker::process_one`] is public so tests can drive a worker one delivery at a time.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use heimdex_shared::Settings;
use heimdex_shared::config::Failpoint;
use heimdex_shared::contract::TaskMessage;
use heimdex_shared::error::{Dependency, Disposition, cap};
use heimdex_shared::jobs::{self, FencedRun, JobStatus, Run, Start};
use heimdex_shared::topology::{self, ATTEMPT_HEADER, ERROR_HEADER, Topology, WORKER_HEADER};
use heimdex_shared::{media, remote, s3};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::AMQPValue;
use sqlx::PgPool;
use tokio::sync::RwLock;
use tracing::Instrument;
use uuid::Uuid;

use super::broker::Broker;
use super::lifecycle::Lifecycle;
use crate::error::TaskError;
use crate::metrics::Metrics;
use crate::pipeline::{Persist, Pipeline, StageTimings, TaskInput};

/// How often a running task checks that its run still holds the job, so a superseded run stops.
const FENCE_POLL: Duration = Duration::from_secs(2);
/// Longest pause before handing a message back when its retry copy could not be published.
const REQUEUE_PAUSE_MAX: Duration = Duration::from_secs(5);

/// What became of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Results committed, message acked.
    Succeeded,
    /// The job had already succeeded (redelivery after a commit): acked without work.
    AlreadyDone,
    /// Another copy of the same enqueue's message runs or ran the job: this copy is acked without work.
    Duplicate,
    /// A newer enqueue or run took the job over (a forced re-run, a redelivery), or the message is a
    /// copy from an earlier enqueue: nothing written, acked.
    Superseded,
    /// Permanent failure: job `failed`, message in the DLQ.
    Failed(String),
    /// Retryable failure: job `retrying`, message in a retry queue.
    Retried(String),
    /// Out of attempts: job `dead`, message in the DLQ.
    Dead(String),
    /// A dependency is down: message back on the queue, attempt given back.
    Requeued(String),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::AlreadyDone => "already_done",
            Outcome::Duplicate => "duplicate",
            Outcome::Superseded => "superseded",
            Outcome::Failed(_) => "failed",
            Outcome::Retried(_) => "retried",
            Outcome::Dead(_) => "dead",
            Outcome::Requeued(_) => "requeued",
        }
    }
}

/// What the consume loop must know about the worker's dependencies.
#[derive(Default)]
pub struct Alarms {
    /// Told when the database looks down, so the consume loop pauses.
    pub db_down: tokio::sync::Notify,
    /// Told when a model thread died, so the consume loop stops and the process exits for a restart.
    pub model_down: tokio::sync::Notify,
    /// Why the model died (for the exit message).
    pub model_failure: Mutex<Option<String>>,
    /// Runs whose attempt could not be given back while the database was down; given back before
    /// consuming resumes.
    pub unreleased: Mutex<Vec<Run>>,
}

/// Everything a task needs, shared by all tasks of the process.
pub struct Worker<P: Pipeline> {
    pub pipeline: Arc<P>,
    pub pool: PgPool,
    /// The broker link: consuming channels, and the confirming channel that publishes retries and
    /// dead letters (separate, so that flow control on publishes never stalls deliveries).
    pub broker: Broker,
    pub settings: Arc<Settings>,
    pub lifecycle: Arc<Lifecycle>,
    pub metrics: Arc<Metrics>,
    pub alarms: Alarms,
    /// Every task holds it shared; a task whose previous run died with its worker holds it alone
    /// (see [`Worker::run_task`]).
    pub isolation: Arc<RwLock<()>>,
}

impl<P: Pipeline> Worker<P> {
    pub fn topology(&self) -> &Topology {
        self.broker.topology()
    }

    /// Handles one delivery completely, including its ack, and reports what happened.
    pub async fn process_one(&self, delivery: Delivery) -> Outcome {
        let job_hint = delivery.properties.message_id().as_ref().and_then(|id| Uuid::parse_str(id.as_str()).ok());
        let message = TaskMessage::parse(&delivery.data).map_err(TaskError::from).and_then(|m| {
            if m.kind == self.pipeline.kind() {
                Ok(m)
            } else {
                Err(TaskError::permanent(format!(
                    "task kind {} delivered to a {} worker (check the queue bindings)",
                    m.kind,
                    self.pipeline.kind()
                )))
            }
        });
        let (outcome, job) = match message {
            Err(error) => (self.refuse(&delivery, job_hint, &error).await, job_hint),
            Ok(mut msg) => {
                // Heimdex identifies a video by its canonical URI, as the producer stores it: a message
                // from elsewhere that names the same file differently (relative to the media root,
                // through a symlink) is the same video. A URI that does not resolve stays as it came
                // and fails in its run with the reason. Resolved once, here.
                let media_settings = &self.settings.media;
                let resolved = media::resolve(&msg.media_uri, &media_settings.root, media_settings.allow_http)
                    .map(|canonical| msg.media_uri = canonical);
                let span = tracing::info_span!("task", job_id = %msg.job_id, video_id = %msg.video_id, kind = %msg.kind, attempt = tracing::field::Empty);
                let job = msg.job_id.to_string();
                self.lifecycle.task_started(&job);
                self.metrics.in_flight().inc();
                let outcome = self.run_task(&delivery, &msg, resolved).instrument(span).await;
                self.metrics.in_flight().dec();
                self.lifecycle.task_finished(&job);
                (outcome, Some(msg.job_id))
            }
        };
        self.metrics.task_finished(self.pipeline.kind().as_str(), outcome.label());
        match &outcome {
            Outcome::Succeeded | Outcome::AlreadyDone | Outcome::Duplicate | Outcome::Superseded => {
                tracing::info!(job = ?job, outcome = outcome.label(), "task done");
            }
            other => tracing::warn!(job = ?job, outcome = other.label(), reason = ?other, "task did not succeed"),
        }
        outcome
    }

    /// Starts a run and carries it out. A run that follows a death of the worker may be what killed
    /// it, so it runs alone: it waits until the tasks in flight are done and no other task starts
    /// meanwhile, so that the next time it takes no other task down with it. (The lock is fair: new
    /// tasks queue behind a waiting exclusive one; two of those take turns.)
    async fn run_task(&self, delivery: &Delivery, msg: &TaskMessage, resolved: Result<(), media::MediaError>) -> Outcome {
        let worker = &self.settings.worker;
        let shared = self.isolation.clone().read_owned().await;
        let run = match jobs::start_run(&self.pool, msg, &self.lifecycle.id, delivery.redelivered, worker.max_attempts).await {
            Ok(Start::Run(run)) => run,
            Ok(Start::AlreadyDone) => {
                ack(delivery).await;
                return Outcome::AlreadyDone;
            }
            Ok(Start::Duplicate) => {
                ack(delivery).await;
                return Outcome::Duplicate;
            }
            Ok(Start::Superseded) => {
                tracing::info!("a copy from an earlier enqueue of this job: acked without work");
                ack(delivery).await;
                return Outcome::Superseded;
            }
            Ok(Start::DeadLetter { attempts, reason }) => {
                self.route(delivery, &self.topology().dlq(msg.kind), &reason, attempts, None).await;
                return Outcome::Dead(reason);
            }
            Err(e) => {
                // No run started, so the attempt travels in the header only.
                let attempt = topology::header_u32(&delivery.properties, ATTEMPT_HEADER).unwrap_or(1);
                return self.fail(delivery, None, attempt, TaskError::from(e), &StageTimings::default()).await;
            }
        };
        tracing::Span::current().record("attempt", run.attempt);
        // Held until the task ends.
        let (_shared, _alone) = if run.deaths > 0 {
            drop(shared);
            let alone = self.isolation.clone().write_owned().await;
            tracing::info!("the run before this one died: running it alone");
            (None, Some(alone))
        } else {
            (Some(shared), None)
        };
        if let Failpoint::CrashOn(needle) = &worker.failpoint
            && msg.media_uri.contains(needle.as_str())
        {
            // Testing hook: a video that kills its worker, as an OOM kill or a segfault in a decoder would.
            tracing::error!(media = %remote::redact(&msg.media_uri), "failpoint crash_on: aborting the process");
            std::process::abort();
        }
        let timings = StageTimings::default();
        // The time bound starts at the base and follows the media's duration once it is probed.
        let started = tokio::time::Instant::now();
        let (bound_tx, mut bound) =
            tokio::sync::watch::channel(worker.task_timeout(None, Duration::ZERO, self.settings.amqp.consumer_timeout_ms));
        let fenced = FencedRun::new(self.pool.clone(), run);
        let work = AssertUnwindSafe(self.execute(msg, resolved, &fenced, &timings, &bound_tx)).catch_unwind();
        tokio::pin!(work);
        let superseded = superseded(&fenced);
        tokio::pin!(superseded);
        let result = loop {
            let limit = *bound.borrow_and_update();
            tokio::select! {
                result = &mut work => break match result {
                    Err(panic) => Err(TaskError::Panicked(crate::panic_message(&*panic))),
                    Ok(result) => result,
                },
                () = tokio::time::sleep_until(started + limit) => break Err(TaskError::Timeout(limit)),
                Ok(()) = bound.changed() => {}
                () = &mut superseded => break Ok(false),
            }
        };
        self.metrics.observe_stage("total", started.elapsed().as_secs_f64());
        match result {
            Ok(true) => {
                if worker.failpoint == Failpoint::HangBeforeAck {
                    tracing::warn!("failpoint hang_before_ack: parking after the commit, before the ack");
                    std::future::pending::<()>().await;
                }
                ack(delivery).await;
                Outcome::Succeeded
            }
            Ok(false) => {
                tracing::warn!("a newer run took this job over; this run stops without writing");
                ack(delivery).await;
                Outcome::Superseded
            }
            Err(error) => self.fail(delivery, Some(run), run.attempt, error, &timings).await,
        }
    }

    /// Everything up to and including the commit; false when the run no longer holds the job.
    /// `resolved` is what resolving `msg.media_uri` gave (the URI is canonical when it is `Ok`).
    async fn execute(
        &self,
        msg: &TaskMessage,
        resolved: Result<(), media::MediaError>,
        fenced: &FencedRun,
        timings: &StageTimings,
        bound: &tokio::sync::watch::Sender<Duration>,
    ) -> Result<bool, TaskError> {
        if self.settings.worker.failpoint == Failpoint::Panic {
            panic!("failpoint panic: simulated bug in a task");
        }
        let (worker, consumer_timeout_ms) = (&self.settings.worker, self.settings.amqp.consumer_timeout_ms);
        let media_settings = &self.settings.media;
        resolved?;
        let run = fenced.run();
        let mut uri = msg.media_uri.clone();
        // Remote media (http(s), or s3:// from the object store) is downloaded first and read as a
        // local file; the download goes with the task, and its time (up to `media.remote_deadline_ms`)
        // is added to the task's bound.
        let fetch_started = tokio::time::Instant::now();
        let _download = if remote::is_remote(&uri) || s3::is_s3(&uri) {
            let _ = bound.send(worker.task_timeout(None, Duration::from_millis(media_settings.remote_deadline_ms), consumer_timeout_ms));
            let path = if s3::is_s3(&uri) {
                timings.time("fetch", s3::fetch(&uri, &self.settings.s3, media_settings)).await?
            } else {
                timings.time("fetch", remote::fetch(&uri, media_settings)).await?
            };
            uri = path.display().to_string();
            Some(path)
        } else {
            None
        };
        let fetching = fetch_started.elapsed();
        let probe = timings.time("probe", media::probe(&uri)).await?;
        let _ = bound.send(worker.task_timeout(probe.duration_s, fetching, consumer_timeout_ms));
        let input = TaskInput { run: *run, fenced: Some(fenced.clone()), kind: msg.kind, media: uri, probe, options: msg.options.clone() };
        let output = self.pipeline.process(&input, timings).await?;
        let persist_started = std::time::Instant::now();
        let Some(mut tx) = fenced.begin().await? else {
            return Ok(false);
        };
        output.write(&mut tx, run.video_id).await?;
        jobs::update_probe(&mut tx, run.video_id, &input.probe).await?;
        timings.record("persist", persist_started);
        jobs::finish_success(&mut tx, run, &timings.to_json(), &output.summary()).await?;
        tx.commit().await?;
        self.metrics.media_processed(msg.kind.as_str(), input.probe.duration_s);
        for (stage, ms) in timings.to_json().as_object().into_iter().flatten() {
            self.metrics.observe_stage(stage, ms.as_f64().unwrap_or(0.0) / 1000.0);
        }
        Ok(true)
    }

    /// A message that is not a task for this worker: recorded on the job its `message_id` names (if
    /// that job is waiting) and dead-lettered.
    async fn refuse(&self, delivery: &Delivery, job: Option<Uuid>, error: &TaskError) -> Outcome {
        let reason = cap(&error.to_string());
        if let Some(job) = job
            && let Err(e) = jobs::refuse_message(&self.pool, job, &reason, &self.lifecycle.id).await
        {
            tracing::warn!(error = %e, "could not record the refusal on the job");
        }
        let attempt = topology::header_u32(&delivery.properties, ATTEMPT_HEADER).unwrap_or(1);
        self.route(delivery, &self.topology().dlq(self.pipeline.kind()), &reason, attempt, None).await;
        Outcome::Failed(reason)
    }

    /// Routes a failure by disposition: DLQ, retry queue, or back to the queue. `run` is the run it
    /// ended, if one had started (then the outcome is recorded on the job, fenced by the run).
    async fn fail(&self, delivery: &Delivery, run: Option<Run>, attempt: u32, error: TaskError, timings: &StageTimings) -> Outcome {
        let reason = cap(&error.to_string());
        let max = self.settings.worker.max_attempts;
        let (status, outcome) = match error.disposition() {
            Disposition::Unavailable(dependency) => {
                if let Some(run) = run {
                    self.release(run).await;
                }
                match dependency {
                    // The consume loop notices a broken channel by itself and reconnects.
                    Dependency::Broker => {}
                    Dependency::Database => self.alarms.db_down.notify_one(),
                    Dependency::Model => {
                        self.alarms.model_failure.lock().expect("alarms lock").get_or_insert_with(|| reason.clone());
                        self.alarms.model_down.notify_one();
                    }
                }
                nack_requeue(delivery).await;
                return Outcome::Requeued(reason);
            }
            Disposition::Permanent => (JobStatus::Failed, Outcome::Failed(reason)),
            Disposition::Retryable if attempt >= max => {
                (JobStatus::Dead, Outcome::Dead(cap(&format!("gave up after {attempt} attempts: {reason}"))))
            }
            Disposition::Retryable => (JobStatus::Retrying, Outcome::Retried(reason)),
        };
        let (Outcome::Failed(stored) | Outcome::Dead(stored) | Outcome::Retried(stored)) = &outcome else {
            unreachable!("only failures are routed here")
        };
        if let Some(run) = run {
            match jobs::record_failure(&self.pool, &run, status, stored, &self.lifecycle.id, &timings.to_json()).await {
                Ok(true) => {}
                Ok(false) => {
                    ack(delivery).await;
                    return Outcome::Superseded;
                }
                Err(e) => {
                    // The outcome could not be recorded: keep the message, give the attempt back, pause.
                    if heimdex_shared::db::is_unavailable(&e) {
                        self.alarms.unreleased.lock().expect("alarms lock").push(run);
                        self.alarms.db_down.notify_one();
                    }
                    nack_requeue(delivery).await;
                    return Outcome::Requeued(cap(&format!("{stored} (and recording it failed: {e})")));
                }
            }
        }
        if status == JobStatus::Retrying {
            let delay = Topology::backoff_ms(&self.settings.worker, attempt);
            let queue = self.topology().retry_queue(self.pipeline.kind(), delay);
            self.route(delivery, &queue, stored, attempt + 1, Some(Duration::from_millis(delay))).await;
        } else {
            self.route(delivery, &self.topology().dlq(self.pipeline.kind()), stored, attempt, None).await;
        }
        outcome
    }

    /// Gives a run's attempt back (its failure was the worker's dependency's, not the task's).
    async fn release(&self, run: Run) {
        if let Err(e) = jobs::release_run(&self.pool, &run).await {
            tracing::warn!(error = %e, "could not give the attempt back yet; will when the database answers");
            self.alarms.unreleased.lock().expect("alarms lock").push(run);
        }
    }

    /// Publishes a copy to `queue` (with the reason, the worker and the attempt in headers) and acks
    /// the original. If the copy cannot be published the worker neither crashes nor loops: a dead
    /// letter is rejected into the work queue's dead-letter exchange (which leads to the same DLQ;
    /// the reason is on the job), a retry goes back to the work queue after a pause (the next run's
    /// attempt is counted at its start, so this ends at `max_attempts`).
    async fn route(&self, delivery: &Delivery, queue: &str, reason: &str, attempt: u32, retry_after: Option<Duration>) {
        let headers = [
            (ERROR_HEADER, topology::text(reason)),
            (WORKER_HEADER, topology::text(&self.lifecycle.id)),
            (ATTEMPT_HEADER, AMQPValue::LongUInt(attempt)),
        ];
        let properties = topology::with_headers(&delivery.properties, &headers);
        match self.broker.publish(queue, &delivery.data, properties).await {
            Ok(()) => ack(delivery).await,
            Err(e) => match retry_after {
                None => {
                    tracing::error!(error = %e, queue, "could not publish the dead letter; rejecting it into the dead-letter exchange");
                    reject(delivery).await;
                }
                Some(delay) => {
                    let pause = delay.min(REQUEUE_PAUSE_MAX);
                    tracing::error!(error = %e, queue, ?pause, "could not publish the retry; handing the message back after a pause");
                    tokio::time::sleep(pause).await;
                    nack_requeue(delivery).await;
                }
            },
        }
    }
}

async fn ack(delivery: &Delivery) {
    if let Err(e) = topology::answered("basic.ack", delivery.ack(BasicAckOptions::default())).await {
        tracing::warn!(error = %e, "ack failed; the broker will redeliver");
    }
}

async fn nack_requeue(delivery: &Delivery) {
    if let Err(e) = topology::answered("basic.nack", delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() })).await
    {
        tracing::warn!(error = %e, "nack failed; the broker will redeliver");
    }
}

async fn reject(delivery: &Delivery) {
    if let Err(e) = topology::answered("basic.reject", delivery.reject(BasicRejectOptions { requeue: false })).await {
        tracing::warn!(error = %e, "reject failed; the broker will redeliver");
    }
}

/// Resolves once the run no longer holds its job (checked every [`FENCE_POLL`]).
async fn superseded(fenced: &FencedRun) {
    loop {
        tokio::time::sleep(FENCE_POLL).await;
        if let Ok(false) = fenced.holds().await {
            return;
        }
    }
}
