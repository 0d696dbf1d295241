//! What a failure means for the work, decided by its type at each boundary (contract, media,
//! database, broker, inference), never by matching message text; and the cap on every error text that
//! leaves the process (a header, a column, a log line), because error texts echo untrusted input.

use std::fmt;

/// What to do about a failed task, as decided by the error's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Redelivery cannot help (bad input, unsupported or corrupt media): dead-letter at once.
    Permanent,
    /// Might work next time (a timeout, a transient database error, a bug hit by chance): retry with
    /// backoff, then dead-letter after `worker.max_attempts`.
    Retryable,
    /// A dependency the whole worker needs is down: hand the message back without counting an
    /// attempt and stop consuming until it is back.
    Unavailable(Dependency),
}

/// The dependency behind [`Disposition::Unavailable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dependency {
    /// PostgreSQL does not answer: pause, probe, resume.
    Database,
    /// A model thread died: no task can run here until the process restarts.
    Model,
    /// RabbitMQ does not answer: reconnect with backoff.
    Broker,
}

impl fmt::Display for Disposition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Disposition::Permanent => "permanent",
            Disposition::Retryable => "retryable",
            Disposition::Unavailable(Dependency::Database) => "unavailable (database)",
            Disposition::Unavailable(Dependency::Model) => "unavailable (model)",
            Disposition::Unavailable(Dependency::Broker) => "unavailable (broker)",
        })
    }
}

/// Longest error text (bytes) that goes into a header, a column or a log line.
pub const MAX_REASON_BYTES: usize = 1024;

/// `text` cut to at most [`MAX_REASON_BYTES`] on a character boundary, saying how much was cut.
///
/// Why: a serde error repeats the unknown field's name; a 200 KB name in the `x-heimdex-error`
/// header made RabbitMQ close the connection (`frame_too_large`) and took the worker down with it.
pub fn cap(text: &str) -> String {
    if text.len() <= MAX_REASON_BYTES {
        return text.to_string();
    }
    let mut end = MAX_REASON_BYTES - 40;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes cut)", &text[..end], text.len() - end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_texts_are_capped_on_a_char_boundary() {
        assert_eq!(cap("short"), "short");
        let long = "é".repeat(100_000);
        let capped = cap(&long);
        assert!(capped.len() <= MAX_REASON_BYTES, "{}", capped.len());
        assert!(capped.ends_with("bytes cut)"), "{capped}");
    }
}
