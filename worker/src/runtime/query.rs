//! Query embeddings for callers (the contract is `heimdex_shared::query`): a consumer of the kind's
//! `{prefix}.{kind}.query` queue on a channel of its own, with its own prefetch and permits
//! ([`QUERY_CONCURRENCY`]), so that a query never waits for a task permit (a long video holds one for
//! minutes). The texts are embedded by the pipeline on the same model thread as tasks, batched with
//! their requests, within the queries' bounded share of the models ([`QueryShare`]), and the reply
//! goes to the request's `reply_to`, which must be a direct reply-to address: a request that names
//! any other is acked unanswered, as is one without (see `heimdex_shared::query`). Each query is
//! counted in `heimdex_queries_total` by outcome.
//!
//! It consumes only while the worker is warm (or paused: a database outage does not stop a model),
//! so the queue's consumer count is the number of workers that can answer now: that is how a caller
//! tells "no warm worker" at once instead of after its timeout. It cancels its consumer when the
//! worker drains, fails or loses the broker (deliveries it had not started go back to the queue for
//! another worker), and answers the queries it took before it returns.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use heimdex_shared::error::{Dependency, Disposition};
use heimdex_shared::fleet::WorkerState;
use heimdex_shared::query::{EmbedReply, EmbedRequest, Outcome, Refusal, RefusalCode, is_direct_reply_to};
use heimdex_shared::telemetry::chain;
use heimdex_shared::topology::answered;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use super::consume::stop_consuming;
use super::share::QueryShare;
use super::task::Worker;
use crate::pipeline::Pipeline;

/// Queries one worker embeds at once (its prefetch on the query queue too, so that a busy worker
/// leaves further queries to the other workers of its kind). Each is a few texts: short work.
pub const QUERY_CONCURRENCY: usize = 8;
/// How long a stopping worker waits for the queries it took to be answered.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// True in the states in which the worker answers queries: its models are loaded, warm and alive.
fn answers(state: WorkerState) -> bool {
    matches!(state, WorkerState::Warm | WorkerState::Paused)
}

/// True in the states a worker never leaves: it stops for good.
fn ended(state: WorkerState) -> bool {
    matches!(state, WorkerState::Draining | WorkerState::Failed)
}

/// Serves queries whenever the worker is warm, until it drains, fails or `stop`.
pub async fn serve<P: Pipeline>(worker: Arc<Worker<P>>, stop: CancellationToken) {
    let mut states = worker.lifecycle.subscribe();
    let permits = Arc::new(Semaphore::new(QUERY_CONCURRENCY));
    let share = Arc::new(QueryShare::new(worker.settings.worker.query_share));
    let mut retry = Duration::from_millis(100);
    loop {
        let state = tokio::select! {
            biased;
            () = stop.cancelled() => None,
            state = states.wait_for(|s| answers(*s) || ended(*s)) => state.map(|s| *s).ok(),
        };
        if !state.is_some_and(answers) {
            break;
        }
        let Some(channel) = worker.broker.consume_channel(&stop).await else { break };
        let left_warm = consume(&worker, &channel, &permits, &share, &mut states, &stop).await;
        // The queries taken on this channel are answered on it before it is dropped.
        if tokio::time::timeout(ANSWER_TIMEOUT, wait_idle(&permits)).await.is_err() {
            tracing::warn!("queries still unanswered after {ANSWER_TIMEOUT:?}");
        }
        drop(channel);
        if left_warm {
            retry = Duration::from_millis(100);
        } else {
            // The channel broke (the consume loop reconnects the broker): try again shortly.
            tokio::select! {
                () = tokio::time::sleep(retry) => {}
                () = stop.cancelled() => break,
            }
            retry = (retry * 2).min(Duration::from_secs(5));
        }
    }
}

/// Waits until every permit is back (no query in flight).
async fn wait_idle(permits: &Semaphore) {
    let all = u32::try_from(QUERY_CONCURRENCY).unwrap_or(u32::MAX);
    if let Ok(p) = permits.acquire_many(all).await {
        drop(p);
    }
}

/// Consumes on `channel` while the worker answers queries; true when it stopped because the worker
/// left the warm states (or stops), false when the channel broke.
async fn consume<P: Pipeline>(
    worker: &Arc<Worker<P>>,
    channel: &Channel,
    permits: &Arc<Semaphore>,
    share: &Arc<QueryShare>,
    states: &mut watch::Receiver<WorkerState>,
    stop: &CancellationToken,
) -> bool {
    let queue = worker.topology().query_queue(worker.pipeline.kind());
    let tag = format!("{}-query-{}", worker.lifecycle.id, uuid::Uuid::new_v4().simple());
    let prefetch = u16::try_from(QUERY_CONCURRENCY).unwrap_or(u16::MAX);
    if let Err(e) = answered("basic.qos", channel.basic_qos(prefetch, BasicQosOptions::default())).await {
        tracing::warn!(error = %e, "cannot set the query prefetch");
        return false;
    }
    let consumer = channel.basic_consume(queue.as_str().into(), tag.as_str().into(), BasicConsumeOptions::default(), FieldTable::default());
    let mut consumer = match answered("basic.consume", consumer).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, queue, "cannot consume queries");
            return false;
        }
    };
    tracing::info!(queue, "answering queries");
    loop {
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            _ = states.wait_for(|s| !answers(*s)) => break,
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            _ = states.wait_for(|s| !answers(*s)) => break,
            delivery = consumer.next() => match delivery {
                Some(Ok(delivery)) => {
                    let (worker, channel, share) = (worker.clone(), channel.clone(), share.clone());
                    tokio::spawn(async move {
                        answer(&worker, &channel, &share, delivery).await;
                        drop(permit);
                    });
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "the query consumer failed");
                    return false;
                }
                None => return false,
            },
        }
    }
    tracing::info!(queue, state = states.borrow().as_str(), "no longer answering queries");
    stop_consuming(channel, &tag, consumer).await;
    true
}

/// Answers one query (an error reply for anything wrong with it) and acks it; never fails. A query
/// without a direct reply-to address is acked unanswered, before it is even parsed.
async fn answer<P: Pipeline>(worker: &Worker<P>, channel: &Channel, share: &QueryShare, delivery: Delivery) {
    let reply_to = delivery.properties.reply_to().as_ref().map(|r| r.as_str().to_string()).filter(|r| is_direct_reply_to(r));
    let outcome = match reply_to {
        None => {
            tracing::warn!(
                reply_to = delivery.properties.reply_to().is_some(),
                "a query without a direct reply-to address: not answered (nowhere safe to reply)"
            );
            "unanswerable"
        }
        Some(reply_to) => {
            let reply = match EmbedRequest::parse(&delivery.data) {
                Ok(request) => embed(worker, share, request).await,
                Err(refusal) => EmbedReply::refused(refusal),
            };
            let mut properties = BasicProperties::default().with_content_type("application/json".into());
            if let Some(id) = delivery.properties.correlation_id() {
                properties = properties.with_correlation_id(id.clone());
            }
            let body = reply.to_body();
            let publish = channel.basic_publish("".into(), reply_to.as_str().into(), BasicPublishOptions::default(), &body, properties);
            let published = answered("basic.publish", publish).await;
            // A caller that gave up has no reply queue any more; the broker drops the reply.
            if let Err(e) = published {
                tracing::warn!(error = %e, "cannot send a query reply");
            }
            match &reply.outcome {
                Outcome::Ok(_) => "answered",
                Outcome::Error(refusal) => {
                    tracing::info!(code = %refusal.code, reason = refusal.reason, "query refused");
                    refusal.code.as_str()
                }
            }
        }
    };
    worker.metrics.query_finished(worker.pipeline.kind().as_str(), outcome);
    // Acked either way: a query is answered once, by whoever took it (the caller's timeout covers
    // a worker that dies first, and the message's expiration a query nobody took in time).
    if let Err(e) = answered("basic.ack", delivery.ack(BasicAckOptions::default())).await {
        tracing::warn!(error = %e, "cannot ack a query");
    }
}

/// Embeds a parsed request, after checking the model it expects, within the queries' share.
async fn embed<P: Pipeline>(worker: &Worker<P>, share: &QueryShare, request: EmbedRequest) -> EmbedReply {
    let serves = worker.pipeline.query_model();
    if let Some(expected) = request.model.as_deref().filter(|m| *m != serves) {
        return EmbedReply::refused(Refusal::new(
            RefusalCode::WrongModel,
            format!("this worker embeds with {serves:?}, the request expects {expected:?}"),
        ));
    }
    let texts = request.texts.len();
    match share.run(texts, || worker.lifecycle.busy(), worker.pipeline.embed_query(request.texts)).await {
        Ok(embeddings) => EmbedReply::ok(embeddings),
        Err(e) => {
            let reason = chain(&e);
            if e.disposition() == Disposition::Unavailable(Dependency::Model) {
                // As for a task: a dead model thread takes the worker out of service for a restart.
                worker.alarms.model_failure.lock().expect("alarms lock").get_or_insert_with(|| reason.clone());
                worker.alarms.model_down.notify_one();
            }
            EmbedReply::refused(Refusal::new(RefusalCode::Failed, reason))
        }
    }
}
