//! The fleet at a glance, as `heimdex status` prints it and `heimdex serve` shows it: live workers
//! from Redis (state, warm-up per model, jobs in flight), queue and dead-letter depths from the
//! broker, job counts, the latest jobs with their stage timings, and the latest jobs that ended badly
//! with their reasons. Nothing here consumes a message: depths come from passive declares and the
//! reasons from the jobs table, so looking never disturbs the fleet.

use heimdex_shared::Settings;
use heimdex_shared::contract::TaskKind;
use heimdex_shared::fleet::{Fleet, WorkerStatus};
use heimdex_shared::jobs::{self, JobRow, JobStatus};
use heimdex_shared::topology::{self, Topology};
use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde::Serialize;
use sqlx::PgPool;

/// How many recent jobs (and recent failures) a snapshot lists.
pub const RECENT: i64 = 20;

/// One queue's depth; `None` when the broker does not know the queue.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct QueueDepth {
    pub name: String,
    pub kind: TaskKind,
    pub dead_letters: bool,
    pub messages: Option<u32>,
    pub consumers: Option<u32>,
}

/// Jobs of one kind in one state.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct JobCount {
    pub kind: String,
    pub status: JobStatus,
    pub count: i64,
}

/// Everything the status views show, read at one moment.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Snapshot {
    /// Live workers; empty with `workers_error` set when Redis (optional) cannot be read.
    pub workers: Vec<WorkerStatus>,
    pub workers_error: Option<String>,
    pub queues: Vec<QueueDepth>,
    pub jobs: Vec<JobCount>,
    /// The latest jobs, newest first.
    pub recent: Vec<JobRow>,
    /// The latest jobs that ended `dead` or `failed`, newest first: what the dead-letter queues hold.
    pub failures: Vec<JobRow>,
}

/// Reads a snapshot. `channel` declares the topology (idempotent) and reads the depths.
///
/// # Errors
/// Database or broker errors (Redis errors are reported inside the snapshot: live state is optional).
pub async fn snapshot(settings: &Settings, pool: &PgPool, channel: &Channel) -> anyhow::Result<Snapshot> {
    let (workers, workers_error) = match Fleet::connect(&settings.redis, &settings.amqp.prefix).await {
        Ok(fleet) => match fleet.workers().await {
            Ok(w) => (w, None),
            Err(e) => (Vec::new(), Some(e)),
        },
        Err(e) => (Vec::new(), Some(e)),
    };
    let workers_error = workers_error.map(|e| format!("live worker state is unavailable (redis at {}: {e})", settings.redis.url));
    let topo = Topology::new(&settings.amqp);
    // Declaring is idempotent, and a passive declare of a queue a fresh broker lacks would close the channel.
    topo.declare(channel, &settings.worker).await?;
    let mut queues = Vec::new();
    for kind in TaskKind::ALL {
        for (name, dead_letters) in [(topo.queue(kind), false), (topo.dlq(kind), true)] {
            let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
            let depth =
                topology::answered("queue.declare", channel.queue_declare(name.as_str().into(), passive, FieldTable::default())).await.ok();
            queues.push(QueueDepth {
                name,
                kind,
                dead_letters,
                messages: depth.as_ref().map(lapin::Queue::message_count),
                consumers: depth.as_ref().map(lapin::Queue::consumer_count),
            });
        }
    }
    let jobs = jobs::counts(pool).await?.into_iter().map(|(kind, status, count)| JobCount { kind, status, count }).collect();
    let recent = jobs::recent_jobs(pool, RECENT).await?;
    let failures = jobs::recent_failures(pool, RECENT).await?;
    Ok(Snapshot { workers, workers_error, queues, jobs, recent, failures })
}
