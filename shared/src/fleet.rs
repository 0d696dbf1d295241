//! Live fleet state in Redis: each worker keeps `{prefix}:worker:{id}` (JSON [`WorkerStatus`]) alive
//! with a TTL heartbeat, so a worker that dies disappears on its own and `heimdex status` lists only
//! the living.

use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use crate::config::RedisSettings;

/// Lifecycle of a worker process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Cold,
    Loading,
    Warming,
    /// Consuming.
    Warm,
    /// A dependency is down; not consuming until it is back.
    Paused,
    /// Shutting down: not consuming, finishing in-flight tasks.
    Draining,
    /// A model failed; not consuming, exiting so that a restart loads it afresh.
    Failed,
    /// The broker connection was lost; models stay warm while the worker reconnects.
    Disconnected,
}

impl WorkerState {
    pub const ALL: [WorkerState; 8] = [
        WorkerState::Cold,
        WorkerState::Loading,
        WorkerState::Warming,
        WorkerState::Warm,
        WorkerState::Paused,
        WorkerState::Draining,
        WorkerState::Failed,
        WorkerState::Disconnected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Cold => "cold",
            WorkerState::Loading => "loading",
            WorkerState::Warming => "warming",
            WorkerState::Warm => "warm",
            WorkerState::Paused => "paused",
            WorkerState::Draining => "draining",
            WorkerState::Failed => "failed",
            WorkerState::Disconnected => "disconnected",
        }
    }
}

/// A model as shown in fleet status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ModelStatus {
    pub name: String,
    pub path: String,
    /// Warm-up time, once warmed.
    pub warmup_ms: Option<f64>,
}

/// What one worker publishes about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WorkerStatus {
    pub id: String,
    pub kind: String,
    pub state: WorkerState,
    pub host: String,
    pub pid: u32,
    /// Where `/healthz`, `/readyz` and `/metrics` answer.
    pub health_addr: String,
    pub concurrency: usize,
    pub models: Vec<ModelStatus>,
    pub warmup_ms: Option<f64>,
    /// Job ids being processed now.
    pub in_flight: Vec<String>,
    pub tasks_done: u64,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Reads and writes fleet state under one prefix.
#[derive(Clone)]
pub struct Fleet {
    redis: ConnectionManager,
    prefix: String,
}

/// How long a first connection to Redis may take; fleet state is optional, so nobody waits longer.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl Fleet {
    /// Connects (at most [`CONNECT_TIMEOUT`]); the connection then reconnects by itself.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn connect(settings: &RedisSettings, prefix: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(settings.url.expose())?;
        let redis = tokio::time::timeout(CONNECT_TIMEOUT, ConnectionManager::new(client))
            .await
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "connecting to redis timed out")))??;
        Ok(Self { redis, prefix: prefix.to_string() })
    }

    fn key(&self, id: &str) -> String {
        format!("{}:worker:{id}", self.prefix)
    }

    /// Writes a worker's status with a time to live.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn publish(&self, status: &WorkerStatus, ttl_ms: u64) -> Result<(), redis::RedisError> {
        let json =
            serde_json::to_string(status).map_err(|e| redis::RedisError::from((redis::ErrorKind::Client, "serialise", e.to_string())))?;
        let mut conn = self.redis.clone();
        let _: () = redis::cmd("SET").arg(self.key(&status.id)).arg(json).arg("PX").arg(ttl_ms).query_async(&mut conn).await?;
        Ok(())
    }

    /// Removes a worker (clean shutdown).
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn remove(&self, id: &str) -> Result<(), redis::RedisError> {
        let mut conn = self.redis.clone();
        conn.del(self.key(id)).await
    }

    /// Every live worker, sorted by kind then id.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn workers(&self) -> Result<Vec<WorkerStatus>, redis::RedisError> {
        let mut conn = self.redis.clone();
        let pattern = format!("{}:worker:*", self.prefix);
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) =
                redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(500).query_async(&mut conn).await?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        let mut workers: Vec<WorkerStatus> = values.into_iter().flatten().filter_map(|v| serde_json::from_str(&v).ok()).collect();
        workers.sort_by(|a, b| (&a.kind, &a.id).cmp(&(&b.kind, &b.id)));
        Ok(workers)
    }
}
