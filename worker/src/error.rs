//! The worker's task error. Each boundary keeps its own error (and so its source); the variant's
//! [`Disposition`] decides what happens to the message:
//!
//! | disposition | job | message |
//! |---|---|---|
//! | `Permanent` | `failed`, reason stored | dead-letter queue at once |
//! | `Retryable` | `retrying`, then `dead` after `max_attempts` | retry queue with backoff, then DLQ |
//! | `Unavailable` | the run's attempt is given back | requeued; the worker pauses (database) or exits for a restart (model) |

use std::time::Duration;

use heimdex_shared::contract::ContractError;
use heimdex_shared::error::{Dependency, Disposition};
use heimdex_shared::media::MediaError;

use crate::engine::InferenceError;
use crate::media::audio::AudioError;
use crate::media::frames::FrameError;

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The body is not a version-1 task.
    #[error(transparent)]
    Contract(#[from] ContractError),
    /// The media URI or ffprobe refused the input.
    #[error(transparent)]
    Media(#[from] MediaError),
    /// ffmpeg could not give the audio.
    #[error(transparent)]
    Audio(#[from] AudioError),
    /// ffmpeg could not give the frames.
    #[error(transparent)]
    Frames(#[from] FrameError),
    #[error(transparent)]
    Inference(#[from] InferenceError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A pipeline rule refused the input (too long, unknown language, a frame it cannot use).
    #[error("{0}")]
    Permanent(String),
    /// A failure of the worker's own machinery (a blocking thread, a semaphore) that may pass.
    #[error("{0}")]
    Retryable(String),
    #[error("timed out after {0:?} (worker.task_timeout_ms + worker.task_ms_per_media_second per second of media)")]
    Timeout(Duration),
    #[error("task panicked: {0}")]
    Panicked(String),
}

impl TaskError {
    pub fn permanent(message: impl Into<String>) -> Self {
        TaskError::Permanent(message.into())
    }

    pub fn retryable(message: impl Into<String>) -> Self {
        TaskError::Retryable(message.into())
    }

    /// What to do about it (see the module table).
    pub fn disposition(&self) -> Disposition {
        match self {
            TaskError::Contract(e) => e.disposition(),
            TaskError::Media(e) => e.disposition(),
            TaskError::Audio(e) => e.disposition(),
            TaskError::Frames(e) => e.disposition(),
            TaskError::Inference(e) => e.disposition(),
            TaskError::Database(e) => heimdex_shared::db::disposition(e),
            TaskError::Permanent(_) => Disposition::Permanent,
            TaskError::Retryable(_) | TaskError::Timeout(_) | TaskError::Panicked(_) => Disposition::Retryable,
        }
    }
}

impl InferenceError {
    /// A dead model thread makes the whole worker unable to work; any other model failure is retried.
    pub fn disposition(&self) -> Disposition {
        match self {
            InferenceError::Closed(_) | InferenceError::Panicked { .. } => Disposition::Unavailable(Dependency::Model),
            _ => Disposition::Retryable,
        }
    }
}

impl AudioError {
    /// Only a missing ffmpeg is the worker's fault; the rest is about the media.
    pub fn disposition(&self) -> Disposition {
        match self {
            AudioError::Tool(_) => Disposition::Retryable,
            _ => Disposition::Permanent,
        }
    }
}

impl FrameError {
    /// Only a missing ffmpeg is the worker's fault; the rest is about the media.
    pub fn disposition(&self) -> Disposition {
        match self {
            FrameError::Tool(_) => Disposition::Retryable,
            _ => Disposition::Permanent,
        }
    }
}
