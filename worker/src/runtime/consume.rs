//! The consume loop: take a permit, take a delivery, spawn its task.
//!
//! - Database down: pause (basic.cancel), probe, resume.
//! - Broker connection lost: the worker stays warm in memory, says `disconnected`, reconnects with
//!   backoff and consumes again; tasks in flight run on, their commits stand, and a redelivery of a
//!   committed task is acked as already done.
//! - A model thread died: stop for good (the process exits so that it restarts with fresh models,
//!   and nothing is dead-lettered for it).
//! - Shutdown: stop consuming, drain in-flight tasks within the timeout, hand back what is left.
//!
//! The permits outlive consumers and connections, so tasks still running from before a pause or a
//! reconnect count against the concurrency. On classic queues the prefetch is the channel's
//! (`global`), so deliveries a cancelled consumer left unacked count against the resumed one's
//! prefetch too. Quorum queues refuse a global prefetch (the broker closes the connection), so there
//! it is the consumer's: for as long as tasks from before a pause run on, the resumed consumer may
//! hold up to that many deliveries more than the concurrency (buffered, not started: the permits
//! still bound what runs).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use heimdex_shared::config::QueueType;
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

/// How one consumer ended.
enum Ended {
    Shutdown,
    ModelFailed(String),
    /// The channel or connection broke: consume again on a new one.
    Disconnected,
}

/// Consumes until `shutdown` (or a model failure).
///
/// # Errors
/// Never for broker trouble (that is reconnected); only for a consumer the broker cancelled for good.
pub async fn run<P: Pipeline>(worker: Arc<Worker<P>>, shutdown: CancellationToken) -> anyhow::Result<Stop> {
    let permits = Arc::new(Semaphore::new(worker.settings.worker.concurrency));
    let tracker = TaskTracker::new();
    // The last channel stays open until the drain is over: dropping it would close it, and the
    // broker would requeue the deliveries of tasks that are still finishing.
    let (ended, _channel) = loop {
        let Some(channel) = worker.broker.consume_channel(&shutdown).await else { break (Ended::Shutdown, None) };
        match consume(&worker, &channel, &permits, &tracker, &shutdown).await {
            Ended::Disconnected => {
                tracing::warn!("lost the broker: reconnecting (models stay warm)");
                worker.lifecycle.set_state(WorkerState::Disconnected, &worker.metrics);
            }
            other => break (other, Some(channel)),
        }
    };
    let model_failure = match ended {
        Ended::ModelFailed(reason) => Some(reason),
        _ => {
            worker.lifecycle.set_state(WorkerState::Draining, &worker.metrics);
            None
        }
    };
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

/// Consumes on one channel until shutdown, a model failure or a broken channel; pauses and resumes
/// on it while the database is down.
async fn consume<P: Pipeline>(
    worker: &Arc<Worker<P>>,
    channel: &Channel,
    permits: &Arc<Semaphore>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Ended {
    let queue = worker.topology().queue(worker.pipeline.kind());
    let tag = format!("{}-{}", worker.lifecycle.id, uuid::Uuid::new_v4().simple());
    let prefetch = u16::try_from(worker.settings.worker.concurrency).unwrap_or(u16::MAX);
    let global = worker.settings.amqp.queue_type == QueueType::Classic;
    if let Err(e) = channel.basic_qos(prefetch, BasicQosOptions { global }).await {
        tracing::warn!(error = %e, "cannot set the prefetch");
        return Ended::Disconnected;
    }
    loop {
        let consumer =
            channel.basic_consume(queue.as_str().into(), tag.as_str().into(), BasicConsumeOptions::default(), FieldTable::default());
        let mut consumer = match consumer.await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot consume");
                return Ended::Disconnected;
            }
        };
        worker.lifecycle.set_state(WorkerState::Warm, &worker.metrics);
        loop {
            // Backpressure: a permit first, then a delivery (mini-redis `Listener::run`).
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
                () = shutdown.cancelled() => {
                    stop_consuming(channel, &tag, consumer).await;
                    return Ended::Shutdown;
                }
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
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "the consumer failed");
                        return Ended::Disconnected;
                    }
                    None => {
                        tracing::warn!(queue, "the broker cancelled the consumer");
                        return Ended::Disconnected;
                    }
                },
                () = worker.alarms.model_down.notified() => {
                    let reason = worker.alarms.model_failure.lock().expect("alarms lock").clone().unwrap_or_default();
                    tracing::error!(reason, "a model failed: no more tasks here; exiting for a restart");
                    worker.lifecycle.set_state(WorkerState::Failed, &worker.metrics);
                    stop_consuming(channel, &tag, consumer).await;
                    return Ended::ModelFailed(reason);
                }
                () = worker.alarms.db_down.notified() => {
                    tracing::warn!("database unavailable: pausing consumption");
                    worker.lifecycle.set_state(WorkerState::Paused, &worker.metrics);
                    if !stop_consuming(channel, &tag, consumer).await {
                        return Ended::Disconnected;
                    }
                    if !wait_for_database(worker, shutdown).await {
                        return Ended::Shutdown;
                    }
                    tracing::info!("database is back: resuming consumption");
                    break;
                }
                () = shutdown.cancelled() => {
                    stop_consuming(channel, &tag, consumer).await;
                    return Ended::Shutdown;
                }
            }
        }
    }
}

/// Cancels the consumer and gives back deliveries it had buffered but not started; false if the
/// channel broke (then the broker requeues them itself).
pub(super) async fn stop_consuming(channel: &Channel, tag: &str, mut consumer: Consumer) -> bool {
    if let Err(e) = channel.basic_cancel(tag.into(), BasicCancelOptions::default()).await {
        tracing::warn!(error = %e, "cannot cancel the consumer");
        return false;
    }
    while let Some(Ok(delivery)) = consumer.next().await {
        let _ = delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await;
    }
    true
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
