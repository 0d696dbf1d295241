//! RabbitMQ topology, declared idempotently by the producer and by every worker:
//!
//! ```text
//! exchange {p} (direct) --kind--> {p}.{kind}              work queue (DLX → {p}.{kind}.dlq on reject)
//!                                 {p}.{kind}.retry.{ms}   one per backoff step, x-message-ttl = ms,
//!                                                         dead-letters back into {p}.{kind}
//!                                 {p}.{kind}.dlq          dead letters, with the reason in a header
//! default exchange ---------------> {p}.{kind}.query      query embeddings (see `query`): transient,
//!                                                         bounded (length, bytes, TTL; a publish into
//!                                                         a full one is refused), consumed only by
//!                                                         warm workers of the kind
//! exchange {p}.events (topic) --{kind}.{status}-->        job events (see `events`): bound by
//!                                                         whoever wants them, never by Heimdex
//! ```
//!
//! One retry queue per backoff step (rather than per-message TTLs in one queue) because RabbitMQ only
//! expires messages at the head of a queue: a 32 s retry would hold back a 2 s one behind it.
//!
//! The work, retry and dead-letter queues are of `amqp.queue_type`: quorum by default (replicated on
//! every node of a cluster, so a node lost loses no confirmed message), or classic. On quorum queues
//! dead-lettering is `at-least-once` (a dead letter leaves its queue only once the dead-letter queue
//! has confirmed it, which needs `x-overflow: reject-publish`), and the broker's own redelivery limit
//! (`x-delivery-limit`) sits well above `worker.max_attempts`, so that the worker's counting of
//! attempts and deaths (see `jobs::start_run`) is the one that decides when a job is dead. The query
//! queues stay classic whatever the setting: they are not durable, and a quorum queue must be.

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::config::{AmqpSettings, QueueType, WorkerSettings};
use crate::contract::{TaskKind, TaskMessage};
use crate::error::{Dependency, Disposition};

/// Header carrying the delivery attempt (1 for the first delivery).
pub const ATTEMPT_HEADER: &str = "x-heimdex-attempt";
/// Header carrying the reason a message was dead-lettered or retried.
pub const ERROR_HEADER: &str = "x-heimdex-error";
/// Header naming the worker that dead-lettered a message.
pub const WORKER_HEADER: &str = "x-heimdex-worker";
/// Longest backoff step.
const MAX_BACKOFF_MS: u64 = 10 * 60 * 1000;
/// A quorum work queue's `x-delivery-limit`: at least twice `worker.max_attempts` (the configuration
/// refuses more than [`MAX_ATTEMPTS_LIMIT`] attempts). Deliveries handed back without a counted
/// attempt (a pause for the database, a shutdown's buffered deliveries, a broker node lost) also count
/// toward the broker's limit, so it sits far above: it is a backstop against a message that kills
/// every worker before its attempt is counted, not the rule. A constant, not derived from
/// `max_attempts`, because a queue's arguments cannot change once it is declared.
pub const DELIVERY_LIMIT: u32 = 100;
/// The most `worker.max_attempts` may be, half of [`DELIVERY_LIMIT`].
pub const MAX_ATTEMPTS_LIMIT: u32 = DELIVERY_LIMIT / 2;

/// Names of the exchange and queues under one prefix, and the type of its durable queues.
#[derive(Clone, Debug)]
pub struct Topology {
    pub prefix: String,
    pub queue_type: QueueType,
}

impl Topology {
    pub fn new(settings: &AmqpSettings) -> Self {
        Self { prefix: settings.prefix.clone(), queue_type: settings.queue_type }
    }

    /// The arguments every durable queue of `queue_type` carries; `dead_letter_to` names the queue
    /// its dead letters go to (through the default exchange).
    fn durable_args(queue_type: QueueType, dead_letter_to: Option<&str>) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString(queue_type.as_str().into()));
        if let Some(target) = dead_letter_to {
            args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
            args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(target.into()));
            if queue_type == QueueType::Quorum {
                args.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
                args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
                args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(DELIVERY_LIMIT)));
            }
        }
        args
    }

    /// Every durable queue with its arguments for `queue_type`: (name, arguments).
    fn durable_queues(&self, queue_type: QueueType, worker: &WorkerSettings) -> Vec<(String, FieldTable)> {
        let mut queues = Vec::new();
        for kind in TaskKind::ALL {
            let (queue, dlq) = (self.queue(kind), self.dlq(kind));
            queues.push((dlq.clone(), Self::durable_args(queue_type, None)));
            queues.push((queue.clone(), Self::durable_args(queue_type, Some(&dlq))));
            for attempt in 1..worker.max_attempts {
                let delay = Self::backoff_ms(worker, attempt);
                let mut args = Self::durable_args(queue_type, Some(&queue));
                args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(delay as i64));
                queues.push((self.retry_queue(kind, delay), args));
            }
        }
        queues
    }

    pub fn exchange(&self) -> &str {
        &self.prefix
    }

    /// The topic exchange of job events (see [`crate::events`]).
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    pub fn queue(&self, kind: TaskKind) -> String {
        format!("{}.{kind}", self.prefix)
    }

    pub fn dlq(&self, kind: TaskKind) -> String {
        format!("{}.{kind}.dlq", self.prefix)
    }

    pub fn retry_queue(&self, kind: TaskKind, delay_ms: u64) -> String {
        format!("{}.{kind}.retry.{delay_ms}ms", self.prefix)
    }

    /// The queue of query-embedding requests for `kind` (see [`crate::query`]).
    pub fn query_queue(&self, kind: TaskKind) -> String {
        format!("{}.{kind}.query", self.prefix)
    }

    /// Declares the query queue of `kind` and returns its declaration, whose consumer count is the
    /// number of warm workers of that kind serving queries now. Not durable: a query outlives
    /// neither its caller's timeout nor a broker restart. Bounded: at most
    /// [`query::QUEUE_MAX_LENGTH`](crate::query::QUEUE_MAX_LENGTH) requests and
    /// [`query::QUEUE_MAX_BYTES`](crate::query::QUEUE_MAX_BYTES), each for at most
    /// [`query::QUEUE_TTL`](crate::query::QUEUE_TTL); a publish into a full queue is nacked
    /// (`reject-publish`), so the caller learns it, where the default (`drop-head`) would silently
    /// drop the oldest caller's query. Safe to call from any process.
    ///
    /// # Errors
    /// The broker refuses the declaration (a queue of this name declared with other bounds, by a
    /// release before these bounds: delete it once, it holds nothing that lasts).
    pub async fn declare_query_queue(&self, channel: &Channel, kind: TaskKind) -> Result<lapin::Queue, lapin::Error> {
        use crate::query::{QUEUE_MAX_BYTES, QUEUE_MAX_LENGTH, QUEUE_TTL};
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(i64::from(QUEUE_MAX_LENGTH)));
        args.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(i64::from(QUEUE_MAX_BYTES)));
        args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(i64::try_from(QUEUE_TTL.as_millis()).unwrap_or(i64::MAX)));
        channel.queue_declare(self.query_queue(kind).as_str().into(), QueueDeclareOptions::default(), args).await
    }

    /// Backoff before the next delivery after `attempt` failed: `base * 2^(attempt-1)`, capped.
    pub fn backoff_ms(worker: &WorkerSettings, attempt: u32) -> u64 {
        let shift = attempt.saturating_sub(1).min(20);
        worker.retry_base_ms.saturating_mul(1 << shift).min(MAX_BACKOFF_MS)
    }

    /// Declares everything for every kind, within [`DECLARE_TIMEOUT`]; safe to call from any number
    /// of processes at once.
    ///
    /// # Errors
    /// The broker refuses a declaration (e.g. a queue exists with other arguments), or does not
    /// answer in time (a `TimedOut` I/O error: the channel is then unusable).
    pub async fn declare(&self, channel: &Channel, worker: &WorkerSettings) -> Result<(), lapin::Error> {
        tokio::time::timeout(DECLARE_TIMEOUT, self.declare_all(channel, worker)).await.unwrap_or_else(|_| {
            Err(lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the broker did not answer the declarations of the queues of prefix {:?} within {DECLARE_TIMEOUT:?} \
                     (a broker out of file handles stops answering without an error: deploy/README.md, \"File handles\")",
                    self.prefix
                ),
            )))
        })
    }

    async fn declare_all(&self, channel: &Channel, worker: &WorkerSettings) -> Result<(), lapin::Error> {
        channel
            .exchange_declare(
                self.exchange().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() },
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.events_exchange().as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() },
                FieldTable::default(),
            )
            .await?;
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        for (name, args) in self.durable_queues(self.queue_type, worker) {
            channel.queue_declare(name.as_str().into(), durable, args).await?;
        }
        for kind in TaskKind::ALL {
            channel
                .queue_bind(
                    self.queue(kind).as_str().into(),
                    self.exchange().into(),
                    kind.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            self.declare_query_queue(channel, kind).await?;
        }
        Ok(())
    }

    /// The first durable queue that exists with the other type than `amqp.queue_type`, as
    /// (name, its type); `None` if there is none. A declaration the broker refused
    /// (PRECONDITION_FAILED) is explained by this: a queue's type cannot change in place. Each
    /// look is on a channel of its own (the broker closes a channel on a refused declaration), and
    /// creates nothing: a queue is declared with the other type's arguments only once a passive
    /// declaration has shown that it exists.
    ///
    /// # Errors
    /// The broker is unreachable.
    pub async fn queue_of_other_type(
        &self,
        connection: &Connection,
        worker: &WorkerSettings,
    ) -> Result<Option<(String, QueueType)>, lapin::Error> {
        let other = match self.queue_type {
            QueueType::Quorum => QueueType::Classic,
            QueueType::Classic => QueueType::Quorum,
        };
        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        for (name, args) in self.durable_queues(other, worker) {
            let channel = connection.create_channel().await?;
            let exists = channel.queue_declare(name.as_str().into(), passive, FieldTable::default()).await.is_ok();
            if !exists {
                continue;
            }
            let matches = channel.queue_declare(name.as_str().into(), durable, args).await.is_ok();
            let _ = channel.close(200, "".into()).await;
            if matches {
                return Ok(Some((name, other)));
            }
        }
        Ok(None)
    }

    /// Deletes every queue and the exchange (tests clean up with this).
    ///
    /// # Errors
    /// The broker is unreachable.
    pub async fn delete(&self, channel: &Channel, worker: &WorkerSettings) -> Result<(), lapin::Error> {
        for kind in TaskKind::ALL {
            let mut names = vec![self.queue(kind), self.dlq(kind), self.query_queue(kind)];
            names.extend((1..worker.max_attempts).map(|a| self.retry_queue(kind, Self::backoff_ms(worker, a))));
            for name in names {
                channel.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await?;
            }
        }
        channel.exchange_delete(self.events_exchange().as_str().into(), lapin::options::ExchangeDeleteOptions::default()).await?;
        channel.exchange_delete(self.exchange().into(), lapin::options::ExchangeDeleteOptions::default()).await
    }
}

/// How long declaring the whole topology may take. A healthy broker takes milliseconds (tens of
/// them for quorum queues, seconds while a cluster elects leaders); one that takes longer is not
/// going to answer, and a worker waiting on it would sit cold forever.
pub const DECLARE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long one connection attempt to one broker address may take (an address that does not
/// answer at all, a node half gone) before the next address is tried.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long the broker may take to answer one method on an open connection (a channel's opening or
/// closing, `basic.qos`, `basic.consume`, `basic.cancel`) or to take an acknowledgement. A healthy
/// broker answers in milliseconds. lapin bounds none of these: a method sent as its connection dies
/// can get neither an answer nor an error, and a quorum queue without a leader answers nothing.
/// Callers treat a method past this bound as a broken channel (CI of stop 38: a worker waited for
/// ever, paused, on the `basic.consume` it sent as a broker cut began).
pub const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Awaits `call` (one broker method) for at most [`REPLY_TIMEOUT`].
///
/// # Errors
/// The method's own error, or a timed-out I/O error naming `what`.
pub async fn answered<T>(what: &str, call: impl Future<Output = Result<T, lapin::Error>>) -> Result<T, lapin::Error> {
    tokio::time::timeout(REPLY_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(timed_out(format!("the broker did not answer {what} within {REPLY_TIMEOUT:?}"))))
}

/// A timed-out I/O error: what lapin reports for a connection that stopped answering.
fn timed_out(message: String) -> lapin::Error {
    lapin::Error::from(std::io::Error::new(std::io::ErrorKind::TimedOut, message))
}

/// Connects to the first broker of `amqp.urls` that takes the connection, in list order, and opens
/// a channel with publisher confirms on. A node that went away is skipped, so a caller that
/// reconnects after losing its node lands on another one of the cluster; the list's order is a
/// preference (deploy/README.md: give groups of workers different orders to spread them).
///
/// # Errors
/// No address took the connection: the last address's error.
pub async fn connect(settings: &AmqpSettings, name: &str) -> Result<(Connection, Channel), lapin::Error> {
    let mut last = None;
    for url in &settings.urls {
        let props = ConnectionProperties::default().with_connection_name(name.into());
        let attempt = async {
            let connection = Connection::connect(url.expose(), props).await?;
            let channel = connection.create_channel().await?;
            channel.confirm_select(ConfirmSelectOptions::default()).await?;
            Ok::<_, lapin::Error>((connection, channel))
        };
        let error = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(Ok(connected)) => return Ok(connected),
            Ok(Err(e)) => e,
            Err(_) => timed_out(format!("the broker did not take the connection within {CONNECT_TIMEOUT:?}")),
        };
        if settings.urls.len() > 1 {
            tracing::warn!(broker = %url, error = %error, "broker unreachable; trying the next address");
        }
        last = Some(error);
    }
    Err(last.unwrap_or_else(|| lapin::Error::from(std::io::Error::other("amqp.urls is empty"))))
}

/// Properties of a task message: persistent JSON, `message_id` = job id, the attempt header.
pub fn task_properties(message: &TaskMessage, attempt: u32) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(ATTEMPT_HEADER.into(), AMQPValue::LongUInt(attempt));
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(message.job_id.to_string().into())
        .with_timestamp(message.enqueued_at.timestamp().max(0) as u64)
        .with_headers(headers)
}

/// Publishes a task to the exchange and waits for the broker's confirm. `body` is `message` as
/// stored in the outbox ([`TaskMessage::to_body`]), published as it is, so it is serialised once.
///
/// # Errors
/// The broker is unreachable, or it nacked or returned the message.
pub async fn publish_task(channel: &Channel, topology: &Topology, message: &TaskMessage, body: &[u8]) -> Result<(), PublishError> {
    publish_confirmed(channel, topology.exchange(), message.kind.as_str(), body, task_properties(message, 1)).await
}

/// How long a publish may wait for the broker's confirm.
pub const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Why a publish did not reach a queue.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker did not accept the message (nack, or no queue for its routing key)")]
    Nacked,
    #[error("the broker did not confirm the message within {CONFIRM_TIMEOUT:?}")]
    Timeout,
}

impl PublishError {
    /// A refused message is retryable (a queue may be declared again); a broker that does not
    /// answer is unavailable.
    pub fn disposition(&self) -> Disposition {
        match self {
            PublishError::Nacked => Disposition::Retryable,
            PublishError::Broker(_) | PublishError::Timeout => Disposition::Unavailable(Dependency::Broker),
        }
    }
}

/// Publishes with `mandatory` and waits for the confirm, at most [`CONFIRM_TIMEOUT`].
///
/// # Errors
/// See [`PublishError`].
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), PublishError> {
    let publish = async {
        channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                body,
                properties,
            )
            .await?
            .await
    };
    let confirm = tokio::time::timeout(CONFIRM_TIMEOUT, publish).await.map_err(|_| PublishError::Timeout)??;
    if confirm.is_ack() && confirm.take_message().is_none() { Ok(()) } else { Err(PublishError::Nacked) }
}

/// Reads a header as an integer, whatever integer type the publisher used.
pub fn header_u32(properties: &BasicProperties, name: &str) -> Option<u32> {
    let headers = properties.headers().as_ref()?;
    let value = headers.inner().get(&ShortString::from(name))?;
    let n: i64 = match value {
        AMQPValue::ShortShortUInt(v) => i64::from(*v),
        AMQPValue::ShortUInt(v) => i64::from(*v),
        AMQPValue::LongUInt(v) => i64::from(*v),
        AMQPValue::ShortShortInt(v) => i64::from(*v),
        AMQPValue::ShortInt(v) => i64::from(*v),
        AMQPValue::LongInt(v) => i64::from(*v),
        AMQPValue::LongLongInt(v) => *v,
        _ => return None,
    };
    u32::try_from(n).ok()
}

/// Reads a header as text.
pub fn header_str(properties: &BasicProperties, name: &str) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(&ShortString::from(name))? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// Copies `properties` with `headers` set on top of the existing ones.
pub fn with_headers(properties: &BasicProperties, headers: &[(&str, AMQPValue)]) -> BasicProperties {
    let mut table = properties.headers().clone().unwrap_or_default();
    for (name, value) in headers {
        table.insert((*name).into(), value.clone());
    }
    properties.clone().with_headers(table)
}

/// A header value holding text.
pub fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}
