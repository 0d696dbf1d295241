//! Publishes the worker's status to Redis every interval and on every state change, with a TTL, so
//! that a dead worker vanishes from `heimdex status` by itself.

use std::sync::Arc;

use heimdex_shared::fleet::Fleet;
use tokio_util::sync::CancellationToken;

use super::lifecycle::Lifecycle;

/// Runs until `stop`, then deletes the worker's key.
pub async fn run(fleet: Fleet, lifecycle: Arc<Lifecycle>, interval: std::time::Duration, ttl_ms: u64, stop: CancellationToken) {
    let mut changes = lifecycle.subscribe();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if let Err(e) = fleet.publish(&lifecycle.status(), ttl_ms).await {
            tracing::warn!(error = %e, "heartbeat to redis failed");
        }
        tokio::select! {
            _ = tick.tick() => {}
            r = changes.changed() => if r.is_err() { break },
            () = stop.cancelled() => break,
        }
    }
    if let Err(e) = fleet.remove(&lifecycle.id).await {
        tracing::warn!(error = %e, "could not remove worker from redis");
    }
}
