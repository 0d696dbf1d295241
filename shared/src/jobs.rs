//! Job bookkeeping: one row per (video, kind), moved through
//! `queued → running → succeeded | retrying → … | failed | dead`.
//!
//! The producer creates rows; the worker upserts them from the message too, so a message published
//! by another service (without our producer) still gets a job row and a readable outcome.

use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::contract::{TaskKind, TaskMessage};
use crate::media::Probe;

/// Terminal and intermediate job states, as stored.
pub mod status {
    pub const QUEUED: &str = "queued";
    pub const RUNNING: &str = "running";
    pub const RETRYING: &str = "retrying";
    pub const SUCCEEDED: &str = "succeeded";
    pub const FAILED: &str = "failed";
    pub const DEAD: &str = "dead";

    /// States after which nothing more happens without a new enqueue.
    pub fn is_terminal(s: &str) -> bool {
        matches!(s, SUCCEEDED | FAILED | DEAD)
    }
}

/// Inserts or refreshes a video by URI and returns its id.
///
/// # Errors
/// Database errors.
pub async fn upsert_video(
    conn: &mut PgConnection,
    uri: &str,
    content_hash: Option<&str>,
    size_bytes: Option<i64>,
    probe: &Probe,
) -> Result<Uuid, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO videos (id, uri, content_hash, size_bytes, duration_s, width, height, fps, has_audio, has_video)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (uri) DO UPDATE SET content_hash = EXCLUDED.content_hash, size_bytes = EXCLUDED.size_bytes,
             duration_s = EXCLUDED.duration_s, width = EXCLUDED.width, height = EXCLUDED.height, fps = EXCLUDED.fps,
             has_audio = EXCLUDED.has_audio, has_video = EXCLUDED.has_video, updated_at = now()
         RETURNING id",
    )
    .bind(Uuid::new_v4())
    .bind(uri)
    .bind(content_hash)
    .bind(size_bytes)
    .bind(probe.duration_s)
    .bind(probe.width.map(|w| w as i32))
    .bind(probe.height.map(|h| h as i32))
    .bind(probe.fps)
    .bind(probe.has_audio)
    .bind(probe.has_video)
    .fetch_one(conn)
    .await
}

/// Creates the job of (video, kind), or re-queues it when `force` or when it ended badly. Returns the
/// job id when a message must be published, `None` when the job already exists and is queued,
/// running or done (enqueuing twice does not duplicate work).
///
/// # Errors
/// Database errors.
pub async fn queue_job(conn: &mut PgConnection, video_id: Uuid, kind: TaskKind, force: bool) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO jobs (id, video_id, kind, status) VALUES ($1, $2, $3, 'queued')
         ON CONFLICT (video_id, kind) DO UPDATE SET status = 'queued', attempts = 0, last_error = NULL,
             worker_id = NULL, queued_at = now(), started_at = NULL, finished_at = NULL, stage_timings = '{}'::jsonb,
             summary = NULL
         WHERE $4 OR jobs.status IN ('failed', 'dead')
         RETURNING id",
    )
    .bind(Uuid::new_v4())
    .bind(video_id)
    .bind(kind.as_str())
    .bind(force)
    .fetch_optional(conn)
    .await
}

/// What the worker learns when it starts an attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Start {
    /// Go ahead.
    Run,
    /// The job already succeeded (a redelivery after the commit): ack and skip.
    AlreadyDone,
}

/// Marks a job running for this attempt, creating the video and job rows if the message came from
/// elsewhere.
///
/// # Errors
/// Database errors (a connection error means the database is down).
pub async fn start_attempt(pool: &PgPool, msg: &TaskMessage, worker_id: &str, attempt: u32) -> Result<Start, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO videos (id, uri) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(msg.video_id)
        .bind(&msg.media_uri)
        .execute(&mut *tx)
        .await?;
    let previous: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE video_id = $1 AND kind = $2 FOR UPDATE")
        .bind(msg.video_id)
        .bind(msg.kind.as_str())
        .fetch_optional(&mut *tx)
        .await?;
    if previous.as_deref() == Some(status::SUCCEEDED) {
        tx.commit().await?;
        return Ok(Start::AlreadyDone);
    }
    sqlx::query(
        "INSERT INTO jobs (id, video_id, kind, status, attempts, worker_id, started_at)
         VALUES ($1, $2, $3, 'running', $4, $5, now())
         ON CONFLICT (video_id, kind) DO UPDATE SET status = 'running', attempts = EXCLUDED.attempts,
             worker_id = EXCLUDED.worker_id, started_at = now(), finished_at = NULL",
    )
    .bind(msg.job_id)
    .bind(msg.video_id)
    .bind(msg.kind.as_str())
    .bind(attempt as i32)
    .bind(worker_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Start::Run)
}

/// Records success inside the results transaction, so the job says `succeeded` exactly when the
/// results are there.
///
/// # Errors
/// Database errors.
pub async fn finish_success(
    conn: &mut PgConnection,
    msg: &TaskMessage,
    timings: &serde_json::Value,
    summary: &serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE jobs SET status = 'succeeded', finished_at = now(), last_error = NULL, stage_timings = $3, summary = $4
         WHERE video_id = $1 AND kind = $2",
    )
    .bind(msg.video_id)
    .bind(msg.kind.as_str())
    .bind(timings)
    .bind(summary)
    .execute(conn)
    .await?;
    Ok(())
}

/// Refreshes the video's probe facts (inside the results transaction).
///
/// # Errors
/// Database errors.
pub async fn update_probe(conn: &mut PgConnection, video_id: Uuid, probe: &Probe) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE videos SET duration_s = $2, width = $3, height = $4, fps = $5, has_audio = $6, has_video = $7,
             updated_at = now() WHERE id = $1",
    )
    .bind(video_id)
    .bind(probe.duration_s)
    .bind(probe.width.map(|w| w as i32))
    .bind(probe.height.map(|h| h as i32))
    .bind(probe.fps)
    .bind(probe.has_audio)
    .bind(probe.has_video)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records a failed attempt: `retrying`, `failed` (permanent) or `dead` (out of attempts). Works on a
/// job id alone, for messages too broken to name their video.
///
/// # Errors
/// Database errors.
pub async fn record_failure(
    pool: &PgPool,
    job_id: Uuid,
    new_status: &str,
    error: &str,
    attempt: u32,
    worker_id: &str,
    timings: &serde_json::Value,
) -> Result<bool, sqlx::Error> {
    let finished = status::is_terminal(new_status);
    let done = sqlx::query(
        "UPDATE jobs SET status = $2, last_error = $3, attempts = GREATEST(attempts, $4), worker_id = $5,
             stage_timings = $6, finished_at = CASE WHEN $7 THEN now() ELSE NULL END
         WHERE id = $1",
    )
    .bind(job_id)
    .bind(new_status)
    .bind(error)
    .bind(attempt as i32)
    .bind(worker_id)
    .bind(timings)
    .bind(finished)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Puts jobs back to `queued` (DLQ replay).
///
/// # Errors
/// Database errors.
pub async fn requeue(pool: &PgPool, job_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE jobs SET status = 'queued', attempts = 0, last_error = NULL, queued_at = now(), started_at = NULL,
             finished_at = NULL WHERE id = $1",
    )
    .bind(job_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// A job as the CLI shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct JobRow {
    pub id: Uuid,
    pub video_id: Uuid,
    pub uri: String,
    pub kind: String,
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub worker_id: Option<String>,
    pub queued_at: chrono::DateTime<chrono::Utc>,
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    pub stage_timings: serde_json::Value,
    pub summary: Option<serde_json::Value>,
}

const JOB_COLUMNS: &str = "j.id, j.video_id, v.uri, j.kind, j.status, j.attempts, j.last_error, j.worker_id, \
     j.queued_at, j.started_at, j.finished_at, j.stage_timings, j.summary";

/// Jobs by id.
///
/// # Errors
/// Database errors.
pub async fn jobs_by_id(pool: &PgPool, ids: &[Uuid]) -> Result<Vec<JobRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs j JOIN videos v ON v.id = j.video_id WHERE j.id = ANY($1) ORDER BY v.uri, j.kind"
    ))
    .bind(ids)
    .fetch_all(pool)
    .await
}

/// The most recent jobs.
///
/// # Errors
/// Database errors.
pub async fn recent_jobs(pool: &PgPool, limit: i64) -> Result<Vec<JobRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs j JOIN videos v ON v.id = j.video_id ORDER BY j.queued_at DESC LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Job counts by (kind, status).
///
/// # Errors
/// Database errors.
pub async fn counts(pool: &PgPool) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT kind, status, count(*) FROM jobs GROUP BY kind, status ORDER BY kind, status")
        .fetch_all(pool)
        .await
}
