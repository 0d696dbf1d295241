//! Heimdex common crate: what the producer, the workers and the tests agree on.
//!
//! - [`config`]: layered settings (defaults < TOML file < `HEIMDEX__SECTION__KEY` env), secrets redacted.
//! - [`contract`]: the versioned JSON task message.
//! - [`topology`]: exchange, work, retry and dead-letter queue names and their idempotent declaration.
//! - [`db`]: the connection pool, migrations and job bookkeeping; [`outbox`]: task messages stored with
//!   their jobs, so that no job is ever `queued` without a message.
//! - [`events`]: job events (a job reached `succeeded`, `failed` or `dead`), written with the job's
//!   final state and relayed to the `{prefix}.events` exchange.
//! - [`delete`]: deleting a video and all its rows (CLI, API, retention sweep), with a tombstone that
//!   keeps queued messages from bringing it back.
//! - [`error`]: dispositions (permanent, retryable, unavailable) and the cap on error texts.
//! - [`fleet`]: live worker state in Redis (heartbeat with a TTL).
//! - [`query`]: query embeddings from the warm workers: the request/reply contract and the caller.
//! - [`media`]: ffprobe, shared by the producer's validation and the workers; [`remote`]: http(s)
//!   media downloaded under an allowlist, address checks, timeouts and a size cap; [`s3`]: `s3://`
//!   media read from an S3-compatible store (SigV4), under the same limits.
//! - [`telemetry`] and [`shutdown`]: tracing set-up and the one shutdown signal.

pub mod config;
pub mod contract;
pub mod db;
pub mod delete;
pub mod error;
pub mod events;
pub mod fleet;
pub mod jobs;
pub mod media;
pub mod outbox;
pub mod query;
pub mod remote;
pub mod s3;
pub mod shutdown;
pub mod telemetry;
pub mod topology;

pub use config::Settings;
pub use contract::{TaskKind, TaskMessage, TaskOptions};
