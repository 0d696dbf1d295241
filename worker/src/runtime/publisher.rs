//! The worker's publishing channel (retries, dead letters, the outbox relay), with confirms.
//!
//! A channel-level error (a refused publish, a missing exchange) closes an AMQP channel for good;
//! the publisher then opens a fresh one on the next publish instead of failing every later one.

use std::sync::Arc;

use heimdex_shared::topology::{self, PublishError};
use lapin::options::ConfirmSelectOptions;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Mutex;

pub struct Publisher {
    connection: Arc<Connection>,
    channel: Mutex<Channel>,
}

impl Publisher {
    /// Opens a confirming channel on `connection`.
    ///
    /// # Errors
    /// The broker refused the channel.
    pub async fn open(connection: Arc<Connection>) -> Result<Self, lapin::Error> {
        let channel = confirming(&connection).await?;
        Ok(Self { connection, channel: Mutex::new(channel) })
    }

    /// A live confirming channel, reopened if the last one was closed by an error.
    ///
    /// # Errors
    /// The connection is gone.
    pub async fn channel(&self) -> Result<Channel, lapin::Error> {
        let mut channel = self.channel.lock().await;
        if !channel.status().connected() {
            *channel = confirming(&self.connection).await?;
        }
        Ok(channel.clone())
    }

    /// Publishes `body` straight to `queue` (default exchange) and waits for the confirm.
    ///
    /// # Errors
    /// The broker did not take the message.
    pub async fn publish(&self, queue: &str, body: &[u8], properties: BasicProperties) -> Result<(), PublishError> {
        let channel = self.channel().await?;
        topology::publish_confirmed(&channel, "", queue, body, properties).await
    }
}

async fn confirming(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(channel)
}
