//! The transactional outbox: a task message is stored in the same transaction that queues its job,
//! and deleted once the broker has confirmed it. A crash or a broker failure between the commit and
//! the publish therefore leaves the message in `outbox`, and [`relay`] (run by every worker) publishes
//! it later: no job is ever `queued` without a message.
//!
//! A message can be published twice (a relay and a producer racing, or a crash after the confirm and
//! before the delete); the worker treats a second copy as a duplicate (see `jobs::start_run`).

use std::time::Duration;

use lapin::Channel;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::contract::TaskMessage;
use crate::error::cap;
use crate::topology::{self, PublishError, Topology};

/// Why an outbox (the tasks' here, the events' in [`crate::events`]) could not be flushed; what was
/// not published stays for the next round.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("publishing: {0}")]
    Publish(#[from] PublishError),
}

/// Stores `message` for its job, inside the caller's transaction (replacing an older copy).
///
/// # Errors
/// Database errors.
pub async fn store(conn: &mut PgConnection, job_id: Uuid, message: &TaskMessage) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO outbox (job_id, body) VALUES ($1, $2)
         ON CONFLICT (job_id) DO UPDATE SET body = EXCLUDED.body, created_at = now()",
    )
    .bind(job_id)
    .bind(message.to_body())
    .execute(conn)
    .await?;
    Ok(())
}

/// Publishes `message` with confirms and removes it from the outbox, unless a newer enqueue of the
/// job has replaced it there meanwhile (that one is still to be published).
///
/// # Errors
/// The broker did not confirm (the message stays in the outbox for [`relay`]), or the database failed.
pub async fn publish(pool: &PgPool, channel: &Channel, topology: &Topology, message: &TaskMessage) -> Result<(), OutboxError> {
    let body = message.to_body();
    topology::publish_task(channel, topology, message, &body).await?;
    sqlx::query("DELETE FROM outbox WHERE job_id = $1 AND body = $2").bind(message.job_id).bind(&body).execute(pool).await?;
    Ok(())
}

/// Publishes every outbox message older than `older_than` (their producer did not get to it) and
/// deletes it; rows are locked with `SKIP LOCKED`, so several workers relay without waiting on each
/// other. Returns how many were published.
///
/// # Errors
/// Database or broker errors; what was not published stays for the next call.
pub async fn relay(pool: &PgPool, channel: &Channel, topology: &Topology, older_than: Duration) -> Result<usize, OutboxError> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(Uuid, Vec<u8>)> = sqlx::query_as(
        "SELECT job_id, body FROM outbox WHERE created_at < now() - make_interval(secs => $1)
         ORDER BY created_at LIMIT 100 FOR UPDATE SKIP LOCKED",
    )
    .bind(older_than.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    let mut published = 0;
    for (job_id, body) in rows {
        match TaskMessage::parse(&body) {
            Ok(message) => match topology::publish_task(channel, topology, &message, &body).await {
                Ok(()) => published += 1,
                // Unroutable now (a queue unbound or deleted): the row stays for the next round, and
                // does not hold back the rows behind it.
                Err(e @ PublishError::Nacked) => {
                    tracing::warn!(job = %job_id, error = %e, "an outbox message was refused; trying it again later");
                    continue;
                }
                Err(e) => return Err(e.into()),
            },
            // A row that can never become a message fails its job with the reason: never `queued` forever.
            Err(e) => {
                let reason = cap(&format!("its stored task message is not a task: {e}"));
                tracing::error!(job = %job_id, reason, "failing a job whose outbox message cannot be published");
                sqlx::query("UPDATE jobs SET status = 'failed', last_error = $2, finished_at = now() WHERE id = $1 AND status = 'queued'")
                    .bind(job_id)
                    .bind(&reason)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        sqlx::query("DELETE FROM outbox WHERE job_id = $1").bind(job_id).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(published)
}
