//! The worker runtime shared by every worker binary.
//!
//! [`run`] takes a worker from cold to warm and serves until shutdown:
//! cold (health server, Redis heartbeat, database, broker, topology) → loading (the pipeline's models,
//! verified) → warming (every model at every production batch shape) → warm (`basic_consume`) →
//! draining (SIGTERM). Only a warm worker consumes, so no task ever pays for a model load. A lost
//! broker connection makes it `disconnected` (models kept warm) until it has reconnected; SIGTERM stops
//! it in any state. While warm it also answers query embeddings ([`query`]) beside its tasks, and
//! relays task messages and job events from their outboxes ([`events`]).

pub mod broker;
pub mod consume;
pub mod events;
pub mod health;
pub mod heartbeat;
pub mod lifecycle;
pub mod query;
pub mod share;
pub mod task;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use heimdex_shared::Settings;
use heimdex_shared::config::Failpoint;
use heimdex_shared::contract::TaskKind;
use heimdex_shared::fleet::{ModelStatus, WorkerState};
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::pipeline::{LoadContext, Pipeline};
use heimdex_models::registry::ModelRegistry;

pub use broker::Broker;
pub use lifecycle::Lifecycle;
pub use task::{Outcome, Worker};

/// Runs a worker until `shutdown` resolves.
///
/// `load` builds the pipeline (its models are loaded and verified there, on a blocking thread).
///
/// # Errors
/// Start-up failures (a missing or corrupt model, an unreachable broker, a bad health address) and a
/// failed model; the message says what to fix.
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
    if !settings.worker.health_addr_file.is_empty() {
        std::fs::write(&settings.worker.health_addr_file, addr.to_string())
            .with_context(|| format!("writing the health address to {}", settings.worker.health_addr_file))?;
    }
    tracing::info!(worker = %id, health = %addr, settings = ?settings, "worker starting");

    let heartbeat = tokio::spawn(heartbeat::run(
        settings.redis.clone(),
        settings.amqp.prefix.clone(),
        lifecycle.clone(),
        settings.worker.heartbeat_interval(),
        settings.worker.heartbeat_ttl_ms,
        background.clone(),
    ));

    let pool = heimdex_shared::db::pool(&settings.database).context("database url")?;
    // Workers never change the schema (they may run as a role that cannot): `heimdex migrate` does.
    let missing = heimdex_shared::db::missing_migrations(&pool)
        .await
        .with_context(|| format!("checking the schema of the database at {}", settings.database.url))?;
    anyhow::ensure!(
        missing.is_empty(),
        "the database at {} lacks migrations {missing:?} that this worker needs: run `heimdex migrate` (as the schema's owner) first",
        settings.database.url
    );
    let broker = Broker::connect(&settings.amqp, &settings.worker, &id).await.with_context(|| {
        format!("connecting to rabbitmq at {}", settings.amqp.urls.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))
    })?;

    // Loading and warming; a shutdown signal stops the worker here too (no model is needed to stop).
    let ready = tokio::select! {
        ready = load_and_warm(&settings, &lifecycle, &metrics, kind, load) => Some(ready?),
        () = stop.cancelled() => None,
    };
    let result = match ready {
        None => {
            tracing::info!(state = lifecycle.state().as_str(), "stopping before the worker was warm");
            Ok(consume::Stop::Shutdown { abandoned: 0 })
        }
        Some(pipeline) => {
            let worker = Arc::new(Worker {
                pipeline,
                pool,
                broker,
                settings: settings.clone(),
                lifecycle: lifecycle.clone(),
                metrics,
                alarms: task::Alarms::default(),
                isolation: Arc::default(),
            });
            tokio::spawn(relay_outbox(worker.clone(), background.clone()));
            tokio::spawn(events::relay(worker.clone(), background.clone()));
            let queries = tokio::spawn(query::serve(worker.clone(), stop.clone()));
            let result = consume::run(worker.clone(), stop).await;
            // Queries stop with the warm state; those taken are answered before the connection closes.
            let _ = tokio::time::timeout(Duration::from_secs(10), queries).await;
            // Closing the connection returns every unacked delivery to its queue.
            worker.broker.close().await;
            result
        }
    };
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

/// Loading (every model of the pipeline, once, verified) and warming (production batch shapes,
/// timed, before the first task).
async fn load_and_warm<P, L>(
    settings: &Arc<Settings>,
    lifecycle: &Lifecycle,
    metrics: &Arc<Metrics>,
    kind: TaskKind,
    load: L,
) -> anyhow::Result<Arc<P>>
where
    P: Pipeline,
    L: FnOnce(&LoadContext<'_>) -> anyhow::Result<P> + Send + 'static,
{
    lifecycle.set_state(WorkerState::Loading, metrics);
    let load_started = Instant::now();
    let (pipeline, engine) = {
        let settings = settings.clone();
        let metrics = metrics.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<(P, Engine)> {
            let engine = Engine::new(settings.engine.clone(), metrics)?;
            let models = ModelRegistry::open(&settings.models.dir)?;
            let pipeline = load(&LoadContext { settings: &settings, engine: &engine, models: &models })?;
            Ok((pipeline, engine))
        })
        .await
        .context("the model loader panicked")??
    };
    anyhow::ensure!(pipeline.kind() == kind, "a {} pipeline cannot serve {kind} tasks", pipeline.kind());
    let pipeline = Arc::new(pipeline);
    tracing::info!(elapsed = ?load_started.elapsed(), "models loaded");

    lifecycle.set_state(WorkerState::Warming, metrics);
    let warm_started = Instant::now();
    let reports = pipeline.warm_up().await.map_err(|e| anyhow::anyhow!("warm-up failed: {e}"))?;
    if let Failpoint::HoldWarmup(release) = &settings.worker.failpoint {
        // Testing hook: stay in `warming` until the file exists, so a test can observe a fleet that is
        // partly warm, a queue that a warming worker does not touch, and a stop during warm-up.
        tracing::warn!(release = %release.display(), "failpoint hold_warmup: waiting for the release file");
        while !release.exists() {
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
    if let Failpoint::ModelPanic(model) = &settings.worker.failpoint {
        tracing::warn!(model, "failpoint model_panic: the next task batch of this model panics");
        engine.arm_model_panic(model);
    }
    Ok(pipeline)
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
        let relayed = match worker.broker.publish_channel().await {
            Ok(channel) => heimdex_shared::outbox::relay(&worker.pool, &channel, worker.topology(), every).await,
            Err(e) => Err(heimdex_shared::topology::PublishError::Broker(e).into()),
        };
        match relayed {
            Ok(0) => {}
            Ok(n) => tracing::info!(messages = n, "relayed task messages from the outbox"),
            Err(e) => tracing::warn!(error = %e, "outbox relay failed; trying again later"),
        }
    }
}
