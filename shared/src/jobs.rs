//! Job bookkeeping: one row per (video, kind), moved through
//! `queued → running → succeeded | retrying → … | failed | dead`.
//!
//! Every run of a job is fenced: [`start_run`] writes a fresh `run_token`, counts the attempt before
//! any work (so a crash cannot skip it) and every later write of that run requires the token. A forced
//! re-run or a redelivery takes the token over, and the older run's writes are refused, so a stale run
//! can neither overwrite newer results nor turn a success back into a failure.
//!
//! The producer creates rows; the worker upserts them from the message too, so a message published
//! by another service (without our producer) still gets a job row and a readable outcome.

use std::cmp::Ordering;
use std::fmt;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::contract::{Metadata, TaskKind, TaskMessage};
use crate::media::Probe;

/// A job's state, as stored in `jobs.status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Waiting for a worker (a message is in the queue or in the outbox).
    Queued,
    /// A run holds the job (`run_token`).
    Running,
    /// A run failed and the message waits in a retry queue.
    Retrying,
    Succeeded,
    /// Permanent failure: the input cannot be processed.
    Failed,
    /// Out of attempts.
    Dead,
}

impl JobStatus {
    /// Every state, in lifecycle order (the status page has a badge for each).
    pub const ALL: [JobStatus; 6] =
        [JobStatus::Queued, JobStatus::Running, JobStatus::Retrying, JobStatus::Succeeded, JobStatus::Failed, JobStatus::Dead];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Retrying => "retrying",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Dead => "dead",
        }
    }

    /// States after which nothing more happens without a new enqueue.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Dead)
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
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

/// One enqueue of a job. `queued_at` names the enqueue: its task message carries it as
/// `enqueued_at`, so that a worker runs only the latest enqueue's message and acks an older copy as
/// superseded (see [`start_run`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Queued {
    pub job_id: Uuid,
    pub queued_at: DateTime<Utc>,
}

/// Creates the job of (video, kind), or queues it again when `force`, when it ended badly, or when
/// it is still `queued` (its message may have been lost between the commit and the publish; the
/// older message is then superseded, see [`start_run`]). Returns the enqueue when a message must be
/// published, `None` when the job is running or done (enqueuing twice does not duplicate work).
///
/// A forced re-queue clears `run_token`, so a run still in progress is superseded: its writes are
/// refused from then on. It also starts a new [`Run::generation`], so the re-run reuses nothing an
/// earlier generation's runs kept (the index checkpoints) and decodes every window.
/// `queued_at` is the statement's own clock (not the transaction's start), so that of two racing
/// enqueues the one that commits last names the latest.
///
/// # Errors
/// Database errors.
pub async fn queue_job(conn: &mut PgConnection, video_id: Uuid, kind: TaskKind, force: bool) -> Result<Option<Queued>, sqlx::Error> {
    let row: Option<(Uuid, DateTime<Utc>)> = sqlx::query_as(
        "INSERT INTO jobs (id, video_id, kind, status, queued_at) VALUES ($1, $2, $3, 'queued', clock_timestamp())
         ON CONFLICT (video_id, kind) DO UPDATE SET status = 'queued', attempts = 0, deaths = 0, last_error = NULL,
             worker_id = NULL, run_token = NULL, queued_at = clock_timestamp(), started_at = NULL, finished_at = NULL,
             stage_timings = '{}'::jsonb, summary = NULL,
             generation = jobs.generation + CASE WHEN $4 THEN 1 ELSE 0 END
         WHERE $4 OR jobs.status IN ('queued', 'failed', 'dead')
         RETURNING id, queued_at",
    )
    .bind(Uuid::new_v4())
    .bind(video_id)
    .bind(kind.as_str())
    .bind(force)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|(job_id, queued_at)| Queued { job_id, queued_at }))
}

/// Stores the caller's fields of an enqueue on its job (inside the enqueue's transaction, after
/// [`queue_job`] returned it): every enqueue names them anew, so an enqueue without them clears them.
///
/// # Errors
/// Database errors.
pub async fn set_caller_fields(
    conn: &mut PgConnection,
    job_id: Uuid,
    external_id: Option<&str>,
    metadata: Option<&Metadata>,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE jobs SET external_id = $2, metadata = $3 WHERE id = $1")
        .bind(job_id)
        .bind(external_id)
        .bind(metadata.map(sqlx::types::Json))
        .execute(conn)
        .await?;
    Ok(())
}

/// A run of a job: the token that fences its writes, and its attempt number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// The job as Heimdex holds it (a foreign message may carry other ids).
    pub job_id: Uuid,
    /// The video as Heimdex holds it for the message's URI; results are written under this id.
    pub video_id: Uuid,
    pub token: Uuid,
    /// 1 for the first run; counted in the database before any work.
    pub attempt: u32,
    /// Earlier runs of this job that died with their worker (the worker runs such a job alone).
    pub deaths: u32,
    /// The job's generation: a forced re-queue starts a new one. Progress a run keeps for the runs
    /// after it (the index checkpoints) is reused only within the same generation.
    pub generation: i64,
}

/// The one fence of a run's writes: the job row, while the run's token is on it.
macro_rules! held {
    () => {
        "SELECT 1 FROM jobs WHERE id = $1 AND run_token = $2"
    };
}

/// A run and the pool its writes go through: what a pipeline gets during a run instead of the pool
/// itself, so that every write it makes is fenced by the run's token like the results are.
#[derive(Clone, Debug)]
pub struct FencedRun {
    pool: PgPool,
    run: Run,
}

impl FencedRun {
    pub fn new(pool: PgPool, run: Run) -> Self {
        Self { pool, run }
    }

    pub fn run(&self) -> &Run {
        &self.run
    }

    /// The pool, for reads: a superseded run may read what it likes, but writes go through [`Self::begin`].
    pub fn reader(&self) -> &PgPool {
        &self.pool
    }

    /// A transaction holding the job's row lock while the run holds the job (so no re-queue, delete or
    /// redelivery can take it over until the commit), or `None` when the run was superseded (a forced
    /// re-run, a redelivery elsewhere, a delete) and must write nothing.
    ///
    /// # Errors
    /// Database errors.
    pub async fn begin(&self) -> Result<Option<sqlx::Transaction<'static, sqlx::Postgres>>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let held: Option<i32> =
            sqlx::query_scalar(concat!(held!(), " FOR UPDATE")).bind(self.run.job_id).bind(self.run.token).fetch_optional(&mut *tx).await?;
        Ok(held.map(|_| tx))
    }

    /// Whether the run still holds its job (polled while a task runs, so a superseded run stops early).
    ///
    /// # Errors
    /// Database errors.
    pub async fn holds(&self) -> Result<bool, sqlx::Error> {
        let held: Option<i32> = sqlx::query_scalar(held!()).bind(self.run.job_id).bind(self.run.token).fetch_optional(&self.pool).await?;
        Ok(held.is_some())
    }
}

/// What the worker learns when it asks to start a run.
#[derive(Debug, PartialEq, Eq)]
pub enum Start {
    /// Go ahead, fenced by this run.
    Run(Run),
    /// The job already succeeded (a redelivery after the commit): ack and skip.
    AlreadyDone,
    /// Another copy of the same enqueue's message runs the job now, or already ended it: ack this
    /// copy; the other copy's own message covers the job.
    Duplicate,
    /// The message is a copy from an earlier enqueue of the job (a `--force`, a re-enqueue or a DLQ
    /// replay published a newer one since), or from before the video was deleted: ack it; only the
    /// latest enqueue's message runs the job.
    Superseded,
    /// The message goes to the dead-letter queue with `reason`: the job has had `max_attempts` runs and
    /// is now `dead`, or an earlier delivery of this message already ended it (`dead` or `failed`) and
    /// its worker died before routing the message.
    DeadLetter { attempts: u32, reason: String },
}

/// Starts a run: creates the video and job rows if the message came from elsewhere (a message whose
/// `video_id` differs from the one Heimdex holds for its URI runs under the held one), counts the
/// attempt, writes a fresh run token.
///
/// A message enqueued before its video was deleted is superseded (the video stays deleted).
/// Which enqueue a message belongs to is its `enqueued_at` against the job's `queued_at`:
/// - older: a stale copy (superseded by a later enqueue), acked whatever state the job is in;
/// - equal: the latest enqueue's message (our producer sets `enqueued_at` from `queued_at`; retry
///   copies keep it). A broker redelivery of a job that is still `running` means the run before
///   died without recording an outcome (a crash, an OOM kill): that is counted in `deaths`, and after
///   `max_attempts` runs the job is `dead` ("the worker died N times ..."). A broker redelivery of a
///   job that ended `dead` or `failed` is that end's own message, whose worker died before it
///   dead-lettered it (the row is written first, so that a crash can never leave a job `running`
///   without a message): it goes to the dead-letter queue with the stored reason. A first delivery
///   of a job that is running or ended is a second copy (a relay and a producer racing): acked.
/// - newer: a publisher other than our producer enqueued the job again; it becomes the latest
///   enqueue, and a job that ended badly starts a new series of attempts (for a running job it is a
///   duplicate, and its redelivery a death, as for the latest enqueue's message).
///
/// # Errors
/// Database errors (a connection error means the database is down).
pub async fn start_run(
    pool: &PgPool,
    msg: &TaskMessage,
    worker_id: &str,
    redelivered: bool,
    max_attempts: u32,
) -> Result<Start, sqlx::Error> {
    // PostgreSQL keeps microseconds: compare what it would store.
    let enqueued = msg.enqueued_at.duration_trunc(TimeDelta::microseconds(1)).unwrap_or(msg.enqueued_at);
    let mut tx = pool.begin().await?;
    let video_id: Uuid =
        sqlx::query_scalar("INSERT INTO videos (id, uri) VALUES ($1, $2) ON CONFLICT (uri) DO UPDATE SET uri = EXCLUDED.uri RETURNING id")
            .bind(msg.video_id)
            .bind(&msg.media_uri)
            .fetch_one(&mut *tx)
            .await?;
    // A message from before the video was deleted must not bring it back (see `crate::delete`).
    if crate::delete::deleted_since(&mut tx, &msg.media_uri, enqueued).await? {
        tx.rollback().await?;
        return Ok(Start::Superseded);
    }
    // The message's job id is used only when Heimdex holds no job for (video, kind) yet.
    sqlx::query(
        "INSERT INTO jobs (id, video_id, kind, status, queued_at, external_id, metadata) VALUES ($1, $2, $3, 'queued', $4, $5, $6)
         ON CONFLICT DO NOTHING",
    )
    .bind(msg.job_id)
    .bind(video_id)
    .bind(msg.kind.as_str())
    .bind(enqueued)
    .bind(msg.external_id.as_deref())
    .bind(msg.metadata.as_ref().map(sqlx::types::Json))
    .execute(&mut *tx)
    .await?;
    let (job_id, status, attempts, deaths, last_error, queued_at, generation): (
        Uuid,
        JobStatus,
        i32,
        i32,
        Option<String>,
        DateTime<Utc>,
        i64,
    ) = sqlx::query_as(
        "SELECT id, status, attempts, deaths, last_error, queued_at, generation FROM jobs WHERE video_id = $1 AND kind = $2 FOR UPDATE",
    )
    .bind(video_id)
    .bind(msg.kind.as_str())
    .fetch_one(&mut *tx)
    .await?;
    let (mut attempts, mut deaths) = (u32::try_from(attempts).unwrap_or(0), u32::try_from(deaths).unwrap_or(0));
    let verdict = match (enqueued.cmp(&queued_at), status) {
        (Ordering::Less, _) => Some(Start::Superseded),
        (_, JobStatus::Succeeded) => Some(Start::AlreadyDone),
        (_, JobStatus::Running) if !redelivered => Some(Start::Duplicate),
        // Also a newer message: one its run did not stamp (started by a worker of an older version).
        (_, JobStatus::Running) => {
            deaths += 1;
            None
        }
        (Ordering::Equal, JobStatus::Failed | JobStatus::Dead) if redelivered => {
            let reason = last_error.unwrap_or_else(|| format!("the job is {status}"));
            Some(Start::DeadLetter { attempts, reason })
        }
        (Ordering::Equal, JobStatus::Failed | JobStatus::Dead) => Some(Start::Duplicate),
        // A newer enqueue of a job that ended badly, by a publisher other than our producer (which
        // resets the row itself): a new series of attempts.
        (Ordering::Greater, JobStatus::Failed | JobStatus::Dead) => {
            (attempts, deaths) = (0, 0);
            None
        }
        (_, JobStatus::Queued | JobStatus::Retrying) => None,
    };
    if let Some(verdict) = verdict {
        tx.commit().await?;
        return Ok(verdict);
    }
    if attempts >= max_attempts {
        let reason = if status == JobStatus::Running {
            format!("the worker died {deaths} times while processing this task (gave up after {attempts} attempts)")
        } else {
            format!("gave up after {attempts} attempts")
        };
        sqlx::query("UPDATE jobs SET status = 'dead', deaths = $2, last_error = $3, run_token = NULL, finished_at = now() WHERE id = $1")
            .bind(job_id)
            .bind(deaths as i32)
            .bind(&reason)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        return Ok(Start::DeadLetter { attempts, reason });
    }
    let run = Run { job_id, video_id, token: Uuid::new_v4(), attempt: attempts + 1, deaths, generation };
    // The caller's fields are the latest enqueue's: this message's (our producer stored the same).
    sqlx::query(
        "UPDATE jobs SET status = 'running', attempts = $2, deaths = $3, run_token = $4, worker_id = $5,
             started_at = now(), finished_at = NULL, queued_at = $6, external_id = $7, metadata = $8
         WHERE id = $1",
    )
    .bind(job_id)
    .bind(run.attempt as i32)
    .bind(deaths as i32)
    .bind(run.token)
    .bind(worker_id)
    .bind(enqueued.max(queued_at))
    .bind(msg.external_id.as_deref())
    .bind(msg.metadata.as_ref().map(sqlx::types::Json))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Start::Run(run))
}

/// Records success inside the results transaction (from [`FencedRun::begin`]), so the job says `succeeded`
/// exactly when the results are there.
///
/// # Errors
/// Database errors.
pub async fn finish_success(
    conn: &mut PgConnection,
    run: &Run,
    timings: &serde_json::Value,
    summary: &serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE jobs SET status = 'succeeded', finished_at = now(), last_error = NULL, run_token = NULL,
             stage_timings = $3, summary = $4
         WHERE id = $1 AND run_token = $2",
    )
    .bind(run.job_id)
    .bind(run.token)
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

/// Records the end of a failed run: `retrying`, `failed` (permanent) or `dead` (out of attempts).
/// Returns false when the run no longer holds the job (nothing written).
///
/// # Errors
/// Database errors.
pub async fn record_failure(
    pool: &PgPool,
    run: &Run,
    status: JobStatus,
    error: &str,
    worker_id: &str,
    timings: &serde_json::Value,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE jobs SET status = $3, last_error = $4, worker_id = $5, stage_timings = $6, run_token = NULL,
             finished_at = CASE WHEN $7 THEN now() ELSE NULL END
         WHERE id = $1 AND run_token = $2",
    )
    .bind(run.job_id)
    .bind(run.token)
    .bind(status)
    .bind(error)
    .bind(worker_id)
    .bind(timings)
    .bind(status.is_terminal())
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Records a message that was refused before any run (not a task, too large, wrong kind) on the job
/// its `message_id` names, if that job is waiting: a job that is running or done is left alone.
///
/// # Errors
/// Database errors.
pub async fn refuse_message(pool: &PgPool, job_id: Uuid, error: &str, worker_id: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE jobs SET status = 'failed', last_error = $2, worker_id = $3, finished_at = now()
         WHERE id = $1 AND status IN ('queued', 'retrying')",
    )
    .bind(job_id)
    .bind(error)
    .bind(worker_id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Gives a run's attempt back: the run could not finish because a dependency of the worker (the
/// database, a model) failed, which says nothing about the task. The job is `queued` again.
///
/// # Errors
/// Database errors.
pub async fn release_run(pool: &PgPool, run: &Run) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE jobs SET status = 'queued', attempts = GREATEST(attempts - 1, 0), run_token = NULL, worker_id = NULL,
             started_at = NULL
         WHERE id = $1 AND run_token = $2",
    )
    .bind(run.job_id)
    .bind(run.token)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Puts a job back to `queued` with fresh attempts (DLQ replay), superseding any run, and returns
/// the new enqueue (its message must carry `queued_at` as `enqueued_at`). Call it before publishing
/// the message again, so a fast outcome of the new run cannot be overwritten.
///
/// `None` when Heimdex holds no job of that id.
///
/// # Errors
/// Database errors.
pub async fn requeue(pool: &PgPool, job_id: Uuid) -> Result<Option<Queued>, sqlx::Error> {
    let queued_at: Option<DateTime<Utc>> = sqlx::query_scalar(
        "UPDATE jobs SET status = 'queued', attempts = 0, deaths = 0, last_error = NULL, run_token = NULL,
             queued_at = clock_timestamp(), started_at = NULL, finished_at = NULL
         WHERE id = $1 RETURNING queued_at",
    )
    .bind(job_id)
    .fetch_optional(pool)
    .await?;
    Ok(queued_at.map(|queued_at| Queued { job_id, queued_at }))
}

/// A job as the CLI and the API show it.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema, sqlx::FromRow)]
pub struct JobRow {
    pub id: Uuid,
    pub video_id: Uuid,
    pub uri: String,
    pub kind: String,
    pub status: JobStatus,
    pub attempts: i32,
    /// Runs that ended without recording an outcome (the worker died).
    pub deaths: i32,
    pub last_error: Option<String>,
    pub worker_id: Option<String>,
    pub queued_at: chrono::DateTime<chrono::Utc>,
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    pub stage_timings: serde_json::Value,
    pub summary: Option<serde_json::Value>,
    /// The caller's own id and JSON object, from the latest enqueue (see `contract::TaskMessage`).
    pub external_id: Option<String>,
    pub metadata: Option<serde_json::Value>,
    /// The job's place in creation order (see [`list_jobs`]); not shown.
    #[serde(skip)]
    #[schemars(skip)]
    pub seq: i64,
}

const JOB_COLUMNS: &str = "j.id, j.video_id, v.uri, j.kind, j.status, j.attempts, j.deaths, j.last_error, j.worker_id, \
     j.queued_at, j.started_at, j.finished_at, j.stage_timings, j.summary, j.external_id, j.metadata, j.seq";

/// Which jobs [`list_jobs`] returns: those matching every filter that is set.
#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    pub status: Option<JobStatus>,
    pub kind: Option<TaskKind>,
    pub external_id: Option<String>,
}

/// Up to `limit` jobs matching `filter`, newest first (by creation, which a forced re-run does not
/// change), starting after the job whose `seq` is `before` when given: a page of a keyset
/// pagination, stable while jobs are added.
///
/// # Errors
/// Database errors.
pub async fn list_jobs(pool: &PgPool, filter: &JobFilter, before: Option<i64>, limit: i64) -> Result<Vec<JobRow>, sqlx::Error> {
    let mut query = sqlx::QueryBuilder::new(format!("SELECT {JOB_COLUMNS} FROM jobs j JOIN videos v ON v.id = j.video_id WHERE true"));
    // Only the filters that are set are written, so that each combination gets its own plan (an
    // `$1 IS NULL OR …` predicate would keep a generic plan off the indexes).
    if let Some(status) = filter.status {
        query.push(" AND j.status = ").push_bind(status.as_str());
    }
    if let Some(kind) = filter.kind {
        query.push(" AND j.kind = ").push_bind(kind.as_str());
    }
    if let Some(external_id) = &filter.external_id {
        query.push(" AND j.external_id = ").push_bind(external_id.clone());
    }
    if let Some(before) = before {
        query.push(" AND j.seq < ").push_bind(before);
    }
    query.push(" ORDER BY j.seq DESC LIMIT ").push_bind(limit);
    query.build_query_as().fetch_all(pool).await
}

/// A video as the API lists it: what the producer or the worker's probe recorded, and its jobs.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema, sqlx::FromRow)]
pub struct VideoRow {
    pub id: Uuid,
    pub uri: String,
    /// sha256 of a local file's bytes (none for remote media until a worker has read it).
    pub content_hash: Option<String>,
    pub size_bytes: Option<i64>,
    pub duration_s: Option<f64>,
    pub width: Option<i32>,
    pub height: Option<i32>,
    pub fps: Option<f64>,
    pub has_audio: Option<bool>,
    pub has_video: Option<bool>,
    pub created_at: DateTime<Utc>,
    /// The video's jobs, by kind.
    #[schemars(with = "Vec<VideoJob>")]
    pub jobs: sqlx::types::Json<Vec<VideoJob>>,
    /// The video's place in creation order (see [`list_videos`]); not shown.
    #[serde(skip)]
    #[schemars(skip)]
    pub seq: i64,
}

/// One job of a [`VideoRow`].
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VideoJob {
    pub job_id: Uuid,
    pub kind: TaskKind,
    pub status: JobStatus,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Up to `limit` videos, newest first, after the video whose `seq` is `before` when given (as
/// [`list_jobs`] pages).
///
/// # Errors
/// Database errors.
pub async fn list_videos(pool: &PgPool, before: Option<i64>, limit: i64) -> Result<Vec<VideoRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT v.id, v.uri, v.content_hash, v.size_bytes, v.duration_s, v.width, v.height, v.fps, v.has_audio, v.has_video,
                v.created_at, v.seq,
                coalesce((SELECT jsonb_agg(jsonb_build_object('job_id', j.id, 'kind', j.kind, 'status', j.status,
                                                              'finished_at', j.finished_at) ORDER BY j.kind)
                          FROM jobs j WHERE j.video_id = v.id), '[]') AS jobs
         FROM videos v WHERE v.seq < coalesce($1, 9223372036854775807) ORDER BY v.seq DESC LIMIT $2",
    )
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await
}

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
    sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM jobs j JOIN videos v ON v.id = j.video_id ORDER BY j.queued_at DESC LIMIT $1"))
        .bind(limit)
        .fetch_all(pool)
        .await
}

/// The most recent jobs that ended `dead` or `failed`, with their reasons.
///
/// # Errors
/// Database errors.
pub async fn recent_failures(pool: &PgPool, limit: i64) -> Result<Vec<JobRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs j JOIN videos v ON v.id = j.video_id WHERE j.status IN ('dead', 'failed')
         ORDER BY j.finished_at DESC NULLS LAST LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Job counts by (kind, status).
///
/// # Errors
/// Database errors.
pub async fn counts(pool: &PgPool) -> Result<Vec<(String, JobStatus, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT kind, status, count(*) FROM jobs GROUP BY kind, status ORDER BY kind, status").fetch_all(pool).await
}
