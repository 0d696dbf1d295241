//! The worker's link to RabbitMQ, kept across broker outages: a lost connection is re-established in
//! process with backoff (models stay loaded and warm), the topology is declared again, and the
//! consume loop asks for a fresh channel. Every method waits for the broker's answer at most
//! `topology::REPLY_TIMEOUT` (the declarations `DECLARE_TIMEOUT`), so that nothing holding the
//! connection's lock waits for ever. Retries, dead letters and the outbox relay publish through
//! one confirming channel, reopened whenever the last one was closed (a channel-level error closes an
//! AMQP channel for good) or its connection was replaced.

use std::sync::Arc;
use std::time::Duration;

use heimdex_shared::config::{AmqpSettings, WorkerSettings};
use heimdex_shared::topology::{self, PublishError, Topology, answered};
use lapin::options::ConfirmSelectOptions;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// Longest pause between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub struct Broker {
    amqp: AmqpSettings,
    worker: WorkerSettings,
    /// The connection's name in the management UI (the worker id).
    name: String,
    topology: Topology,
    connection: Mutex<Option<Arc<Connection>>>,
    publishing: Mutex<Option<Channel>>,
}

impl Broker {
    /// Connects once and declares the topology; a queue that exists with the other type than
    /// `amqp.queue_type` is named in the error (the broker itself only says PRECONDITION_FAILED).
    ///
    /// # Errors
    /// The broker is unreachable or refuses the credentials or a declaration.
    pub async fn connect(amqp: &AmqpSettings, worker: &WorkerSettings, name: &str) -> anyhow::Result<Self> {
        let broker = Self {
            amqp: amqp.clone(),
            worker: worker.clone(),
            name: name.to_string(),
            topology: Topology::new(amqp),
            connection: Mutex::new(None),
            publishing: Mutex::new(None),
        };
        let Err(e) = broker.connection().await else { return Ok(broker) };
        if is_precondition_failed(&e) {
            let (connection, _channel) = topology::connect(amqp, name).await?;
            let found = broker.topology.queue_of_other_type(&connection, worker).await;
            let _ = answered("connection.close", connection.close(200, "checked".into())).await;
            if let Some((queue, found)) = found? {
                anyhow::bail!(
                    "queue {queue} exists as a {found} queue but amqp.queue_type is {configured}: a queue's type cannot change in place. \
                     Either set amqp.queue_type = \"{found}\" (HEIMDEX__AMQP__QUEUE_TYPE), or drain and delete the queues of prefix \
                     {prefix:?} to have them declared again as {configured} queues (deploy/README.md, \"Moving an existing classic \
                     deployment over\")",
                    prefix = amqp.prefix,
                    configured = amqp.queue_type
                );
            }
        }
        Err(e.into())
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The live connection, or a new one (with the topology declared again) if the last one died.
    async fn connection(&self) -> Result<Arc<Connection>, lapin::Error> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(connection.clone());
        }
        let (connection, channel) = topology::connect(&self.amqp, &self.name).await?;
        self.topology.declare(&channel, &self.worker).await?;
        let _ = answered("channel.close", channel.close(200, "declared".into())).await;
        let connection = Arc::new(connection);
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// A new channel to consume on, with the topology declared on it; reconnects with backoff until
    /// it has one, or `None` on shutdown. Declaring each time brings back a queue that was deleted
    /// under a live connection (the consumer was cancelled and consuming again would fail at once,
    /// over and over).
    pub async fn consume_channel(&self, stop: &CancellationToken) -> Option<Channel> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.connection().await {
                Ok(connection) => match answered("channel.open", connection.create_channel()).await {
                    Ok(channel) => match self.topology.declare(&channel, &self.worker).await {
                        Ok(()) => return Some(channel),
                        Err(e) => tracing::warn!(error = %e, ?delay, "cannot declare the queues; retrying"),
                    },
                    Err(e) => tracing::warn!(error = %e, ?delay, "cannot open a channel; retrying"),
                },
                Err(e) => tracing::warn!(error = %e, ?delay, "broker unreachable; reconnecting"),
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop.cancelled() => return None,
            }
            delay = (delay * 2).min(MAX_BACKOFF);
        }
    }

    /// A live confirming channel for publishing.
    ///
    /// # Errors
    /// The broker is unreachable.
    pub async fn publish_channel(&self) -> Result<Channel, lapin::Error> {
        let mut slot = self.publishing.lock().await;
        if let Some(channel) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        let connection = self.connection().await?;
        let channel = answered("channel.open", connection.create_channel()).await?;
        answered("confirm.select", channel.confirm_select(ConfirmSelectOptions::default())).await?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    /// Publishes `body` straight to `queue` (default exchange) and waits for the confirm.
    ///
    /// # Errors
    /// The broker did not take the message (in time).
    pub async fn publish(&self, queue: &str, body: &[u8], properties: BasicProperties) -> Result<(), PublishError> {
        let channel = self.publish_channel().await?;
        topology::publish_confirmed(&channel, "", queue, body, properties).await
    }

    /// Closes the connection; every unacked delivery goes back to its queue.
    pub async fn close(&self) {
        if let Some(connection) = self.connection.lock().await.take() {
            let _ = answered("connection.close", connection.close(200, "worker stopping".into())).await;
        }
    }
}

/// The broker refused a declaration because a queue exists with other arguments.
fn is_precondition_failed(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 406)
}
