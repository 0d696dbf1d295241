//! Enqueue videos for Heimdex from any Rust service; search what was indexed ([`search`], with query
//! vectors from the warm workers through `heimdex_shared::query::QueryClient`).
//!
//! ```no_run
//! # async fn demo(settings: heimdex_shared::Settings) -> Result<(), heimdex_producer::ProducerError> {
//! use heimdex_producer::{EnqueueRequest, Producer};
//! let producer = Producer::connect(&settings).await?;
//! let enqueued = producer.enqueue(&EnqueueRequest::all("talks/keynote.mp4")).await?;
//! println!("video {} jobs {:?}", enqueued.video_id, enqueued.jobs);
//! # Ok(()) }
//! ```
//!
//! Input is validated before anything is written: local media must resolve under the media root, be
//! non-empty, and be readable by ffprobe (it is hashed too); an http(s) URL must be allowed and point
//! at a public address (`heimdex_shared::remote::check`), and is neither downloaded nor probed here, so
//! that enqueue answers at once: the worker downloads it once, and its canonical URL identifies the
//! video (no content hash, size or probe until a worker has read it). An `s3://bucket/key` URI is
//! checked the same way, for its syntax only (`heimdex_shared::s3::check`): the worker reads it. Then one transaction upserts the
//! video, its jobs and their messages (the outbox), and each message is published with publisher
//! confirms and removed from the outbox. If the publish fails, or this process dies first, the message
//! stays in the outbox and the workers publish it: a job is never `queued` without a message.
//! Enqueuing the same video again is a no-op for jobs that are running or done, unless `force`; a job
//! still `queued` is published again (harmless: a second copy is recognised as a duplicate).

pub mod search;
pub mod serve;
pub mod status;
pub mod transcript;

use std::path::Path;

use heimdex_shared::Settings;
use heimdex_shared::contract::{self, ContractError, Metadata, TaskKind, TaskMessage, TaskOptions};
use heimdex_shared::jobs::{self, JobStatus};
use heimdex_shared::media::{self, MediaError, Probe};
use heimdex_shared::outbox::{self, OutboxError};
use heimdex_shared::topology::{self, PublishError, Topology};
use heimdex_shared::{remote, s3};
use lapin::{Channel, Connection};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

/// Why an enqueue failed.
#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    /// The input was refused; nothing was written.
    #[error(transparent)]
    Media(#[from] MediaError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("publishing: {0}")]
    Publish(#[from] PublishError),
    /// The jobs are stored and `queued`; their messages wait in the outbox for a worker to relay them.
    #[error("{0} (the job is stored and its message is published from the outbox once the broker takes it)")]
    Outbox(#[from] OutboxError),
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    /// A task option was refused; nothing was written.
    #[error(transparent)]
    Options(#[from] ContractError),
}

/// What to enqueue.
#[derive(Debug, Clone)]
pub struct EnqueueRequest {
    /// A path (absolute, or relative to the media root) or an http(s) URL.
    pub uri: String,
    pub kinds: Vec<TaskKind>,
    /// Re-run jobs that are queued, running or done.
    pub force: bool,
    pub options: TaskOptions,
    /// The caller's own id for the jobs (1 to 256 characters): stored on them, returned by the API
    /// and the CLI, carried by their events, looked up with `GET /v1/jobs?external_id=`.
    pub external_id: Option<String>,
    /// The caller's own JSON object (at most 8 KiB), stored and returned like `external_id`.
    pub metadata: Option<Metadata>,
}

impl EnqueueRequest {
    /// Every task kind, default options, no caller fields.
    pub fn all(uri: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            kinds: TaskKind::ALL.to_vec(),
            force: false,
            options: TaskOptions::default(),
            external_id: None,
            metadata: None,
        }
    }

    /// Checks the options and the caller's fields (nothing is written when they are refused).
    ///
    /// # Errors
    /// [`ContractError::Shape`] naming the field.
    pub fn validate(&self) -> Result<(), ContractError> {
        self.options.validate()?;
        contract::check_caller_fields(self.external_id.as_deref(), self.metadata.as_ref())
    }
}

/// Media that passed validation.
#[derive(Debug, Clone)]
pub struct ValidMedia {
    /// Canonical path or URL, as stored in `videos.uri`: what identifies the video.
    pub uri: String,
    /// What ffprobe says of a local file; `None` for remote media, which the worker probes after its
    /// download.
    pub probe: Option<Probe>,
    /// The sha256 and size of a local file; `None` for remote media (never downloaded at enqueue).
    pub content_hash: Option<String>,
    pub size_bytes: Option<i64>,
}

/// One job of an enqueue.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct EnqueuedJob {
    pub kind: TaskKind,
    pub job_id: Uuid,
    /// False when the job already existed (running or done) and nothing was published.
    pub published: bool,
    pub status: JobStatus,
}

/// What an enqueue wrote: the video (its id, and its URI as stored) and one job per kind.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct Enqueued {
    pub video_id: Uuid,
    pub uri: String,
    pub jobs: Vec<EnqueuedJob>,
}

/// A connection to the database and the broker, with the topology declared.
pub struct Producer {
    pool: PgPool,
    _connection: Connection,
    channel: Channel,
    topology: Topology,
    settings: Settings,
}

impl Producer {
    /// Connects and declares the queue topology (idempotent).
    ///
    /// # Errors
    /// The database or the broker is unreachable.
    pub async fn connect(settings: &Settings) -> Result<Self, ProducerError> {
        let pool = heimdex_shared::db::pool(&settings.database)?;
        let (connection, channel) = topology::connect(&settings.amqp, "heimdex-producer").await?;
        let topology = Topology::new(&settings.amqp);
        topology.declare(&channel, &settings.worker).await?;
        Ok(Self { pool, _connection: connection, channel, topology, settings: settings.clone() })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Checks media without writing anything: a local file's location, size, ffprobe and content
    /// hash; a URL's scheme, host and addresses (see [`validate`]).
    ///
    /// # Errors
    /// [`ProducerError::Media`] with a message that names the problem.
    pub async fn validate(&self, uri: &str) -> Result<ValidMedia, ProducerError> {
        validate(uri, &self.settings).await
    }

    /// Validates and enqueues one video.
    ///
    /// # Errors
    /// Refused input (nothing written), or the database/broker failing.
    pub async fn enqueue(&self, request: &EnqueueRequest) -> Result<Enqueued, ProducerError> {
        request.validate()?;
        let media = self.validate(&request.uri).await?;
        self.enqueue_valid(&media, request).await
    }

    /// Enqueues media that [`Producer::validate`] accepted.
    ///
    /// # Errors
    /// The database or the broker failing. When the broker fails after the commit
    /// ([`ProducerError::Outbox`]), the jobs stay `queued` and the workers publish their messages.
    pub async fn enqueue_valid(&self, media: &ValidMedia, request: &EnqueueRequest) -> Result<Enqueued, ProducerError> {
        request.validate()?;
        let mut tx = self.pool.begin().await?;
        let video_id = match &media.probe {
            Some(probe) => jobs::upsert_video(&mut tx, &media.uri, media.content_hash.as_deref(), media.size_bytes, probe).await?,
            None => register_remote(&mut tx, &media.uri).await?,
        };
        let mut queued = Vec::new();
        for &kind in &request.kinds {
            let message = match jobs::queue_job(&mut tx, video_id, kind, request.force).await? {
                Some(queued) => {
                    let mut message = TaskMessage::of_enqueue(&queued, video_id, kind, media.uri.clone(), request.options.clone());
                    message.external_id.clone_from(&request.external_id);
                    message.metadata.clone_from(&request.metadata);
                    jobs::set_caller_fields(&mut tx, queued.job_id, request.external_id.as_deref(), request.metadata.as_ref()).await?;
                    outbox::store(&mut tx, queued.job_id, &message).await?;
                    Some(message)
                }
                None => None,
            };
            queued.push((kind, message));
        }
        tx.commit().await?;
        let mut out = Vec::new();
        for (kind, message) in queued {
            match message {
                Some(message) => {
                    outbox::publish(&self.pool, &self.channel, &self.topology, &message).await?;
                    out.push(EnqueuedJob { kind, job_id: message.job_id, published: true, status: JobStatus::Queued });
                }
                None => {
                    let (job_id, st): (Uuid, JobStatus) = sqlx::query_as("SELECT id, status FROM jobs WHERE video_id = $1 AND kind = $2")
                        .bind(video_id)
                        .bind(kind.as_str())
                        .fetch_one(&self.pool)
                        .await?;
                    out.push(EnqueuedJob { kind, job_id, published: false, status: st });
                }
            }
        }
        Ok(Enqueued { video_id, uri: media.uri.clone(), jobs: out })
    }
}

/// Validation without a broker connection (the CLI validates every input before connecting). A
/// local file is probed and hashed; a URL is only checked (scheme, allowed host, public addresses;
/// bounded by `media.remote_timeout_ms`), and an `s3://` URI only parsed, never downloaded: the worker
/// does that, once.
///
/// # Errors
/// [`ProducerError::Media`] naming the problem.
pub async fn validate(uri: &str, settings: &Settings) -> Result<ValidMedia, ProducerError> {
    let resolved = media::resolve(uri, &settings.media.root, settings.media.allow_http)?;
    if remote::is_remote(&resolved) {
        let checked = remote::check(&resolved, &settings.media).await?;
        return Ok(ValidMedia { uri: checked.url, probe: None, content_hash: None, size_bytes: None });
    }
    if s3::is_s3(&resolved) {
        let object = s3::check(&resolved, &settings.s3)?;
        return Ok(ValidMedia { uri: object.to_string(), probe: None, content_hash: None, size_bytes: None });
    }
    let probe = media::probe(&resolved).await?;
    let path = resolved.clone();
    let (hash, size) = tokio::task::spawn_blocking(move || hash_file(Path::new(&path)))
        .await
        .map_err(|e| ProducerError::Read { path: resolved.clone(), source: std::io::Error::other(e) })?
        .map_err(|source| ProducerError::Read { path: resolved.clone(), source })?;
    Ok(ValidMedia { uri: resolved, probe: Some(probe), content_hash: Some(hash), size_bytes: Some(size) })
}

/// The video row of a remote URL, created if new; an existing row keeps what a worker recorded of it
/// (its probe), which an enqueue that did not read the media must not overwrite.
async fn register_remote(tx: &mut sqlx::PgConnection, uri: &str) -> Result<Uuid, sqlx::Error> {
    sqlx::query_scalar("INSERT INTO videos (id, uri) VALUES ($1, $2) ON CONFLICT (uri) DO UPDATE SET updated_at = now() RETURNING id")
        .bind(Uuid::new_v4())
        .bind(uri)
        .fetch_one(tx)
        .await
}

fn hash_file(path: &Path) -> std::io::Result<(String, i64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let size = std::io::copy(&mut file, &mut hasher)?;
    Ok((hex::encode(hasher.finalize()), i64::try_from(size).unwrap_or(i64::MAX)))
}
