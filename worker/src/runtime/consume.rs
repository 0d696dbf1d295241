//! The consume loop: take a permit, take a delivery, spawn its task.
//!
//! - Database down: pause (basic.cancel), probe, resume.
//! - Broker connection lost, or a method unanswered for `topology::REPLY_TIMEOUT`: the worker stays
//!   warm in memory, says `disconnected`, reconnects with backoff (or opens a new channel) and
//!   consumes again; tasks in flight run on, their commits stand, and a redelivery of a committed
//!   task is acked as already done.
//! - A model thread died: stop for good (the process exits so that it restarts with fresh models,
//!   and nothing is dead-lettered for it).
//! - Shutdown: stop consuming, drain in-flight tasks within the timeout, hand back what is left.
//!
//! The permits outlive consumers and connections, so tasks still running from before a pause or a
//! reconnect count against the concurrency. On classic queues the prefetch is the channel's
//! (`global`), so deliveries a cancelled consumer left unacked count against the resumed one's
//! prefetch too. Quorum queues refuse a global prefetch (the broker closes the connection), so there
//! it is each consumer's: after a pause, a first consumer takes the concurrency less the tasks still
//! running from before, and a second one the rest once those are done (`older` in `consume`).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use heimdex_shared::config::QueueType;
use heimdex_shared::fleet::WorkerState;
use heimdex_shared::topology::answered;
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
    let concurrency = worker.settings.worker.concurrency;
    let quorum = worker.settings.amqp.queue_type == QueueType::Quorum;
    if !quorum {
        let prefetch = u16::try_from(concurrency).unwrap_or(u16::MAX);
        if let Err(e) = answered("basic.qos", channel.basic_qos(prefetch, BasicQosOptions { global: true })).await {
            tracing::warn!(error = %e, "cannot set the prefetch");
            return Ended::Disconnected;
        }
    }
    // The tasks spawned since consuming last (re)started: on quorum queues the deliveries of the
    // tasks of an earlier pass are not counted by a new consumer's prefetch.
    let mut generation: Option<TaskTracker> = None;
    let mut older: Vec<TaskTracker> = Vec::new();
    loop {
        if let Some(previous) = generation.replace(TaskTracker::new()) {
            previous.close();
            older.push(previous);
        }
        older.retain(|t| !t.is_empty());
        let generation = generation.as_ref().expect("set above");
        // Quorum queues: a first consumer takes what the tasks still running from before leave
        // free, and a second one the rest once they are done, so that the consumers' prefetches
        // and the deliveries held by those tasks never add up to more than the concurrency.
        // (The first pass on a channel holds none of its deliveries: after a reconnect the tasks
        // still running hold deliveries of the connection that broke, which the broker took back.)
        let held = if older.is_empty() { 0 } else { concurrency.saturating_sub(permits.available_permits()) };
        let first = if quorum { concurrency.saturating_sub(held).max(1) } else { concurrency };
        let mut top_up = (quorum && first < concurrency).then_some(concurrency - first);
        let mut consumers = Vec::new();
        match start_consumer(channel, &queue, &worker.lifecycle.id, quorum.then_some(first)).await {
            Some(c) => consumers.push(c),
            None => return Ended::Disconnected,
        }
        worker.lifecycle.set_state(WorkerState::Warm, &worker.metrics);
        loop {
            // Backpressure: a permit first, then a delivery (mini-redis `Listener::run`).
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
                () = shutdown.cancelled() => {
                    stop_all(channel, consumers).await;
                    return Ended::Shutdown;
                }
            };
            tokio::select! {
                (delivery, ..) = futures::future::select_all(consumers.iter_mut().map(|(_, c)| c.next())) => match delivery {
                    Some(Ok(delivery)) => {
                        let worker = worker.clone();
                        tracker.spawn(generation.track_future(async move {
                            worker.process_one(delivery).await;
                            drop(permit);
                        }));
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
                _ = futures::future::join_all(older.iter().map(TaskTracker::wait)), if top_up.is_some() => {
                    match start_consumer(channel, &queue, &worker.lifecycle.id, top_up.take()).await {
                        Some(c) => consumers.push(c),
                        None => return Ended::Disconnected,
                    }
                }
                () = worker.alarms.model_down.notified() => {
                    let reason = worker.alarms.model_failure.lock().expect("alarms lock").clone().unwrap_or_default();
                    tracing::error!(reason, "a model failed: no more tasks here; exiting for a restart");
                    worker.lifecycle.set_state(WorkerState::Failed, &worker.metrics);
                    stop_all(channel, consumers).await;
                    return Ended::ModelFailed(reason);
                }
                () = worker.alarms.db_down.notified() => {
                    tracing::warn!("database unavailable: pausing consumption");
                    worker.lifecycle.set_state(WorkerState::Paused, &worker.metrics);
                    if !stop_all(channel, consumers).await {
                        return Ended::Disconnected;
                    }
                    if !wait_for_database(worker, shutdown).await {
                        return Ended::Shutdown;
                    }
                    tracing::info!("database is back: resuming consumption");
                    break;
                }
                () = shutdown.cancelled() => {
                    stop_all(channel, consumers).await;
                    return Ended::Shutdown;
                }
            }
        }
    }
}

/// Starts a consumer of `queue` under a fresh tag; `prefetch` is its own (quorum queues), `None`
/// leaves the channel's (classic queues). `None` if the channel broke.
async fn start_consumer(channel: &Channel, queue: &str, worker_id: &str, prefetch: Option<usize>) -> Option<(String, Consumer)> {
    if let Some(prefetch) = prefetch {
        let prefetch = u16::try_from(prefetch).unwrap_or(u16::MAX);
        if let Err(e) = answered("basic.qos", channel.basic_qos(prefetch, BasicQosOptions { global: false })).await {
            tracing::warn!(error = %e, "cannot set the prefetch");
            return None;
        }
    }
    let tag = format!("{worker_id}-{}", uuid::Uuid::new_v4().simple());
    let consume = channel.basic_consume(queue.into(), tag.as_str().into(), BasicConsumeOptions::default(), FieldTable::default());
    match answered("basic.consume", consume).await {
        Ok(consumer) => Some((tag, consumer)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot consume");
            None
        }
    }
}

/// [`stop_consuming`] for each consumer; false if the channel broke.
async fn stop_all(channel: &Channel, consumers: Vec<(String, Consumer)>) -> bool {
    for (tag, consumer) in consumers {
        if !stop_consuming(channel, &tag, consumer).await {
            return false;
        }
    }
    true
}

/// Cancels the consumer and gives back deliveries it had buffered but not started; false if the
/// channel broke or did not answer in time (then the broker requeues them when the channel closes).
pub(super) async fn stop_consuming(channel: &Channel, tag: &str, mut consumer: Consumer) -> bool {
    let stopped = answered("basic.cancel", async {
        channel.basic_cancel(tag.into(), BasicCancelOptions::default()).await?;
        while let Some(Ok(delivery)) = consumer.next().await {
            delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await?;
        }
        Ok(())
    });
    if let Err(e) = stopped.await {
        tracing::warn!(error = %e, "cannot cancel the consumer");
        return false;
    }
    true
}

/// Probes the database with growing pauses until it answers (true) or shutdown (false); then gives
/// back the attempts of runs that the outage cut short, before consuming resumes.
async fn wait_for_database<P: Pipeline>(worker: &Worker<P>, shutdown: &CancellationToken) -> bool {
    let mut delay = Duration::from_millis(250);
    let mut failed_probes = 0_u32;
    loop {
        match sqlx::query("SELECT 1").execute(&worker.pool).await {
            Ok(_) => {
                let runs = std::mem::take(&mut *worker.alarms.unreleased.lock().expect("alarms lock"));
                for run in runs {
                    if let Err(e) = heimdex_shared::jobs::release_run(&worker.pool, &run).await {
                        tracing::warn!(error = %e, job = %run.job_id, "could not give the attempt back");
                    }
                }
                return true;
            }
            Err(e) => {
                failed_probes += 1;
                // The first failure, then ever more seldom: a long pause says why it lasts.
                if failed_probes.is_power_of_two() {
                    tracing::warn!(error = %e, failed_probes, "the database does not answer yet: consumption stays paused");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return false,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
