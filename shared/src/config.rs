//! Layered configuration: serde defaults < optional TOML file < `HEIMDEX__SECTION__KEY` environment.
//!
//! One [`Settings`] struct serves every binary; each reads the sections it needs. Connection URLs are
//! [`Secret`]s so that logging the effective configuration (`{settings:?}`) never prints a password.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Environment prefix; nested keys are separated by `__` (`HEIMDEX__DATABASE__URL`).
pub const ENV_PREFIX: &str = "HEIMDEX";

/// Errors from loading configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Invalid(#[from] config::ConfigError),
    #[error("invalid configuration: {0}")]
    Value(String),
}

/// Loads settings from defaults, then `file` (if given; it must exist), then the environment.
///
/// # Errors
/// A file that cannot be read or parsed, or a value of the wrong type.
pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(file) = file {
        builder = builder.add_source(config::File::from(file).required(true));
    }
    let settings = builder
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("amqp.urls")
                .with_list_parse_key("media.allow_hosts")
                .with_list_parse_key("serve.api_keys")
                .with_list_parse_key("serve.allowed_hosts"),
        )
        .build()?;
    if settings.get::<config::Value>("amqp.url").is_ok() && settings.get::<config::Value>("amqp.urls").is_ok() {
        return Err(ConfigError::Value(
            "amqp.url and amqp.urls are both set (in the file or as HEIMDEX__AMQP__URL / HEIMDEX__AMQP__URLS): \
             set amqp.urls (one broker or several), or amqp.url (one), not both"
                .into(),
        ));
    }
    let settings: Settings = settings.try_deserialize()?;
    settings.validate()?;
    Ok(settings)
}

/// A string that must never reach a log: `Debug`/`Display` show it with any URL password masked.
#[derive(Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The real value, for the one place that needs it (a connect call).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact_url(&self.0))
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// `scheme://user:password@host/..` → `scheme://user:***@host/..`; anything that is not such a URL is
/// masked whole.
pub fn redact_url(value: &str) -> String {
    let Some((scheme, rest)) = value.split_once("://") else {
        return "***".into();
    };
    let (authority, tail) = rest.split_once('/').map_or((rest, None), |(a, t)| (a, Some(t)));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_string(),
    };
    match tail {
        Some(tail) => format!("{scheme}://{authority}/{tail}"),
        None => format!("{scheme}://{authority}"),
    }
}

/// Every setting of every Heimdex binary.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Settings {
    pub amqp: AmqpSettings,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub media: MediaSettings,
    pub s3: S3Settings,
    pub log: LogSettings,
    pub worker: WorkerSettings,
    pub engine: EngineSettings,
    pub models: ModelSettings,
    pub vision: VisionSettings,
    pub index: IndexSettings,
    pub serve: ServeSettings,
    pub retention: RetentionSettings,
}

impl Settings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.worker.concurrency == 0 {
            return Err(ConfigError::Value("worker.concurrency must be at least 1".into()));
        }
        if !(self.worker.query_share > 0.0 && self.worker.query_share <= 1.0) {
            return Err(ConfigError::Value(format!("worker.query_share must be in (0, 1], not {}", self.worker.query_share)));
        }
        if self.worker.max_attempts == 0 {
            return Err(ConfigError::Value("worker.max_attempts must be at least 1".into()));
        }
        if self.worker.max_attempts > crate::topology::MAX_ATTEMPTS_LIMIT {
            return Err(ConfigError::Value(format!(
                "worker.max_attempts must be at most {} (half the quorum queues' own delivery limit, {})",
                crate::topology::MAX_ATTEMPTS_LIMIT,
                crate::topology::DELIVERY_LIMIT
            )));
        }
        if self.amqp.urls.is_empty() || self.amqp.urls.iter().any(|u| u.expose().trim().is_empty()) {
            return Err(ConfigError::Value("amqp.urls must name at least one broker, and no empty one".into()));
        }
        if self.engine.max_batch == 0 {
            return Err(ConfigError::Value("engine.max_batch must be at least 1".into()));
        }
        let db = &self.database;
        // pgvector's own bounds, refused here rather than by the first `heimdex migrate`.
        if !(2..=100).contains(&db.hnsw_m) || !(4..=1000).contains(&db.hnsw_ef_construction) || db.hnsw_ef_construction < 2 * db.hnsw_m {
            return Err(ConfigError::Value(format!(
                "database.hnsw_m must be in 2..=100 and database.hnsw_ef_construction in 4..=1000 and at least twice hnsw_m, not {} and {}",
                db.hnsw_m, db.hnsw_ef_construction
            )));
        }
        self.serve.validate()?;
        self.s3.validate()?;
        let v = &self.vision;
        if v.embed_dir.contains("standin") && !v.embed_model.contains("standin") {
            return Err(ConfigError::Value(format!(
                "vision.embed_dir {:?} is a stand-in (random or toy weights) but vision.embed_model {:?} names a real model: \
                 name the stand-in (e.g. \"heimdex/{}\") so that its vectors never mix with a real model's",
                v.embed_dir, v.embed_model, v.embed_dir
            )));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct AmqpSettings {
    /// The broker's addresses: one, or every node of a cluster (in any order). A connection goes to
    /// one of them, picked at random so that a fleet spreads over the nodes, and moves to another
    /// when its node goes away. `url` (one address, as before clusters) is read as a one-element list.
    /// From the environment: `HEIMDEX__AMQP__URLS=amqp://..,amqp://..` or `HEIMDEX__AMQP__URL`.
    #[serde(alias = "url", deserialize_with = "one_or_many")]
    pub urls: Vec<Secret>,
    /// Names the exchange and prefixes every queue (`heimdex.index`, `heimdex.index.dlq`, ...).
    /// Tests use a unique prefix so that they can run in parallel on one broker.
    pub prefix: String,
    /// The broker's `consumer_timeout` (RabbitMQ's default: 30 min): a delivery unacked for longer
    /// makes the broker close the channel. Task time bounds stay a minute below it; raise both
    /// together for very long media on slow hosts.
    pub consumer_timeout_ms: u64,
    /// The type of the work, retry and dead-letter queues (see [`QueueType`]).
    pub queue_type: QueueType,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            urls: vec![Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f")],
            prefix: "heimdex".into(),
            consumer_timeout_ms: 30 * 60 * 1000,
            queue_type: QueueType::Quorum,
        }
    }
}

/// The RabbitMQ type of the durable queues (work, retry, dead-letter). A queue's type is fixed when
/// it is declared: a deployment changes it by draining, deleting and declaring its queues again
/// (deploy/README.md, "Moving an existing classic deployment over").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated (Raft) on every node of a cluster: a message confirmed to the publisher survives
    /// the loss of a minority of the nodes. The default.
    #[default]
    Quorum,
    /// One node's queue: the one type before quorum queues; cheaper per message, lost with its node.
    Classic,
}

impl QueueType {
    /// The `x-queue-type` argument's value.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

impl fmt::Display for QueueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string (one address) or a list of them.
fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<Secret>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(Secret),
        Many(Vec<Secret>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(url) => vec![url],
        OneOrMany::Many(urls) => urls,
    })
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct DatabaseSettings {
    pub url: Secret,
    pub max_connections: u32,
    /// How long to wait for a pooled connection before calling the database unavailable.
    pub acquire_timeout_ms: u64,
    /// The role workers and producers connect as, when it is not the schema's owner: `heimdex migrate`
    /// grants it what they use (rows of Heimdex's tables) and nothing more. Empty: grant nothing.
    pub worker_role: String,
    /// Longest a statement may run (PostgreSQL `statement_timeout`).
    pub statement_timeout_ms: u64,
    /// Longest a statement may wait for a lock (PostgreSQL `lock_timeout`).
    pub lock_timeout_ms: u64,
    /// `maintenance_work_mem` of an HNSW build in `heimdex migrate`, in MiB. A build whose graph
    /// outgrows it goes on many times slower; 1M 768-d halfvec vectors need about 2 GiB.
    pub index_build_memory_mb: u32,
    /// Parallel workers of an HNSW build beside the leader (`max_parallel_maintenance_workers`; the
    /// server's `max_parallel_workers` still caps it).
    pub index_build_workers: u32,
    /// HNSW `m`: links per node of the vector indexes `heimdex migrate` builds (pgvector's default 16).
    /// More links cost build time and index bytes and buy recall on clustered vectors (bench-search).
    pub hnsw_m: u32,
    /// HNSW `ef_construction`: the candidate list of each insertion while building (pgvector's 64).
    pub hnsw_ef_construction: u32,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: Secret::new("postgres://postgres@127.0.0.1:5432/heimdex"),
            max_connections: 8,
            acquire_timeout_ms: 3_000,
            worker_role: String::new(),
            statement_timeout_ms: 60_000,
            lock_timeout_ms: 10_000,
            index_build_memory_mb: 1024,
            index_build_workers: 1,
            hnsw_m: 16,
            hnsw_ef_construction: 256,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct RedisSettings {
    pub url: Secret,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self { url: Secret::new("redis://127.0.0.1:6379/") }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct MediaSettings {
    /// Local media URIs must resolve (after symlinks) to a file under this folder.
    pub root: PathBuf,
    /// Accept `http://` and `https://` media URIs (downloaded to a temporary file first). Off by
    /// default: a worker that fetches whatever URL a message names can be pointed at internal services.
    pub allow_http: bool,
    /// Hosts that remote media may come from; empty = any public host. A listed host may also
    /// resolve to a loopback, private or link-local address, which is refused otherwise.
    pub allow_hosts: Vec<String>,
    /// Largest remote file accepted (bytes; default 8 GiB, about two hours of 1080p at 8 Mbit/s),
    /// checked against `Content-Length` before the body and on every chunk read.
    pub max_remote_bytes: u64,
    /// Connect timeout, and longest silence while reading, for remote media.
    pub remote_timeout_ms: u64,
    /// Longest a whole remote download may take, however steadily the server sends (default one
    /// hour: 8 GiB at about 19 Mbit/s). A server that drips bytes forever is cut off here.
    pub remote_deadline_ms: u64,
}

impl Default for MediaSettings {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/srv/heimdex/media"),
            allow_http: false,
            allow_hosts: Vec::new(),
            max_remote_bytes: 8 << 30,
            remote_timeout_ms: 30_000,
            remote_deadline_ms: 3_600_000,
        }
    }
}

/// The S3-compatible object store that `s3://bucket/key` media URIs are read from (by the workers
/// only: enqueue checks the URI's syntax and reads nothing). Downloads follow `media`'s limits
/// (`remote_timeout_ms`, `remote_deadline_ms`, `max_remote_bytes`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct S3Settings {
    /// The store's base URL (`https://s3.eu-west-1.amazonaws.com`, `http://minio:9000`); empty: `s3://`
    /// URIs are refused. The operator names it, so it may be on a private or loopback address (no
    /// public-address check, unlike http(s) media, whose URL comes from whoever enqueues).
    pub endpoint: String,
    /// The region requests are signed for (MinIO and most other stores accept `us-east-1`).
    pub region: String,
    /// Access key id; with `secret_access_key` empty too, requests are sent unsigned (a public bucket).
    pub access_key_id: Secret,
    pub secret_access_key: Secret,
    /// For temporary credentials (STS); empty otherwise.
    pub session_token: Secret,
    /// `endpoint/bucket/key` (true: MinIO, Ceph, most self-hosted stores, any endpoint that is an IP
    /// address) or `bucket.endpoint/key` (false: AWS's virtual-hosted style).
    pub path_style: bool,
}

impl Default for S3Settings {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            region: "us-east-1".into(),
            access_key_id: Secret::new(""),
            secret_access_key: Secret::new(""),
            session_token: Secret::new(""),
            path_style: true,
        }
    }
}

impl S3Settings {
    /// Whether `s3://` media URIs are accepted (an endpoint is configured).
    pub fn enabled(&self) -> bool {
        !self.endpoint.trim().is_empty()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        let invalid = |why: &str| ConfigError::Value(format!("s3.endpoint {:?}: {why}", redact_url(&self.endpoint)));
        let url = url::Url::parse(&self.endpoint).map_err(|e| invalid(&e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(invalid("must be an http(s) URL with a host"));
        }
        if !url.username().is_empty() || url.password().is_some() || url.query().is_some() || url.fragment().is_some() {
            return Err(invalid(
                "must not carry credentials, a query or a fragment (credentials go in s3.access_key_id and s3.secret_access_key)",
            ));
        }
        if !self.path_style && !matches!(url.host(), Some(url::Host::Domain(_))) {
            return Err(invalid("is an IP address, which has no virtual-hosted buckets: set s3.path_style = true"));
        }
        if self.region.trim().is_empty() || !self.region.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(ConfigError::Value(format!("s3.region {:?} is not a region name", self.region)));
        }
        if self.access_key_id.expose().is_empty() != self.secret_access_key.expose().is_empty() {
            return Err(ConfigError::Value("s3.access_key_id and s3.secret_access_key go together: set both, or neither".into()));
        }
        Ok(())
    }
}

/// How long Heimdex keeps what it indexed: `heimdex sweep` deletes videos whose jobs all ended more
/// than `days` days ago (see `heimdex_shared::delete::sweep`).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct RetentionSettings {
    /// Days a finished video's rows are kept; 0 keeps them forever (the sweep does nothing).
    pub days: u32,
}

/// `heimdex serve`: who may call the HTTP API, under which names, and how much it takes at once.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct ServeSettings {
    /// Bearer tokens (`Authorization: Bearer KEY`), at least 16 characters each. When set, every route
    /// but `/healthz` needs one. Without any, the server listens on loopback addresses only.
    pub api_keys: Vec<Secret>,
    /// Names the `Host` header may carry (any port): a browser tricked by DNS rebinding sends the
    /// attacker's name and is refused. `*` accepts any name (behind a proxy that checks it).
    pub allowed_hosts: Vec<String>,
    /// Let `force` re-run finished jobs without an API key (with keys, every caller has one).
    pub allow_force: bool,
    /// Longest wait for a request's headers; a connection that sends them slower is closed.
    pub header_timeout_ms: u64,
    /// Longest a request may take, its wait for a slot included; past it the answer is 503.
    pub request_timeout_ms: u64,
    /// Longest wait for a broker connection (a broker that accepts TCP and never answers).
    pub connect_timeout_ms: u64,
    /// Requests handled at once; more wait for a slot (within `request_timeout_ms`).
    pub max_concurrent_requests: usize,
    /// Open connections at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Largest request body (bytes); a larger one gets 413.
    pub max_body_bytes: usize,
}

impl Default for ServeSettings {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            allowed_hosts: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            allow_force: false,
            header_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
            connect_timeout_ms: 5_000,
            max_concurrent_requests: 16,
            max_connections: 256,
            max_body_bytes: 64 * 1024,
        }
    }
}

impl ServeSettings {
    /// Shortest API key accepted.
    pub const MIN_KEY_LEN: usize = 16;

    fn validate(&self) -> Result<(), ConfigError> {
        if self.api_keys.iter().any(|k| k.expose().trim().len() < Self::MIN_KEY_LEN || k.expose().chars().any(char::is_whitespace)) {
            return Err(ConfigError::Value(format!(
                "serve.api_keys: every key needs at least {} characters and no whitespace",
                Self::MIN_KEY_LEN
            )));
        }
        let zero = [
            ("header_timeout_ms", self.header_timeout_ms == 0),
            ("request_timeout_ms", self.request_timeout_ms == 0),
            ("connect_timeout_ms", self.connect_timeout_ms == 0),
            ("max_concurrent_requests", self.max_concurrent_requests == 0),
            ("max_connections", self.max_connections == 0),
        ];
        if let Some((key, _)) = zero.iter().find(|(_, z)| *z) {
            return Err(ConfigError::Value(format!("serve.{key} must be at least 1")));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON lines when stderr is not a terminal (a file, a pipe, a container's log), coloured compact
    /// lines when it is.
    #[default]
    Auto,
    /// Compact lines, coloured only on a terminal.
    Pretty,
    /// One JSON object per line, never coloured.
    Json,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct LogSettings {
    /// `auto` (JSON off a terminal, coloured lines on one), `json` or `pretty`.
    pub format: LogFormat,
    /// An `EnvFilter` directive; `RUST_LOG` wins when set.
    pub filter: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self { format: LogFormat::Auto, filter: "info,ort=warn,lapin=warn,sqlx=warn".into() }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct WorkerSettings {
    /// Stable name in Redis and logs; empty means `<kind>-<hostname>-<pid>`.
    pub id: String,
    /// Tasks in flight at once; also the AMQP prefetch.
    pub concurrency: usize,
    /// The share of model time that query embeddings may take while tasks run (0 < share <= 1):
    /// after a query's inference took `t`, the next query waits `t * (1 - share) / share`, so that
    /// a flood of queries slows a task by about this share at most. An idle worker answers queries
    /// at full speed.
    pub query_share: f64,
    /// Address of `/healthz`, `/readyz`, `/metrics`; port 0 picks a free one (published in Redis).
    pub health_addr: String,
    /// A file the worker writes the health address it bound into (empty: none), for a container
    /// health check when the port is picked at start (several workers on the host's network).
    pub health_addr_file: String,
    pub heartbeat_interval_ms: u64,
    /// Redis key lifetime; a worker that stops heart-beating disappears after this.
    pub heartbeat_ttl_ms: u64,
    /// Time for in-flight tasks to finish after SIGTERM before they are requeued.
    pub shutdown_timeout_ms: u64,
    /// Deliveries of one task before it is dead-lettered (1 = no retry).
    pub max_attempts: u32,
    /// Backoff before attempt n+1 is `retry_base_ms * 2^(n-1)`.
    pub retry_base_ms: u64,
    /// Time bound of a task before its media is probed; the bound then grows with the media's
    /// duration by `task_ms_per_media_second`, up to a minute below `amqp.consumer_timeout_ms`.
    pub task_timeout_ms: u64,
    /// Extra time a task gets per second of media (the index pipeline runs at about 0.1 s per
    /// second on 2 cores; 1 s leaves room for slower hosts and busy fleets).
    pub task_ms_per_media_second: u64,
    /// How often the worker publishes task messages that a producer stored in the outbox but did not
    /// publish (a crash or a broker failure after its commit), and how old they must be.
    pub outbox_relay_ms: u64,
    /// A testing hook; empty (none) in production. See [`Failpoint`].
    pub failpoint: Failpoint,
}

/// `worker.failpoint`: a testing hook that makes a worker fail in one way on purpose. Parsed when the
/// configuration loads, so a mistyped hook is a configuration error rather than a test that waits
/// for a failure that never comes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum Failpoint {
    /// `""`: no hook (production).
    #[default]
    None,
    /// `hang_before_ack`: park each task between its commit and its ack, so a test can kill the
    /// process there.
    HangBeforeAck,
    /// `panic`: panic inside every task.
    Panic,
    /// `hold_warmup:FILE`: stay in `warming` until FILE exists.
    HoldWarmup(PathBuf),
    /// `model_panic:MODEL`: that model's owner thread panics on its first task batch once warm.
    ModelPanic(String),
    /// `crash_on:TEXT`: abort the process when a task's media URI contains TEXT (a video that kills
    /// its worker, as an OOM kill or a decoder's segfault would).
    CrashOn(String),
}

impl TryFrom<String> for Failpoint {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let with = |arg: &str| -> Result<String, String> {
            if arg.is_empty() { Err(format!("failpoint {text:?} needs a value after the colon")) } else { Ok(arg.to_string()) }
        };
        Ok(match text.split_once(':') {
            None if text.is_empty() => Self::None,
            None if text == "hang_before_ack" => Self::HangBeforeAck,
            None if text == "panic" => Self::Panic,
            Some(("hold_warmup", file)) => Self::HoldWarmup(with(file)?.into()),
            Some(("model_panic", model)) => Self::ModelPanic(with(model)?),
            Some(("crash_on", needle)) => Self::CrashOn(with(needle)?),
            _ => {
                return Err(format!(
                    "unknown failpoint {text:?}: expected hang_before_ack, panic, hold_warmup:FILE, model_panic:MODEL or crash_on:TEXT"
                ));
            }
        })
    }
}

impl From<Failpoint> for String {
    fn from(failpoint: Failpoint) -> Self {
        match failpoint {
            Failpoint::None => String::new(),
            Failpoint::HangBeforeAck => "hang_before_ack".into(),
            Failpoint::Panic => "panic".into(),
            Failpoint::HoldWarmup(file) => format!("hold_warmup:{}", file.display()),
            Failpoint::ModelPanic(model) => format!("model_panic:{model}"),
            Failpoint::CrashOn(needle) => format!("crash_on:{needle}"),
        }
    }
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            id: String::new(),
            concurrency: 2,
            query_share: 0.2,
            health_addr: "0.0.0.0:8080".into(),
            health_addr_file: String::new(),
            heartbeat_interval_ms: 2_000,
            heartbeat_ttl_ms: 10_000,
            shutdown_timeout_ms: 30_000,
            max_attempts: 5,
            retry_base_ms: 2_000,
            task_timeout_ms: 5 * 60 * 1000,
            task_ms_per_media_second: 1000,
            outbox_relay_ms: 15_000,
            failpoint: Failpoint::None,
        }
    }
}

impl WorkerSettings {
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
    /// The time bound of a task on `duration_s` of media (unknown until probed), plus the time it
    /// may spend `fetching` remote media, below the broker's consumer timeout so that the broker never
    /// takes a task away from a worker that is still on it.
    pub fn task_timeout(&self, duration_s: Option<f64>, fetching: Duration, consumer_timeout_ms: u64) -> Duration {
        let per_media = duration_s.map_or(0, |d| (d.max(0.0) * self.task_ms_per_media_second as f64) as u64);
        let fetching = u64::try_from(fetching.as_millis()).unwrap_or(u64::MAX);
        let cap = consumer_timeout_ms.saturating_sub(60_000).max(self.task_timeout_ms);
        Duration::from_millis(self.task_timeout_ms.saturating_add(per_media).saturating_add(fetching).min(cap))
    }
}

/// ONNX Runtime sessions and dynamic batching.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct EngineSettings {
    /// Intra-op threads per session; 0 = the host's available cores.
    pub intra_threads: usize,
    /// Largest batch a model thread assembles from waiting requests.
    pub max_batch: usize,
    /// How long a model thread waits for more requests once it has one.
    pub max_wait_ms: u64,
    /// Bound of each model's request channel (backpressure on tasks).
    pub queue_capacity: usize,
    /// Let ONNX Runtime's intra-op threads spin while they wait for work, rather than sleep. Unset,
    /// each pipeline's measured default: the vision worker's spin (SigLIP runs back to back on its
    /// cores), the index worker's do not (its models take turns and run beside each other on the
    /// same cores, and a pool that spins after its run takes a core from the model that runs next).
    pub allow_spinning: Option<bool>,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self { intra_threads: 0, max_batch: 8, max_wait_ms: 5, queue_capacity: 256, allow_spinning: None }
    }
}

impl EngineSettings {
    /// Effective intra-op thread count.
    pub fn threads(&self) -> usize {
        if self.intra_threads > 0 { self.intra_threads } else { std::thread::available_parallelism().map_or(1, usize::from) }
    }
    /// Whether intra-op threads spin: `allow_spinning`, or ONNX Runtime's default (they spin) where
    /// neither the file nor the pipeline set it.
    pub fn spinning(&self) -> bool {
        self.allow_spinning.unwrap_or(true)
    }
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct ModelSettings {
    /// Folder holding the model files (the layout of the offline bundle and of
    /// `heimdex-models download`). Workers never download: a worker that starts has its models.
    pub dir: PathBuf,
}

impl Default for ModelSettings {
    fn default() -> Self {
        let dir = std::env::var_os("HEIMDEX_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/heimdex/models")).unwrap_or_else(|| PathBuf::from("/models"))
        });
        Self { dir }
    }
}

/// How a text or image encoder turns its output into one vector.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean over positions where `attention_mask == 1` (sentence-transformers).
    Mean,
    /// The first token (BGE, BERT CLS).
    Cls,
    /// A model output that is already one vector per input (e.g. `image_embeds`).
    Output,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct VisionSettings {
    /// Frames sampled per second of video.
    pub frame_rate: f32,
    /// Mean absolute difference (0–1) between consecutive sampled frames that starts a new scene.
    pub scene_threshold: f32,
    /// Name stored with every image embedding (keeps embedding spaces apart). The default folder is a
    /// stand-in (a test double whose vectors mean nothing, see its `README.txt`), so the default name
    /// is the stand-in's: rows from a real model later never mix with its rows. With a real export
    /// of SigLIP in `embed_dir`, name it (`google/siglip-base-patch16-224`).
    pub embed_model: String,
    /// Folder under `models.dir` with `vision_model.onnx`, `text_model.onnx`, `tokenizer.json`.
    /// `siglip-standin` (tiny, for tests) and `siglip-base-standin` (SigLIP base's architecture with
    /// random weights, for speed and memory) are STAND-INS; a folder named `*standin*` needs an
    /// `embed_model` that says so.
    pub embed_dir: String,
    pub embed_image_size: u32,
    pub embed_mean: [f32; 3],
    pub embed_std: [f32; 3],
    pub embed_dim: usize,
    /// Output of the vision model that holds the image embedding.
    pub embed_output: String,
    /// Run the image tower's encoder MatMuls in int8 (rewritten at load time: weights per column,
    /// activations per row; see `heimdex_models::quantize`). Only the MatMuls its
    /// `last_hidden_state` output depends on: the patch embedding (a Conv), the pooling head and any
    /// projection stay fp32. `false` runs the file as it is.
    pub embed_int8: bool,
    /// Fixed text length of the text tower (SigLIP pads to 64).
    pub text_max_len: usize,
    pub face_model: String,
    pub face_score_threshold: f32,
    pub face_nms_iou: f32,
    /// Largest source frame side accepted (pixels); larger videos are refused.
    pub max_side: u32,
}

impl Default for VisionSettings {
    fn default() -> Self {
        Self {
            frame_rate: 1.0,
            scene_threshold: 0.12,
            embed_model: "heimdex/siglip-standin".into(),
            embed_dir: "siglip-standin".into(),
            embed_image_size: 224,
            embed_mean: [0.5, 0.5, 0.5],
            embed_std: [0.5, 0.5, 0.5],
            embed_dim: 768,
            embed_output: "image_embeds".into(),
            embed_int8: true,
            text_max_len: 64,
            face_model: "yunet/face_detection_yunet_2023mar.onnx".into(),
            face_score_threshold: 0.6,
            face_nms_iou: 0.3,
            max_side: 4096,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct IndexSettings {
    /// Folder under `models.dir` in the Hugging Face Optimum Whisper layout.
    pub whisper_dir: String,
    /// Spoken language code (`en`), or empty to detect it per video.
    pub language: String,
    /// Longest chunk handed to Whisper, in seconds (its window is 30 s).
    pub max_chunk_s: f32,
    pub max_decode_tokens: usize,
    /// Silero VAD model file under `models.dir`.
    pub vad_model: String,
    pub vad_threshold: f32,
    /// A video without an audio track gets an empty transcript instead of failing.
    pub allow_no_audio: bool,
    /// Name stored with every text embedding.
    pub embed_model: String,
    /// Folder under `models.dir` with the text encoder and `tokenizer.json`.
    pub embed_dir: String,
    /// The encoder's file in `embed_dir`. `model_fp32.onnx` holds MiniLM's exact weights and is what
    /// `heimdex-models download` builds, so every worker writes the same vectors however it got its
    /// models; the bundle's int8 `model.onnx` agrees to a cosine of 0.999 and was not faster here
    /// (AVX2 without VNNI).
    pub embed_file: String,
    pub embed_dim: usize,
    pub embed_pooling: Pooling,
    pub embed_max_len: usize,
    /// Longest audio accepted, in seconds.
    pub max_duration_s: f64,
    /// Run Whisper's MatMuls in int8 (rewritten at load time; see `heimdex_models::quantize`): the
    /// decoder's with int8 weights in blocks, the encoder's with int8 weights and activations
    /// quantised per row. Faster and about 250 MB smaller than the files' weights in fp32, which
    /// `false` keeps.
    pub whisper_int8: bool,
    /// Run each of Whisper's encoder self-attentions as one fused operator (rewritten at load; see
    /// `heimdex_models::attention`): ONNX Runtime's flash attention, which never writes out the
    /// [heads, 1500, 1500] scores. The same function up to float rounding; `false` runs the graph's
    /// attention as written.
    pub whisper_fused_attention: bool,
    /// Store each segment's words with their times: the text is run through the decoder once more
    /// and aligned by the cross-attention of Whisper's alignment heads (see `worker::index::align`).
    pub word_timestamps: bool,
}

impl Default for IndexSettings {
    fn default() -> Self {
        Self {
            whisper_dir: "whisper-base".into(),
            language: String::new(),
            max_chunk_s: 30.0,
            max_decode_tokens: 224,
            vad_model: "silero-vad/silero_vad_16k_op15.onnx".into(),
            vad_threshold: 0.5,
            allow_no_audio: false,
            embed_model: "sentence-transformers/all-MiniLM-L6-v2".into(),
            embed_dir: "minilm-l6-v2".into(),
            embed_file: "model_fp32.onnx".into(),
            embed_dim: 384,
            embed_pooling: Pooling::Mean,
            embed_max_len: 256,
            max_duration_s: 4.0 * 3600.0,
            whisper_int8: true,
            whisper_fused_attention: true,
            word_timestamps: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hnsw_build_settings_are_held_to_pgvectors_bounds() {
        let mut s = Settings::default();
        assert_eq!((s.database.hnsw_m, s.database.hnsw_ef_construction), (16, 256));
        s.database.hnsw_m = 24;
        assert!(s.validate().is_ok());
        for (m, ef) in [(1, 128), (101, 1000), (24, 40), (16, 1001)] {
            s.database.hnsw_m = m;
            s.database.hnsw_ef_construction = ef;
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains("database.hnsw_m") && e.contains(&format!("not {m} and {ef}")), "{e}");
        }
    }

    #[test]
    fn a_stand_in_must_be_named_as_one() {
        let mut s = Settings::default();
        assert!(s.validate().is_ok(), "the default stand-in is named as one");
        s.vision.embed_dir = "siglip-base-standin".into();
        s.vision.embed_model = "google/siglip-base-patch16-224".into();
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("stand-in") && e.contains("heimdex/siglip-base-standin"), "{e}");
        s.vision.embed_model = "heimdex/siglip-base-standin".into();
        assert!(s.validate().is_ok());
        s.vision.embed_dir = "siglip-base".into();
        s.vision.embed_model = "google/siglip-base-patch16-224".into();
        assert!(s.validate().is_ok(), "a real export under its real name");
    }

    fn from_toml(text: &str) -> Result<Settings, config::ConfigError> {
        config::Config::builder().add_source(config::File::from_str(text, config::FileFormat::Toml)).build()?.try_deserialize()
    }

    #[test]
    fn failpoints_are_parsed_once_and_a_mistyped_one_is_refused() {
        let parse = |text: &str| from_toml(&format!("[worker]\nfailpoint = {text:?}\n")).map(|s| s.worker.failpoint);
        assert_eq!(Settings::default().worker.failpoint, Failpoint::None);
        assert_eq!(parse("").unwrap(), Failpoint::None);
        assert_eq!(parse("hang_before_ack").unwrap(), Failpoint::HangBeforeAck);
        assert_eq!(parse("model_panic:yunet").unwrap(), Failpoint::ModelPanic("yunet".into()));
        assert_eq!(parse("hold_warmup:/tmp/go").unwrap(), Failpoint::HoldWarmup("/tmp/go".into()));
        assert_eq!(parse("crash_on:a:b").unwrap(), Failpoint::CrashOn("a:b".into()), "the value may hold a colon");
        for typo in ["hang_before_acks", "panic:", "crash_on:", "model-panic:yunet", "Panic"] {
            let err = parse(typo).unwrap_err().to_string();
            assert!(err.contains(&format!("{typo:?}")), "{typo}: {err}");
        }
        let round_trip: String = Failpoint::CrashOn("killer".into()).into();
        assert_eq!(Failpoint::try_from(round_trip).unwrap(), Failpoint::CrashOn("killer".into()));
    }

    #[test]
    fn one_broker_url_or_a_list_and_the_queue_type() {
        let d = Settings::default();
        assert_eq!(d.amqp.urls.len(), 1, "one local broker by default");
        assert_eq!(d.amqp.queue_type, QueueType::Quorum, "quorum queues by default");
        let one = from_toml("[amqp]\nurl = \"amqp://a:5672/%2f\"\n").unwrap();
        assert_eq!(one.amqp.urls, [Secret::new("amqp://a:5672/%2f")], "`url` is a one-element list");
        let many = from_toml("[amqp]\nurls = [\"amqp://a/%2f\", \"amqp://b/%2f\"]\nqueue_type = \"classic\"\n").unwrap();
        assert_eq!(many.amqp.urls.len(), 2);
        assert_eq!(many.amqp.queue_type, QueueType::Classic);
        assert!(from_toml("[amqp]\nqueue_type = \"mirrored\"\n").is_err(), "only quorum or classic");
        let mut none = Settings::default();
        none.amqp.urls.clear();
        assert!(none.validate().unwrap_err().to_string().contains("amqp.urls"));
    }

    #[test]
    fn secrets_are_redacted() {
        let s = Secret::new("amqp://guest:hunter2@127.0.0.1:5672/%2f");
        let worker = WorkerSettings::default();
        let none = Duration::ZERO;
        assert_eq!(worker.task_timeout(None, none, 30 * 60_000), Duration::from_secs(300));
        assert_eq!(worker.task_timeout(Some(600.0), none, 30 * 60_000), Duration::from_secs(900), "10 min of media: 5 + 10 min");
        assert_eq!(worker.task_timeout(Some(3.0 * 3600.0), none, 30 * 60_000), Duration::from_secs(29 * 60), "capped below the broker");
        assert_eq!(
            worker.task_timeout(Some(60.0), Duration::from_secs(120), 30 * 60_000),
            Duration::from_secs(480),
            "a download's time is added"
        );
        assert_eq!(s.to_string(), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("not a url"), "***");
    }

    #[test]
    fn s3_settings_are_checked_and_their_credentials_redacted() {
        let mut s = Settings::default();
        assert!(!s.s3.enabled() && s.validate().is_ok(), "off by default");
        s.s3.endpoint = "http://127.0.0.1:9000".into();
        s.s3.access_key_id = Secret::new("AKIAEXAMPLEKEYID");
        s.s3.secret_access_key = Secret::new("wJalrXUtnFEMI/K7MDENG");
        assert!(s.validate().is_ok());
        let shown = format!("{s:?}");
        assert!(!shown.contains("AKIAEXAMPLEKEYID") && !shown.contains("wJalrXUtnFEMI"), "{shown}");
        let refused = |s: &Settings, needle: &str| {
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains(needle) && !e.contains("wJalrXUtnFEMI"), "{e}");
        };
        s.s3.path_style = false;
        refused(&s, "s3.path_style");
        s.s3.path_style = true;
        s.s3.endpoint = "http://key:wJalrXUtnFEMI@minio:9000".into();
        refused(&s, "must not carry credentials");
        s.s3.endpoint = "ftp://minio".into();
        refused(&s, "http(s) URL");
        s.s3.endpoint = "https://minio.internal".into();
        s.s3.secret_access_key = Secret::new("");
        refused(&s, "go together");
        s.s3.access_key_id = Secret::new("");
        assert!(s.validate().is_ok(), "anonymous: a public bucket");
        s.s3.region = "eu west".into();
        refused(&s, "s3.region");
    }

    #[test]
    fn api_keys_are_secrets_and_must_be_long() {
        let mut s = Settings::default();
        s.serve.api_keys = vec![Secret::new("k3y-0123456789abcdef")];
        assert!(s.validate().is_ok());
        let shown = format!("{s:?} {}", s.serve.api_keys[0]);
        assert!(!shown.contains("k3y-0123456789abcdef"), "{shown}");
        s.serve.api_keys.push(Secret::new("short-key"));
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("serve.api_keys") && !e.contains("short-key"), "{e}");
        s.serve.api_keys = vec![Secret::new("k3y 0123456789abcdef")];
        assert!(s.validate().is_err(), "whitespace inside a key");
    }
}
