//! Installs a [`catalog`](crate::catalog) model into a model directory: fetches its pinned sources,
//! builds its folder beside it, checks every file against its pin, then moves the files into place
//! and records them in `MANIFEST.sha256`. A failure at any step leaves the folder as it was.
//!
//! Two installs into one folder (two `heimdex-models download` runs, say) take turns: each holds an
//! exclusive lock on `{dir}/.download.lock` ([`LOCK`]) from its first check to its last rename, so
//! they never write one `.part` or `MANIFEST.sha256` together; the second then finds the model
//! present. The lock is the kernel's (`flock`), released when its holder exits, however it exits.

use std::path::{Path, PathBuf};

use crate::catalog::{Build, Model};
use crate::convert::{self, ConvertError};
use crate::download::{self, DownloadError};
use crate::registry::{self, ModelError, ModelRegistry};

/// Where the sources wait between a download and the build (kept across failed runs, so an
/// interrupted download resumes; removed once the model is installed).
const SOURCES: &str = ".downloads";

/// The lock file every install into a folder holds while it runs (never removed: removing a lock
/// file another process waits on would let a third in beside it).
pub const LOCK: &str = ".download.lock";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{url}: {source}")]
    Download { url: String, source: DownloadError },
    #[error("building {folder}: {source}")]
    Convert { folder: &'static str, source: ConvertError },
    #[error("{path}: built with sha256 {actual}, but its pin is {expected}; nothing was installed")]
    Mismatch { path: &'static str, expected: &'static str, actual: String },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// What [`install`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installation {
    /// Every file was already there with its pinned sha256.
    Present,
    Installed,
}

/// Makes `model`'s files present in `dir`, each with its pinned sha256, fetching its sources from
/// upstream or from `mirror` (see [`crate::catalog::Source::url`]).
///
/// # Errors
/// A download that fails or does not match its pin, a build that fails or does not match its pin,
/// or the directory cannot be written. Files already in place are left alone.
pub async fn install(dir: &Path, model: &Model, mirror: Option<&str>) -> Result<Installation, InstallError> {
    let _lock = lock(dir).await?;
    let present = ModelRegistry::open(dir)?;
    if model.files.iter().all(|f| present.file(f.path).is_ok()) {
        return Ok(Installation::Present);
    }
    let sources = dir.join(SOURCES).join(model.folder);
    for source in model.sources {
        let dest = sources.join(source.file_name());
        let ok = registry::sha256_file(&dest).is_ok_and(|s| s == source.sha256);
        if !ok {
            let url = source.url(mirror);
            let pin = download::Pin { sha256: source.sha256, size: source.size };
            download::fetch(&url, &dest, pin, download::Limits::default())
                .await
                .map_err(|source| InstallError::Download { url, source })?;
        }
    }

    let staging = dir.join(format!(".staging-{}-{}", model.folder, std::process::id()));
    let result = build_and_place(dir, model, &sources, &staging).await;
    let _ = std::fs::remove_dir_all(&staging);
    result?;
    let _ = std::fs::remove_dir_all(&sources);
    let _ = std::fs::remove_dir(dir.join(SOURCES)); // only when no other model's sources wait there
    Ok(Installation::Installed)
}

/// Waits for and takes the folder's install lock; released when the returned file is dropped.
async fn lock(dir: &Path) -> Result<std::fs::File, InstallError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let path = dir.join(LOCK);
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| io(&path, e))?;
    tokio::task::spawn_blocking(move || file.lock().map(|()| file))
        .await
        .map_err(|e| io(&path, std::io::Error::other(e)))?
        .map_err(|e| io(&path, e))
}

async fn build_and_place(dir: &Path, model: &Model, sources: &Path, staging: &Path) -> Result<(), InstallError> {
    std::fs::create_dir_all(staging).map_err(|e| io(staging, e))?;
    let (src, out, folder) = (sources.to_path_buf(), staging.to_path_buf(), model.folder);
    let build = model.build;
    tokio::task::spawn_blocking(move || -> Result<(), InstallError> {
        let convert = |r: Result<(), ConvertError>| r.map_err(|source| InstallError::Convert { folder, source });
        match build {
            Build::Copy => Ok(()),
            Build::Whisper => {
                convert(convert::whisper(&src.join("model.bin"), &src.join("config.json"), &src.join("tokenizer.json"), &out))
            }
            Build::MiniLm => {
                convert(convert::minilm(&src.join("model.safetensors"), &src.join("config.json"), &out.join("model_fp32.onnx")))
            }
        }
    })
    .await
    .map_err(|e| io(staging, std::io::Error::other(e)))??;

    // Every file: built into staging, else the source of the same name. Check all before moving any.
    let mut placed = Vec::with_capacity(model.files.len());
    for file in model.files {
        let name = file.path.rsplit('/').next().unwrap_or(file.path);
        let built = staging.join(name);
        let from = if built.is_file() { built } else { sources.join(name) };
        let actual = registry::sha256_file(&from)?;
        if actual != file.sha256 {
            return Err(InstallError::Mismatch { path: file.path, expected: file.sha256, actual });
        }
        placed.push((from, dir.join(file.path)));
    }
    for (from, to) in &placed {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        // Staging and sources sit in `dir`, on the same filesystem: a rename, never a half file.
        std::fs::rename(from, to).map_err(|e| io(to, e))?;
    }
    registry::record(dir, model.files.iter().map(|f| (f.path, f.sha256)))?;
    Ok(())
}

fn io(path: &Path, source: std::io::Error) -> InstallError {
    InstallError::Io { path: path.to_path_buf(), source }
}
