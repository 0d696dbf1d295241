//! Job events: one message per move of a job into a final state (`succeeded`, `failed`, `dead`),
//! published to the `{prefix}.events` topic exchange with routing key `{kind}.{status}`, so that a
//! service that enqueued work learns when it ended without polling.
//!
//! Events go through an outbox of their own. A trigger on `jobs` (migration
//! `20261204000001_events_and_caller_ids.sql`) writes the event into `event_outbox` inside the
//! transaction that ends the job, whichever code ends it (a task's results transaction, a recorded
//! failure, a death count, a refused message, the task outbox failing a job), and calls
//! `pg_notify('heimdex_jobs', …)`, which PostgreSQL delivers at commit and never for a rollback.
//! Every worker runs [`relay`] when notified (and every `worker.outbox_relay_ms` as a sweep): it
//! publishes the rows with publisher confirms and deletes them. So an event is never lost and never
//! sent for a state that was rolled back; it may be sent twice (a relay that dies between the
//! confirm and the delete): consumers drop copies by `event_id`.
//!
//! The body is [`JobEvent`]; its JSON Schema ([`json_schema`]) is committed as
//! `deploy/contract/event.schema.json`.

use chrono::{DateTime, Utc};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::contract::{Metadata, TaskKind};
use crate::jobs::JobStatus;
use crate::outbox::OutboxError;
use crate::topology::{CONFIRM_TIMEOUT, PublishError, Topology};

/// The version of the event body this build writes.
pub const EVENT_VERSION: u32 = 1;

/// The PostgreSQL notification channel: `LISTEN heimdex_jobs` hears every job that ends, at commit.
pub const NOTIFY_CHANNEL: &str = "heimdex_jobs";

/// Rows one [`relay`] round publishes before it commits their deletion.
const RELAY_BATCH: i64 = 100;

/// A job reached a final state. Published as JSON (`content_type` `application/json`, persistent,
/// `message_id` = `event_id`) to the `{prefix}.events` topic exchange, routing key `{kind}.{status}`
/// (bind `#` for all, `vision.*`, `*.failed`, …). Consumers should ignore fields they do not know:
/// a new optional field keeps the version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "Heimdex job event")]
pub struct JobEvent {
    /// Event version.
    #[schemars(extend("const" = 1))]
    pub v: u32,
    /// Unique per event: a copy delivered twice (at-least-once) has the same id.
    pub event_id: Uuid,
    /// The job as Heimdex holds it (`GET /v1/jobs/{job_id}`); a task message from elsewhere may have
    /// named another one.
    pub job_id: Uuid,
    /// The video as Heimdex holds it.
    pub video_id: Uuid,
    pub kind: TaskKind,
    /// `succeeded`, `failed` (permanent: the input cannot be processed) or `dead` (out of attempts).
    #[schemars(with = "String", extend("enum" = ["succeeded", "failed", "dead"]))]
    pub status: JobStatus,
    /// Why the job failed or died (at most 1 KiB); null when it succeeded.
    #[schemars(required)]
    pub reason: Option<String>,
    /// What a successful run produced (index: `segments`, `language`, …; vision: `frames`, `scenes`,
    /// `faces`, …); null otherwise.
    #[schemars(required)]
    pub summary: Option<serde_json::Value>,
    /// Runs of the job counted so far.
    pub attempts: i32,
    /// When the job reached this state (UTC).
    pub finished_at: DateTime<Utc>,
    /// The caller's `external_id` from the task message, null without one.
    #[schemars(required)]
    pub external_id: Option<String>,
    /// The caller's `metadata` object from the task message, null without one.
    #[schemars(required)]
    pub metadata: Option<Metadata>,
}

impl JobEvent {
    /// The routing key of an event of `kind` reaching `status`.
    pub fn routing_key(kind: TaskKind, status: JobStatus) -> String {
        format!("{kind}.{status}")
    }
}

/// The JSON Schema of an event body (draft-07, as the task's), generated from [`JobEvent`].
pub fn json_schema() -> serde_json::Value {
    let generator = schemars::generate::SchemaSettings::draft07().into_generator();
    let mut schema = generator.into_root_schema_for::<JobEvent>();
    schema.insert("$id".into(), "https://heimdex.invalid/contract/event.schema.json".into());
    schema.insert("x-heimdex-event-version".into(), EVENT_VERSION.into());
    schema.to_value()
}

/// Publishes every event in `event_outbox`, oldest first, and deletes what the broker confirmed.
/// Rows are locked with `SKIP LOCKED`, so the relays of several workers share the work. Returns how
/// many were published.
///
/// Events are published without `mandatory`: with nobody bound to a routing key an event is
/// dropped by the exchange (publish/subscribe), not kept for ever.
///
/// # Errors
/// Database or broker errors; the rows confirmed before the error are deleted, the rest stay.
pub async fn relay(pool: &PgPool, channel: &Channel, topology: &Topology) -> Result<usize, OutboxError> {
    let exchange = topology.events_exchange();
    let mut published = 0;
    loop {
        let mut tx = pool.begin().await?;
        let rows: Vec<(i64, Uuid, String, String)> =
            sqlx::query_as("SELECT seq, event_id, routing_key, body::text FROM event_outbox ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED")
                .bind(RELAY_BATCH)
                .fetch_all(&mut *tx)
                .await?;
        let taken = rows.len();
        // Publish the batch, then wait for the confirms: one round trip for the batch, not per event.
        let mut pending = Vec::with_capacity(taken);
        let mut failure = None;
        for (seq, event_id, routing_key, body) in &rows {
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_message_id(event_id.to_string().into())
                .with_timestamp(Utc::now().timestamp().max(0) as u64)
                .with_app_id("heimdex".into());
            let publish = channel.basic_publish(
                exchange.as_str().into(),
                routing_key.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                properties,
            );
            match publish.await {
                Ok(confirm) => pending.push((*seq, confirm)),
                Err(e) => {
                    failure = Some(PublishError::Broker(e));
                    break;
                }
            }
        }
        let mut confirmed = Vec::with_capacity(pending.len());
        for (seq, confirm) in pending {
            match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
                Ok(Ok(c)) if c.is_ack() => confirmed.push(seq),
                Ok(Ok(_)) => {
                    failure.get_or_insert(PublishError::Nacked);
                }
                Ok(Err(e)) => {
                    failure.get_or_insert(PublishError::Broker(e));
                }
                Err(_) => {
                    failure.get_or_insert(PublishError::Timeout);
                }
            }
        }
        sqlx::query("DELETE FROM event_outbox WHERE seq = ANY($1)").bind(&confirmed).execute(&mut *tx).await?;
        tx.commit().await?;
        published += confirmed.len();
        if let Some(e) = failure {
            return Err(e.into());
        }
        if taken < RELAY_BATCH as usize {
            return Ok(published);
        }
    }
}
