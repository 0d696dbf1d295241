//! The worker runtime shared by every worker binary.
//!
//! [`run`] takes a worker from cold to warm and serves until shutdown:
//! cold (health server, Redis heartbeat, database, broker, topology) → loading (the pipeline's models,
//! verified) → warming (every model at every production batch shape) → warm (`basic_consume`) →
//! draining (SIGTERM). Only a warm worker consumes, so no task ever pays for a model load.

pub mod consume;
pub mod health;
pub mod heartbeat;
pub mod lifecycle;
pub mod publisher;
pub mod task;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use heimdex_shared::Settings;
use heimdex_shared::contract::TaskKind;
use heimdex_shared::fleet::{Fleet, ModelStatus, WorkerState};
use heimdex_shared::topology::{self, Topology};
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::engine::registry::ModelRegistry;
use crate::metrics::Metrics;
use crate::pipeline::{LoadContext, Pipeline};

pub use lifecycle::Lifecycle;
pub use publisher::Publisher;
pub use task::{Outcome, Worker};

/// Runs a worker until `shutdown` resolves.
///
/// `load` builds the pipeline (its models are loaded and verified there, on a blocking thread).
///
/// # Errors
/// Start-up failures (a missing or corrupt model, an unreachable broker, a bad health address) and a
/// lost broker connection; the message says what to fix.
pub async fn run<P, L>(
    settings: Settings,
    kind: TaskKind,
    load: L,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    P: Pipeline,
    L: FnOnce(&LoadContext<'_>) -> anyhow::Result<P> + Send + 'static,
{
    let settings = Arc::new(settings);
    let stop = CancellationToken::new();
    let stop_on_signal = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        stop_on_signal.cancel();
    });
    let metrics = Arc::new(Metrics::new());

    // Cold: the things a worker needs before it may load anything.
    let id = if settings.worker.id.is_empty() {
        format!("{kind}-{}-{}", lifecycle::hostname(), std::process::id())
    } else {
        settings.worker.id.clone()
    };
    let lifecycle = Arc::new(Lifecycle::new(id.clone(), kind.to_string(), settings.worker.concurrency));
    lifecycle.set_state(WorkerState::Cold, &metrics);
    let background = CancellationToken::new();
    let addr = health::serve(&settings.worker.health_addr, lifecycle.clone(), metrics.clone(), background.clone())
        .await
        .with_context(|| format!("binding the health server on {}", settings.worker.health_addr))?;
    lifecycle.set_health_addr(addr.to_string());
    tracing::info!(worker = %id, health = %addr, settings = ?settings, "worker starting");

    let fleet = Fleet::connect(&settings.redis, &settings.amqp.prefix)
        .await
        .with_context(|| format!("connecting to redis at {}", settings.redis.url))?;
    let heartbeat = tokio::spawn(heartbeat::run(
        fleet,
        lifecycle.clone(),
        settings.worker.heartbeat_interval(),
        settings.worker.heartbeat_ttl_ms,
        background.clone(),
    ));

    let pool = heimdex_shared::db::pool(&settings.database).context("database url")?;
    if settings.database.migrate_on_start {
        heimdex_shared::db::migrate(&pool)
            .await
            .with_context(|| format!("migrating the database at {}", settings.database.url))?;
    }
    let (connection, consume_channel) = topology::connect(&settings.amqp, &id)
        .await
        .with_context(|| format!("connecting to rabbitmq at {}", settings.amqp.url))?;
    let connection = Arc::new(connection);
    let publisher = Publisher::open(connection.clone()).await?;
    let topology = Topology::new(&settings.amqp);
    topology.declare(&consume_channel, &settings.worker).await.context("declaring the queue topology")?;

    // Loading: every model of this pipeline, once, verified.
    lifecycle.set_state(WorkerState::Loading, &metrics);
    let load_started = Instant::now();
    let (pipeline, engine) = {
        let settings = settings.clone();
        let metrics = metrics.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<(P, Engine)> {
            let engine = Engine::new(settings.engine.clone(), metrics)?;
            let models = ModelRegistry::open(&settings.models)?;
            let pipeline = load(&LoadContext { settings: &settings, engine: &engine, models: &models })?;
            Ok((pipeline, engine))
        })
        .await
        .context("the model loader panicked")??
    };
    anyhow::ensure!(pipeline.kind() == kind, "a {} pipeline cannot serve {kind} tasks", pipeline.kind());
    let pipeline = Arc::new(pipeline);
    pipeline.prepare_db(&pool).await.context("creating the vector indexes")?;
    tracing::info!(elapsed = ?load_started.elapsed(), "models loaded");

    // Warming: production batch shapes, timed, before the first task.
    lifecycle.set_state(WorkerState::Warming, &metrics);
    let warm_started = Instant::now();
    let reports = pipeline.warm_up().await.map_err(|e| anyhow::anyhow!("warm-up failed: {e}"))?;
    if let Some(release) = settings.worker.failpoint.strip_prefix("hold_warmup:") {
        // Testing hook: stay in `warming` until the file exists, so a test can observe a fleet that is
        // partly warm and a queue that a warming worker does not touch.
        tracing::warn!(release, "failpoint hold_warmup: waiting for the release file");
        while !std::path::Path::new(release).exists() && !stop.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let warm = warm_started.elapsed();
    let models = pipeline
        .models()
        .into_iter()
        .map(|m| {
            let ms = reports.iter().filter(|r| r.model == m.name).map(|r| r.duration.as_secs_f64() * 1000.0).sum::<f64>();
            ModelStatus { name: m.name, path: m.path, warmup_ms: Some(ms) }
        })
        .collect();
    for r in &reports {
        metrics.set_warmup(&r.model, r.duration);
    }
    lifecycle.set_models(models, Some(warm.as_secs_f64() * 1000.0));
    tracing::info!(warmup = ?warm, "warm");
    if let Some(model) = settings.worker.failpoint.strip_prefix("model_panic:") {
        tracing::warn!(model, "failpoint model_panic: the next task batch of this model panics");
        engine.arm_model_panic(model);
    }

    let worker = Arc::new(Worker {
        pipeline,
        pool,
        publisher,
        topology,
        settings: settings.clone(),
        lifecycle: lifecycle.clone(),
        metrics,
        alarms: task::Alarms::default(),
    });
    tokio::spawn(relay_outbox(worker.clone(), background.clone()));
    let result = if stop.is_cancelled() {
        Ok(consume::Stop::Shutdown { abandoned: 0 })
    } else {
        consume::run(worker, consume_channel, stop).await
    };
    // Closing the connection returns every unacked delivery to its queue.
    let _ = connection.close(200, "worker stopping".into()).await;
    background.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), heartbeat).await;
    match result.context("consuming")? {
        consume::Stop::ModelFailed { reason } => {
            anyhow::bail!("{reason}: the worker stopped taking tasks and exits so that a restart reloads its models")
        }
        stop => tracing::info!(?stop, "worker stopped"),
    }
    Ok(())
}

/// Publishes task messages that their producer stored but could not publish (see
/// `heimdex_shared::outbox`), every `worker.outbox_relay_ms`, for every task kind.
async fn relay_outbox<P: Pipeline>(worker: Arc<Worker<P>>, stop: CancellationToken) {
    let every = Duration::from_millis(worker.settings.worker.outbox_relay_ms.max(100));
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        let relayed = match worker.publisher.channel().await {
            Ok(channel) => heimdex_shared::outbox::relay(&worker.pool, &channel, &worker.topology, every).await,
            Err(e) => Err(heimdex_shared::topology::PublishError::Broker(e).into()),
        };
        match relayed {
            Ok(0) => {}
            Ok(n) => tracing::info!(messages = n, "relayed task messages from the outbox"),
            Err(e) => tracing::warn!(error = %e, "outbox relay failed; trying again later"),
        }
    }
}
