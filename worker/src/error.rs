//! The worker's task error: its variant decides what happens to the message.
//!
//! | variant | job | message |
//! |---|---|---|
//! | `Permanent` | `failed`, reason stored | dead-letter queue at once |
//! | `Retryable` | `retrying`, then `dead` after `max_attempts` | retry queue with backoff, then DLQ |
//! | `Unavailable` | untouched | requeued without counting an attempt; the worker pauses consuming |

use heimdex_shared::contract::ContractError;

use crate::engine::InferenceError;

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// Redelivery cannot help: bad input, unsupported or corrupt media.
    #[error("{0}")]
    Permanent(String),
    /// Might work next time: a timeout, a model failure, a transient database error, a panic.
    #[error("{0}")]
    Retryable(String),
    /// A dependency (the database) is down; the worker stops consuming until it is back.
    #[error("dependency unavailable: {0}")]
    Unavailable(String),
}

impl TaskError {
    pub fn permanent(message: impl Into<String>) -> Self {
        TaskError::Permanent(message.into())
    }
    pub fn retryable(message: impl Into<String>) -> Self {
        TaskError::Retryable(message.into())
    }
    pub fn outcome(&self) -> &'static str {
        match self {
            TaskError::Permanent(_) => "failed",
            TaskError::Retryable(_) => "retried",
            TaskError::Unavailable(_) => "requeued",
        }
    }
}

impl From<ContractError> for TaskError {
    fn from(e: ContractError) -> Self {
        TaskError::Permanent(e.to_string())
    }
}

impl From<InferenceError> for TaskError {
    fn from(e: InferenceError) -> Self {
        TaskError::Retryable(e.to_string())
    }
}

impl From<sqlx::Error> for TaskError {
    fn from(e: sqlx::Error) -> Self {
        if heimdex_shared::db::is_unavailable(&e) {
            TaskError::Unavailable(e.to_string())
        } else {
            TaskError::Retryable(format!("database: {e}"))
        }
    }
}
