//! The caller's side of query embeddings: ask the warm workers, never load a model (the CLI's search,
//! the benchmarks, other services).
//!
//! Request/reply over RabbitMQ with direct reply-to (`amq.rabbitmq.reply-to`): one connection and one
//! channel per [`QueryClient`], a no-ack consumer of the pseudo-queue, and a dispatcher task that hands
//! each reply to its waiting caller by `correlation_id`; no reply queue is declared, and many
//! concurrent queries share the channel.
//!
//! "No warm worker" is told at once, not after the timeout: before each publish the client declares
//! the kind's query queue, and the declaration's consumer count is the number of workers that answer
//! queries now (a worker consumes it only while warm, and cancels when it drains, fails or stops).
//! That is the broker's own view, current to the moment, where Redis fleet state lags by a heartbeat;
//! a publish with `mandatory` would only tell a missing queue, not a queue nobody consumes. A worker
//! that dies between the check and its answer is covered by the timeout, and the request carries an
//! `expiration` equal to the timeout so that nobody answers a query its caller has given up on. A
//! full queue is told at once too: the broker nacks the publish ([`QueryError::Overloaded`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{EmbedReply, EmbedRequest, Embeddings, Refusal};
use crate::Settings;
use crate::contract::TaskKind;
use crate::error::{Dependency, Disposition};
use crate::topology::{self, PublishError, Topology};
use futures::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::oneshot;
use uuid::Uuid;

/// RabbitMQ's direct reply-to pseudo-queue.
pub const REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// How long a query waits for its answer by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a query got no embeddings.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(
        "no warm {kind} worker is answering queries (queue {queue} has no consumer): start worker-{kind}, or wait until `heimdex status` shows one warm"
    )]
    NoWarmWorker { kind: TaskKind, queue: String },
    #[error("no {kind} worker answered within {after:?}")]
    Timeout { kind: TaskKind, after: Duration },
    /// The broker refused the request: the kind's query queue is full (see [`super::QUEUE_MAX_LENGTH`]).
    #[error("the {kind} workers are overloaded with queries (queue {queue} is full): ask again later")]
    Overloaded { kind: TaskKind, queue: String },
    /// The request was refused before it was sent (see the bounds in [`super`]).
    #[error("query refused before sending: {0}")]
    Request(#[source] Refusal),
    #[error("the {kind} worker refused the query")]
    Refused {
        kind: TaskKind,
        #[source]
        refusal: Refusal,
    },
    #[error("the {kind} worker's reply is not usable: {reason}")]
    Reply { kind: TaskKind, reason: String },
    #[error("broker")]
    Broker(#[from] lapin::Error),
    #[error("publishing the query")]
    Publish(#[from] PublishError),
    #[error("the reply consumer stopped (the broker connection closed)")]
    Closed,
}

impl QueryError {
    /// Whether asking again may help: a bad or refused request will not; a missing worker, a
    /// timeout or a failed model may; a broker that does not answer is unavailable.
    pub fn disposition(&self) -> Disposition {
        match self {
            QueryError::Request(_) | QueryError::Reply { .. } => Disposition::Permanent,
            QueryError::Refused { refusal, .. } => refusal.code.disposition(),
            QueryError::NoWarmWorker { .. } | QueryError::Timeout { .. } | QueryError::Overloaded { .. } => Disposition::Retryable,
            QueryError::Broker(_) | QueryError::Closed => Disposition::Unavailable(Dependency::Broker),
            QueryError::Publish(e) => e.disposition(),
        }
    }
}

/// Replies awaited, by correlation id.
type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>>;

/// A connection that asks warm workers for query embeddings. Cheap to share: queries run
/// concurrently on it.
pub struct QueryClient {
    _connection: Connection,
    channel: Channel,
    topology: Topology,
    pending: Pending,
    timeout: Duration,
    dispatcher: tokio::task::JoinHandle<()>,
}

impl Drop for QueryClient {
    fn drop(&mut self) {
        self.dispatcher.abort();
    }
}

impl QueryClient {
    /// Connects to the broker and starts consuming replies.
    ///
    /// # Errors
    /// The broker is unreachable or refuses the consumer.
    pub async fn connect(settings: &Settings) -> Result<Self, QueryError> {
        let (connection, channel) = topology::connect(&settings.amqp, "heimdex-query").await?;
        let tag = format!("heimdex-query-{}", Uuid::new_v4().simple());
        let options = BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() };
        let consume = channel.basic_consume(REPLY_TO.into(), tag.as_str().into(), options, FieldTable::default());
        let mut replies = topology::answered("basic.consume", consume).await?;
        let pending: Pending = Arc::default();
        let waiting = pending.clone();
        let dispatcher = tokio::spawn(async move {
            while let Some(Ok(delivery)) = replies.next().await {
                let id = delivery.properties.correlation_id().as_ref().map(|id| id.to_string());
                let waiter = id.and_then(|id| waiting.lock().expect("pending lock").remove(&id));
                // A reply nobody waits for any more (its caller timed out) is dropped.
                if let Some(waiter) = waiter {
                    let _ = waiter.send(delivery.data);
                }
            }
            // The channel is gone: every caller still waiting learns it now, not at its timeout.
            waiting.lock().expect("pending lock").clear();
        });
        Ok(Self {
            _connection: connection,
            channel,
            topology: Topology::new(&settings.amqp),
            pending,
            timeout: DEFAULT_TIMEOUT,
            dispatcher,
        })
    }

    /// The same client with another timeout per query.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Embeds `texts` with the warm workers of `kind`; `model` is the model the caller expects (its
    /// vectors' name in the database), checked by the worker.
    ///
    /// # Errors
    /// See [`QueryError`]: notably [`QueryError::NoWarmWorker`] at once when no worker of `kind` is
    /// warm, and [`QueryError::Timeout`].
    pub async fn embed(&self, kind: TaskKind, model: Option<&str>, texts: Vec<String>) -> Result<Embeddings, QueryError> {
        let request = EmbedRequest::new(texts, model.map(str::to_string));
        request.check().map_err(QueryError::Request)?;
        let embeddings =
            self.request(kind, &request.to_body()).await?.into_result().map_err(|refusal| QueryError::Refused { kind, refusal })?;
        let bad = |reason: String| QueryError::Reply { kind, reason };
        if embeddings.vectors.len() != request.texts.len() {
            return Err(bad(format!("{} vectors for {} texts", embeddings.vectors.len(), request.texts.len())));
        }
        if let Some(v) = embeddings.vectors.iter().find(|v| v.len() != embeddings.dim) {
            return Err(bad(format!("a vector of {} dimensions where the reply says {}", v.len(), embeddings.dim)));
        }
        Ok(embeddings)
    }

    /// Sends a raw request body to the query queue of `kind` and returns the worker's reply. This is
    /// [`QueryClient::embed`] without the checks on either side (tests send malformed bodies with it).
    ///
    /// # Errors
    /// See [`QueryClient::embed`].
    pub async fn request(&self, kind: TaskKind, body: &[u8]) -> Result<EmbedReply, QueryError> {
        let id = Uuid::new_v4().to_string();
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(id.clone(), tx);
        let result = tokio::time::timeout(self.timeout, self.send_and_wait(kind, body, &id, rx)).await;
        self.pending.lock().expect("pending lock").remove(&id);
        let reply = result.map_err(|_| QueryError::Timeout { kind, after: self.timeout })??;
        serde_json::from_slice(&reply).map_err(|e| QueryError::Reply { kind, reason: e.to_string() })
    }

    async fn send_and_wait(&self, kind: TaskKind, body: &[u8], id: &str, reply: oneshot::Receiver<Vec<u8>>) -> Result<Vec<u8>, QueryError> {
        let queue = self.topology.declare_query_queue(&self.channel, kind).await?;
        if queue.consumer_count() == 0 {
            return Err(QueryError::NoWarmWorker { kind, queue: queue.name().to_string() });
        }
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_reply_to(REPLY_TO.into())
            .with_correlation_id(id.into())
            .with_expiration(self.timeout.as_millis().to_string().as_str().into());
        // The queue was declared just now, so a nack is its overflow policy refusing the request.
        topology::publish_confirmed(&self.channel, "", queue.name().as_str(), body, properties).await.map_err(|e| match e {
            PublishError::Nacked => QueryError::Overloaded { kind, queue: queue.name().to_string() },
            other => QueryError::Publish(other),
        })?;
        reply.await.map_err(|_| QueryError::Closed)
    }
}
