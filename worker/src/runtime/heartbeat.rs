//! Publishes the worker's status to Redis every interval and on every state change, with a TTL, so
//! that a dead worker vanishes from `heimdex status` by itself.
//!
//! Redis holds live fleet state only, so it is optional: a worker starts, works and drains without
//! it, and publishes its state again as soon as Redis answers.

use std::sync::Arc;

use heimdex_shared::config::RedisSettings;
use heimdex_shared::fleet::Fleet;
use tokio_util::sync::CancellationToken;

use super::lifecycle::Lifecycle;

/// Runs until `stop`, then deletes the worker's key.
pub async fn run(
    redis: RedisSettings,
    prefix: String,
    lifecycle: Arc<Lifecycle>,
    interval: std::time::Duration,
    ttl_ms: u64,
    stop: CancellationToken,
) {
    let mut changes = lifecycle.subscribe();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut fleet: Option<Fleet> = None;
    let mut healthy = true;
    loop {
        if fleet.is_none() {
            fleet = Fleet::connect(&redis, &prefix).await.inspect_err(|e| report(&mut healthy, e)).ok();
        }
        if let Some(f) = &fleet {
            match f.publish(&lifecycle.status(), ttl_ms).await {
                Ok(()) if !healthy => {
                    tracing::info!("redis is back: fleet state published again");
                    healthy = true;
                }
                Ok(()) => {}
                Err(e) => report(&mut healthy, &e),
            }
        }
        tokio::select! {
            _ = tick.tick() => {}
            r = changes.changed() => if r.is_err() { break },
            () = stop.cancelled() => break,
        }
    }
    if let Some(f) = fleet
        && let Err(e) = f.remove(&lifecycle.id).await
    {
        tracing::warn!(error = %e, "could not remove worker from redis");
    }
}

/// Warns once per outage, not once per heartbeat.
fn report(healthy: &mut bool, error: &redis::RedisError) {
    if std::mem::replace(healthy, false) {
        tracing::warn!(error = %error, "redis unavailable: the worker keeps working; fleet state is published when it is back");
    }
}
