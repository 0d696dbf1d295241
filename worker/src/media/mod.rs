//! Media decoding with the ffmpeg CLI, streamed so that long files never sit in memory whole.

pub mod audio;
pub mod frames;

use std::collections::VecDeque;

use tokio::io::{AsyncBufReadExt, BufReader};

/// How many lines of ffmpeg's stderr are kept for error messages.
const STDERR_LINES: usize = 8;

/// Keeps the last [`STDERR_LINES`] non-empty lines of ffmpeg's stderr (bounded, whatever it prints);
/// the last ones carry the reason of a failure.
async fn stderr_tail(stderr: tokio::process::ChildStderr) -> VecDeque<String> {
    let mut lines = BufReader::new(stderr).lines();
    let mut tail = VecDeque::with_capacity(STDERR_LINES);
    while let Ok(Some(line)) = lines.next_line().await {
        let line = line.trim().to_string();
        if line.is_empty() {
            continue;
        }
        if tail.len() == STDERR_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    tail
}
