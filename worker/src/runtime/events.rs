//! The worker's job-event relay (see `heimdex_shared::events`): it listens on the `heimdex_jobs`
//! notification channel, which PostgreSQL tells at every commit that ends a job, and publishes the
//! waiting events at once; a sweep every `worker.outbox_relay_ms` publishes what a missed
//! notification (a reconnect) or a failed publish (the broker down) left behind.

use std::sync::Arc;
use std::time::Duration;

use heimdex_shared::events::{self, NOTIFY_CHANNEL};
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use super::Worker;
use crate::pipeline::Pipeline;

/// Runs until `stop`: publishes job events as their jobs end.
pub async fn relay<P: Pipeline>(worker: Arc<Worker<P>>, stop: CancellationToken) {
    let sweep = Duration::from_millis(worker.settings.worker.outbox_relay_ms.max(100));
    let mut listener = None;
    loop {
        if listener.is_none() {
            listener = listen(&worker.pool).await;
        }
        // A round first: events may have waited while this worker was starting or disconnected.
        let relayed = match worker.broker.publish_channel().await {
            Ok(channel) => events::relay(&worker.pool, &channel, worker.topology()).await,
            Err(e) => Err(heimdex_shared::topology::PublishError::Broker(e).into()),
        };
        match relayed {
            Ok(0) => {}
            Ok(n) => tracing::debug!(events = n, "published job events"),
            Err(e) => tracing::warn!(error = %e, "publishing job events failed; trying again later"),
        }
        let notified = async {
            match listener.as_mut() {
                Some(l) => l.recv().await.map(drop),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            received = notified => {
                if let Err(e) = received {
                    // The listener reconnects on its next use; meanwhile the sweep covers.
                    tracing::warn!(error = %e, "lost the job notifications; sweeping until they are back");
                    listener = None;
                    tokio::select! {
                        () = tokio::time::sleep(sweep.min(Duration::from_secs(1))) => {}
                        () = stop.cancelled() => return,
                    }
                }
            }
            () = tokio::time::sleep(sweep) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// A listener on [`NOTIFY_CHANNEL`], or `None` while the database does not answer.
async fn listen(pool: &sqlx::PgPool) -> Option<PgListener> {
    let mut listener = match PgListener::connect_with(pool).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for job notifications yet; sweeping meanwhile");
            return None;
        }
    };
    match listener.listen(NOTIFY_CHANNEL).await {
        Ok(()) => Some(listener),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for job notifications yet; sweeping meanwhile");
            None
        }
    }
}
