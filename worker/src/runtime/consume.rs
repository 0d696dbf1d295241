//! The consume loop: take a permit, take a delivery, spawn its task. Pauses (basic.cancel) while the
//! database is down and resumes by itself; stops for good when a model thread died (the process
//! exits so that it restarts with fresh models, and nothing is dead-lettered for it); on shutdown
//! stops consuming, drains in-flight tasks within the timeout, and hands back what it did not start.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use heimdex_shared::fleet::WorkerState;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::task::Worker;
use crate::pipeline::Pipeline;

/// Why the loop returned.
#[derive(Debug)]
pub enum Stop {
    /// Shutdown was requested; `abandoned` tasks did not finish within the timeout.
    Shutdown { abandoned: usize },
    /// A model thread died; the worker cannot work until the process restarts.
    ModelFailed { reason: String },
}

/// Consumes until `shutdown`.
///
/// # Errors
/// The broker connection failed (the process should exit and be restarted).
pub async fn run<P: Pipeline>(worker: Arc<Worker<P>>, channel: Channel, shutdown: CancellationToken) -> anyhow::Result<Stop> {
    let concurrency = worker.settings.worker.concurrency;
    channel.basic_qos(u16::try_from(concurrency).unwrap_or(u16::MAX), BasicQosOptions::default()).await?;
    let permits = Arc::new(Semaphore::new(concurrency));
    let tracker = TaskTracker::new();
    let queue = worker.topology.queue(worker.pipeline.kind());
    let tag = format!("{}-{}", worker.lifecycle.id, uuid::Uuid::new_v4().simple());
    let mut model_failure = None;
    'consuming: loop {
        let mut consumer =
            channel.basic_consume(queue.as_str().into(), tag.as_str().into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
        worker.lifecycle.set_state(WorkerState::Warm, &worker.metrics);
        loop {
            // Backpressure: a permit first, then a delivery (mini-redis `Listener::run`).
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
                () = shutdown.cancelled() => break 'consuming,
            };
            tokio::select! {
                delivery = consumer.next() => match delivery {
                    Some(Ok(delivery)) => {
                        let worker = worker.clone();
                        tracker.spawn(async move {
                            worker.process_one(delivery).await;
                            drop(permit);
                        });
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => anyhow::bail!("the broker cancelled the consumer of {queue} (queue deleted?)"),
                },
                () = worker.alarms.model_down.notified() => {
                    let reason = worker.alarms.model_failure.lock().expect("alarms lock").clone().unwrap_or_default();
                    tracing::error!(reason, "a model failed: no more tasks here; exiting for a restart");
                    worker.lifecycle.set_state(WorkerState::Failed, &worker.metrics);
                    cancel(&channel, &tag, consumer).await?;
                    model_failure = Some(reason);
                    break 'consuming;
                }
                () = worker.alarms.db_down.notified() => {
                    tracing::warn!("database unavailable: pausing consumption");
                    worker.lifecycle.set_state(WorkerState::Paused, &worker.metrics);
                    cancel(&channel, &tag, consumer).await?;
                    if !wait_for_database(&worker, &shutdown).await {
                        break 'consuming;
                    }
                    tracing::info!("database is back: resuming consumption");
                    continue 'consuming;
                }
                () = shutdown.cancelled() => break 'consuming,
            }
        }
    }
    if model_failure.is_none() {
        worker.lifecycle.set_state(WorkerState::Draining, &worker.metrics);
    }
    // After a pause the consumer is already cancelled; cancelling an unknown tag is a no-op.
    let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
    tracker.close();
    let timeout = worker.settings.worker.shutdown_timeout();
    let abandoned = if tokio::time::timeout(timeout, tracker.wait()).await.is_ok() {
        0
    } else {
        let n = tracker.len();
        tracing::warn!(tasks = n, ?timeout, "shutdown timeout: unfinished tasks are requeued by the broker");
        n
    };
    Ok(match model_failure {
        Some(reason) => Stop::ModelFailed { reason },
        None => Stop::Shutdown { abandoned },
    })
}

/// Cancels the consumer and gives back deliveries it had buffered but not started.
async fn cancel(channel: &Channel, tag: &str, mut consumer: Consumer) -> Result<(), lapin::Error> {
    channel.basic_cancel(tag.into(), BasicCancelOptions::default()).await?;
    while let Some(Ok(delivery)) = consumer.next().await {
        let _ = delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await;
    }
    Ok(())
}

/// Probes the database with growing pauses until it answers (true) or shutdown (false); then gives
/// back the attempts of runs that the outage cut short, before consuming resumes.
async fn wait_for_database<P: Pipeline>(worker: &Worker<P>, shutdown: &CancellationToken) -> bool {
    let mut delay = Duration::from_millis(250);
    loop {
        if sqlx::query("SELECT 1").execute(&worker.pool).await.is_ok() {
            let runs = std::mem::take(&mut *worker.alarms.unreleased.lock().expect("alarms lock"));
            for run in runs {
                if let Err(e) = heimdex_shared::jobs::release_run(&worker.pool, &run).await {
                    tracing::warn!(error = %e, job = %run.job_id, "could not give the attempt back");
                }
            }
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return false,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
