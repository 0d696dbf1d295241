//! Fetches one pinned file over HTTP: resumable (HTTP Range on a `.part` file), checked against its
//! sha256 before it is moved into place, so a half or wrong download never looks like a model.
//!
//! Bounded like every fetch of untrusted bytes ([`Limits`]): a connect timeout, a read deadline (the
//! longest silence) and an overall deadline that grows with the file ([`Limits::deadline`]), and no
//! file grows past its pinned size (checked against `Content-Length` first, then on every chunk). A
//! `.part` that already holds the whole size (an earlier run died between the last byte and the
//! rename) is checked against its pin instead of asking the server for the bytes after its end,
//! which a server answers with 416 forever.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// The time bounds of one download.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest wait for a TCP connection.
    pub connect: Duration,
    /// Longest silence while reading the response.
    pub read: Duration,
    /// Slowest average rate (bytes per second) a download may keep, on top of [`Limits::read`]
    /// once more, before [`Limits::deadline`] stops it.
    pub min_rate: u64,
}

impl Default for Limits {
    /// 20 s to connect, 60 s of silence, 256 KiB/s on average (a 441 MB file: 29 min).
    fn default() -> Self {
        Self { connect: Duration::from_secs(20), read: Duration::from_secs(60), min_rate: 256 * 1024 }
    }
}

impl Limits {
    /// The overall deadline for a file of `size` bytes: the read timeout, plus the time to receive
    /// it at [`Limits::min_rate`].
    pub fn deadline(&self, size: u64) -> Duration {
        self.read + Duration::from_secs(size / self.min_rate.max(1))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    #[error("server answered {0}")]
    Status(reqwest::StatusCode),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("sha256 mismatch: got {actual}, expected {expected}; the download was discarded")]
    Checksum { expected: String, actual: String },
    #[error("the server sent more than the file's pinned size ({size} bytes); the download was discarded")]
    TooLarge { size: u64 },
    #[error("the server resumed at the wrong offset (asked for byte {asked}, got {got:?}); the download was discarded")]
    BadRange { asked: u64, got: Option<String> },
    #[error("the download took longer than its deadline ({0:?})")]
    Deadline(Duration),
}

/// What a file must be: its sha256 and its size in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Pin<'a> {
    pub sha256: &'a str,
    pub size: u64,
}

/// Downloads `url` to `dest`, resuming `dest.part` if an earlier attempt left one, and verifies it
/// against `pin` before moving it into place, within `limits`. Returns the file's sha256.
///
/// # Errors
/// Network failures, a non-success status, a body larger than the pinned size, a deadline missed,
/// or a checksum mismatch (the partial file is removed in the last three cases).
pub async fn fetch(url: &str, dest: &Path, pin: Pin<'_>, limits: Limits) -> Result<String, DownloadError> {
    let limit = limits.deadline(pin.size);
    tokio::time::timeout(limit, fetch_within(url, dest, pin, limits)).await.map_err(|_| DownloadError::Deadline(limit))?
}

async fn fetch_within(url: &str, dest: &Path, pin: Pin<'_>, limits: Limits) -> Result<String, DownloadError> {
    if let Some(parent) = dest.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    let part = dest.with_file_name(format!("{}.part", dest.file_name().map_or_else(Default::default, |n| n.to_string_lossy())));
    let mut have = tokio::fs::metadata(&part).await.map(|m| m.len()).unwrap_or(0);
    if have >= pin.size {
        // Whole (or more): nothing to ask the server for. Keep it if it is the file, else start over.
        if let Ok(sha) = verify(&part, pin.sha256).await {
            tokio::fs::rename(&part, dest).await?;
            return Ok(sha);
        }
        have = 0;
    }
    let client = reqwest::Client::builder().connect_timeout(limits.connect).read_timeout(limits.read).build()?;
    let mut request = client.get(url);
    if have > 0 {
        request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let response = request.send().await?;
    let status = response.status();
    if !status.is_success() {
        if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
            // The server does not have the bytes the `.part` claims to lack: start over next time.
            let _ = tokio::fs::remove_file(&part).await;
        }
        return Err(DownloadError::Status(status));
    }
    let resumed = status == reqwest::StatusCode::PARTIAL_CONTENT;
    if resumed {
        let got = response.headers().get(reqwest::header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).map(str::to_string);
        if !got.as_deref().is_some_and(|r| r.starts_with(&format!("bytes {have}-"))) {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(DownloadError::BadRange { asked: have, got });
        }
    }
    let start = if resumed { have } else { 0 };
    if response.content_length().is_some_and(|n| start + n > pin.size) {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(DownloadError::TooLarge { size: pin.size });
    }
    tracing::info!(url, resumed_from = start, "downloading model file");
    let mut file = tokio::fs::OpenOptions::new().create(true).append(resumed).write(true).truncate(!resumed).open(&part).await?;
    let mut written = start;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        written += chunk.len() as u64;
        if written > pin.size {
            drop(file);
            let _ = tokio::fs::remove_file(&part).await;
            return Err(DownloadError::TooLarge { size: pin.size });
        }
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    drop(file);
    match verify(&part, pin.sha256).await {
        Ok(actual) => {
            tokio::fs::rename(&part, dest).await?;
            Ok(actual)
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&part).await;
            Err(e)
        }
    }
}

/// The sha256 of `path` if it is `expected`.
async fn verify(path: &Path, expected: &str) -> Result<String, DownloadError> {
    let path: PathBuf = path.to_path_buf();
    let actual = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut hasher = Sha256::new();
        let mut f = std::fs::File::open(path)?;
        std::io::copy(&mut f, &mut hasher)?;
        Ok(hex::encode(hasher.finalize()))
    })
    .await
    .map_err(std::io::Error::other)??;
    if expected.eq_ignore_ascii_case(&actual) {
        Ok(actual)
    } else {
        Err(DownloadError::Checksum { expected: expected.to_string(), actual })
    }
}
