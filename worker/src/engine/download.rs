//! Fetches one file over HTTP: resumable (HTTP Range on a `.part` file), checked against its pinned
//! sha256 before it is moved into place, so a half or wrong download never looks like a model.

use std::path::Path;

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

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
}

/// Downloads `url` to `dest`, resuming `dest.part` if an earlier attempt left one, and verifies
/// `expected` (when given) before moving it into place. Returns the file's sha256.
///
/// # Errors
/// Network failures, a non-success status, or a checksum mismatch (the partial file is removed).
pub async fn fetch(url: &str, dest: &Path, expected: Option<&str>) -> Result<String, DownloadError> {
    if let Some(parent) = dest.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    let part = dest.with_file_name(format!("{}.part", dest.file_name().map_or_else(Default::default, |n| n.to_string_lossy())));
    let have = tokio::fs::metadata(&part).await.map(|m| m.len()).unwrap_or(0);
    let client = reqwest::Client::builder().connect_timeout(std::time::Duration::from_secs(20)).build()?;
    let mut request = client.get(url);
    if have > 0 {
        request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let response = request.send().await?;
    let status = response.status();
    let resumed = status == reqwest::StatusCode::PARTIAL_CONTENT;
    if !(status.is_success()) {
        return Err(DownloadError::Status(status));
    }
    tracing::info!(url, resumed_from = if resumed { have } else { 0 }, "downloading model file");
    let mut file = tokio::fs::OpenOptions::new().create(true).append(resumed).write(true).truncate(!resumed).open(&part).await?;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        file.write_all(&chunk?).await?;
    }
    file.flush().await?;
    drop(file);
    let part_for_hash = part.clone();
    let actual = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut hasher = Sha256::new();
        let mut f = std::fs::File::open(part_for_hash)?;
        std::io::copy(&mut f, &mut hasher)?;
        Ok(hex::encode(hasher.finalize()))
    })
    .await
    .map_err(std::io::Error::other)??;
    if let Some(expected) = expected
        && !expected.eq_ignore_ascii_case(&actual)
    {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(DownloadError::Checksum { expected: expected.to_string(), actual });
    }
    tokio::fs::rename(&part, dest).await?;
    Ok(actual)
}
