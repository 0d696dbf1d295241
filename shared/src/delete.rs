//! Deleting a video and everything Heimdex holds of it, for `heimdex delete`, `DELETE /v1/videos/{id}`
//! and the retention sweep (`heimdex sweep`, `retention.days`).
//!
//! One transaction removes the results (transcript segments, frames, faces, scenes), the index
//! checkpoints, the jobs with their outbox messages, and the video row, and records the video's URI in
//! `deleted_videos` (a tombstone). It first locks the video's jobs, in the order the workers' results
//! transactions take them ([`FencedRun::begin`] locks the job, then writes rows of the video):
//! - a job that is `running` makes the delete refuse ([`DeleteError::Running`]) unless `force`;
//! - with `force` the running run is superseded: its job row, and with it its `run_token`, is gone,
//!   so every later write of that run fails its fence ([`FencedRun::begin`] finds no job for the
//!   results or a checkpoint, a failure is not recorded), and the worker sees it within seconds
//!   ([`FencedRun::holds`]) and stops, acking its message;
//! - a results transaction that holds the job lock commits first, and the delete then removes what it
//!   wrote (the job is `succeeded` by then, so no `force` is needed).
//!
//! Messages still in a queue (a `queued` or `retrying` job, a copy waiting for redelivery) would make
//! a worker create the video again; the tombstone makes [`crate::jobs::start_run`] ack them as
//! superseded instead ([`deleted_since`]). A later enqueue of the same media is newer than the
//! tombstone and runs as usual.
//!
//! [`FencedRun::begin`]: crate::jobs::FencedRun::begin
//! [`FencedRun::holds`]: crate::jobs::FencedRun::holds

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::jobs::JobStatus;

/// How many times a delete that lost a deadlock to a worker's transaction is tried again. A worker
/// starting a run locks the video before its job, a worker writing results the job before the video;
/// the delete cannot take both orders, and PostgreSQL ends a deadlock by failing one side.
const DEADLOCK_RETRIES: u32 = 3;

/// What a delete removed, row counts by table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Deleted {
    pub video_id: Uuid,
    pub uri: String,
    pub segments: i64,
    pub frames: i64,
    pub faces: i64,
    pub scenes: i64,
    pub checkpoints: i64,
    pub jobs: i64,
    /// Task messages that were waiting in the outbox (never published).
    pub outbox: i64,
    /// Runs that were in progress and are now superseded (only with `force`).
    pub superseded_runs: i64,
}

/// Why a video was not deleted; nothing was removed.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    #[error("no video {0}")]
    NoVideo(Uuid),
    /// Refused without `force`: a worker is on the video now.
    #[error("video {video}: its {} job is running (force deletes it anyway and stops the run)", kinds.join(" and "))]
    Running { video: Uuid, kinds: Vec<String> },
    /// The sweep's: the video is no longer expired (enqueued again since the sweep chose it).
    #[error("video {0} is no longer expired")]
    NotExpired(Uuid),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Deletes the video `video_id` and all its rows in one transaction (see the module's docs). With
/// `force` a running job is superseded first; without, a running job refuses the delete.
///
/// # Errors
/// [`DeleteError::NoVideo`], [`DeleteError::Running`] (without `force`), or a database error.
pub async fn delete_video(pool: &PgPool, video_id: Uuid, force: bool) -> Result<Deleted, DeleteError> {
    delete_with(pool, video_id, if force { Mode::Force } else { Mode::Refuse }).await
}

/// What a delete does about the video's jobs.
#[derive(Clone, Copy)]
enum Mode {
    /// A running job refuses the delete.
    Refuse,
    /// A running job is superseded.
    Force,
    /// The sweep's: the video must still be expired under `days` once its jobs are locked (an enqueue
    /// may have come since the sweep chose it).
    Expired { days: u32 },
}

async fn delete_with(pool: &PgPool, video_id: Uuid, mode: Mode) -> Result<Deleted, DeleteError> {
    let mut tries = 0;
    loop {
        let mut tx = pool.begin().await?;
        match delete_in(&mut tx, video_id, mode).await {
            Ok(deleted) => {
                tx.commit().await?;
                return Ok(deleted);
            }
            Err(DeleteError::Database(e)) if is_deadlock(&e) && tries < DEADLOCK_RETRIES => {
                tries += 1;
                tracing::info!(video = %video_id, tries, "the delete met a worker's transaction in a deadlock; trying again");
            }
            Err(e) => return Err(e),
        }
    }
}

fn is_deadlock(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("40P01"))
}

async fn delete_in(tx: &mut PgConnection, video_id: Uuid, mode: Mode) -> Result<Deleted, DeleteError> {
    // The jobs first, as a results transaction takes them (see the module's docs).
    let held: Vec<(String, JobStatus)> = sqlx::query_as("SELECT kind, status FROM jobs WHERE video_id = $1 ORDER BY id FOR UPDATE")
        .bind(video_id)
        .fetch_all(&mut *tx)
        .await?;
    let running: Vec<String> = held.iter().filter(|(_, s)| *s == JobStatus::Running).map(|(k, _)| k.clone()).collect();
    match mode {
        Mode::Refuse if !running.is_empty() => return Err(DeleteError::Running { video: video_id, kinds: running }),
        Mode::Expired { days } => {
            let expired: Option<i32> = sqlx::query_scalar(&format!("SELECT 1 FROM videos v WHERE v.id = $1 AND {EXPIRED}"))
                .bind(video_id)
                .bind(i32::try_from(days).unwrap_or(i32::MAX))
                .fetch_optional(&mut *tx)
                .await?;
            if expired.is_none() {
                return Err(DeleteError::NotExpired(video_id));
            }
        }
        Mode::Refuse | Mode::Force => {}
    }
    let uri: Option<String> =
        sqlx::query_scalar("SELECT uri FROM videos WHERE id = $1 FOR UPDATE").bind(video_id).fetch_optional(&mut *tx).await?;
    let Some(uri) = uri else { return Err(DeleteError::NoVideo(video_id)) };
    sqlx::query(
        "INSERT INTO deleted_videos (uri, video_id, deleted_at) VALUES ($1, $2, clock_timestamp())
         ON CONFLICT (uri) DO UPDATE SET video_id = EXCLUDED.video_id, deleted_at = EXCLUDED.deleted_at",
    )
    .bind(&uri)
    .bind(video_id)
    .execute(&mut *tx)
    .await?;
    let (segments, frames, faces, scenes, checkpoints, outbox): (i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "WITH segments AS (DELETE FROM transcript_segments WHERE video_id = $1 RETURNING 1),
              frames AS (DELETE FROM frames WHERE video_id = $1 RETURNING 1),
              faces AS (DELETE FROM faces WHERE video_id = $1 RETURNING 1),
              scenes AS (DELETE FROM scenes WHERE video_id = $1 RETURNING 1),
              checkpoints AS (DELETE FROM index_checkpoints WHERE video_id = $1 RETURNING 1),
              outbox AS (DELETE FROM outbox WHERE job_id IN (SELECT id FROM jobs WHERE video_id = $1) RETURNING 1)
         SELECT (SELECT count(*) FROM segments), (SELECT count(*) FROM frames), (SELECT count(*) FROM faces),
                (SELECT count(*) FROM scenes), (SELECT count(*) FROM checkpoints), (SELECT count(*) FROM outbox)",
    )
    .bind(video_id)
    .fetch_one(&mut *tx)
    .await?;
    // The jobs and the video last (their foreign keys cascade to anything a statement above missed).
    let jobs = sqlx::query("DELETE FROM jobs WHERE video_id = $1").bind(video_id).execute(&mut *tx).await?.rows_affected();
    sqlx::query("DELETE FROM videos WHERE id = $1").bind(video_id).execute(&mut *tx).await?;
    Ok(Deleted {
        video_id,
        uri,
        segments,
        frames,
        faces,
        scenes,
        checkpoints,
        jobs: i64::try_from(jobs).unwrap_or(i64::MAX),
        outbox,
        superseded_runs: i64::try_from(running.len()).unwrap_or(i64::MAX),
    })
}

/// Whether the video at `uri` was deleted at or after `enqueued`: a message of an enqueue from before
/// the delete, which must not bring the video back (called by [`crate::jobs::start_run`] after it
/// upserted the video, so that a delete committed meanwhile is seen).
///
/// # Errors
/// Database errors.
pub async fn deleted_since(conn: &mut PgConnection, uri: &str, enqueued: DateTime<Utc>) -> Result<bool, sqlx::Error> {
    let deleted: Option<i32> = sqlx::query_scalar("SELECT 1 FROM deleted_videos WHERE uri = $1 AND deleted_at >= $2")
        .bind(uri)
        .bind(enqueued)
        .fetch_optional(conn)
        .await?;
    Ok(deleted.is_some())
}

/// What a retention sweep did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sweep {
    pub deleted: Vec<Deleted>,
    /// Videos that expired but were not deleted: enqueued again, or deleted by someone else, meanwhile.
    pub skipped: usize,
}

/// The retention rule, on the video `v` with `$2` days: registered before the cutoff, and every job
/// ended before it.
const EXPIRED: &str = "v.created_at < now() - make_interval(days => $2)
     AND NOT EXISTS (
         SELECT 1 FROM jobs j WHERE j.video_id = v.id
           AND (j.status NOT IN ('succeeded', 'failed', 'dead')
                OR coalesce(j.finished_at, j.queued_at) >= now() - make_interval(days => $2)))";

/// How many expired videos one query of the sweep fetches.
const SWEEP_BATCH: i64 = 100;

/// The retention sweep: deletes every video whose jobs all ended (succeeded, failed or dead) more than
/// `days` days ago, and every video without jobs registered more than `days` days ago, each in its own
/// transaction like [`delete_video`]'s, which checks the rule again under its locks (a video enqueued
/// again since it was chosen is skipped, never forced).
///
/// # Errors
/// Database errors (what was deleted before stays deleted).
pub async fn sweep(pool: &PgPool, days: u32) -> Result<Sweep, sqlx::Error> {
    let mut out = Sweep::default();
    let mut after = Uuid::nil();
    loop {
        let expired: Vec<Uuid> =
            sqlx::query_scalar(&format!("SELECT v.id FROM videos v WHERE v.id > $1 AND {EXPIRED} ORDER BY v.id LIMIT $3"))
                .bind(after)
                .bind(i32::try_from(days).unwrap_or(i32::MAX))
                .bind(SWEEP_BATCH)
                .fetch_all(pool)
                .await?;
        let Some(&last) = expired.last() else { return Ok(out) };
        after = last;
        for video in expired {
            match delete_with(pool, video, Mode::Expired { days }).await {
                Ok(deleted) => out.deleted.push(deleted),
                Err(DeleteError::Running { .. } | DeleteError::NoVideo(_) | DeleteError::NotExpired(_)) => out.skipped += 1,
                Err(DeleteError::Database(e)) => return Err(e),
            }
        }
    }
}
