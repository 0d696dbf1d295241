//! Model files: resolved from the model directory, each verified against its sha256 once per process.
//!
//! Expected hashes come from the directory's `MANIFEST.sha256` (written by the offline bundle's
//! preparation and by `heimdex-models download`), else from the built-in [`catalog`](crate::catalog).
//! Hashing 350 MB takes seconds, so a verified file is remembered in `.heimdex-verified.json`, keyed
//! by size and modification time: a restart re-hashes only files that changed. A missing or corrupt
//! file stops the worker with a message naming the file and the fix.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::catalog;

const MANIFEST: &str = "MANIFEST.sha256";
const STAMP: &str = ".heimdex-verified.json";

/// Why a model file cannot be used; the worker refuses to start with this message.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(
        "model file {path} is missing; run `heimdex-models download --dir {dir}` (or ../shared/models/prepare {dir}), \
         or set HEIMDEX__MODELS__DIR to the folder that holds it"
    )]
    Missing { path: String, dir: String },
    #[error("model file {path} is corrupt: sha256 {actual}, expected {expected}; delete it and run `heimdex-models download`")]
    Corrupt { path: String, expected: String, actual: String },
    #[error("model file {path}: {message}")]
    Io { path: String, message: String },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime_ns: u128,
    sha256: String,
}

/// The model directory and the hashes its files must have.
#[derive(Debug)]
pub struct ModelRegistry {
    dir: PathBuf,
    expected: HashMap<String, String>,
    /// Files verified by this process (never re-hashed while it lives).
    verified: Mutex<HashMap<String, PathBuf>>,
}

impl ModelRegistry {
    /// Opens a model directory and reads its manifest.
    ///
    /// # Errors
    /// The manifest exists but cannot be read.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let dir = dir.to_path_buf();
        let mut expected: HashMap<String, String> = catalog::files().map(|f| (f.path.to_string(), f.sha256.to_string())).collect();
        let manifest = dir.join(MANIFEST);
        if manifest.is_file() {
            let text = std::fs::read_to_string(&manifest).map_err(|e| io(&manifest, &e))?;
            expected.extend(parse_manifest(&text));
        }
        Ok(Self { dir, expected, verified: Mutex::default() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Resolves `rel` (e.g. `yunet/face_detection_yunet_2023mar.onnx`) to a verified path.
    ///
    /// # Errors
    /// [`ModelError`] naming the file and what to do.
    pub fn file(&self, rel: &str) -> Result<PathBuf, ModelError> {
        if let Some(path) = self.verified.lock().expect("registry lock").get(rel) {
            return Ok(path.clone());
        }
        let path = self.dir.join(rel);
        if !path.is_file() {
            return Err(ModelError::Missing { path: path.display().to_string(), dir: self.dir.display().to_string() });
        }
        self.verify(rel, &path)?;
        self.verified.lock().expect("registry lock").insert(rel.to_string(), path.clone());
        Ok(path)
    }

    fn verify(&self, rel: &str, path: &Path) -> Result<(), ModelError> {
        let meta = std::fs::metadata(path).map_err(|e| io(path, &e))?;
        let mtime_ns = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
        let expected = self.expected.get(rel);
        let mut stamps = self.read_stamps();
        if let Some(stamp) = stamps.get(rel)
            && stamp.size == meta.len()
            && stamp.mtime_ns == mtime_ns
            && expected.is_none_or(|e| *e == stamp.sha256)
        {
            return Ok(());
        }
        let actual = sha256_file(path)?;
        match expected {
            Some(expected) if *expected != actual => {
                return Err(ModelError::Corrupt { path: path.display().to_string(), expected: expected.clone(), actual });
            }
            Some(_) => {}
            None => tracing::warn!(file = rel, sha256 = %actual, "no pinned sha256 for this model file; trusting it as found"),
        }
        stamps.insert(rel.to_string(), Stamp { size: meta.len(), mtime_ns, sha256: actual });
        // A read-only model volume is fine: the stamp only saves time.
        if let Ok(json) = serde_json::to_vec_pretty(&stamps) {
            let tmp = self.dir.join(format!("{STAMP}.{}", std::process::id()));
            if std::fs::write(&tmp, json).is_ok() {
                let _ = std::fs::rename(&tmp, self.dir.join(STAMP));
            }
        }
        Ok(())
    }

    fn read_stamps(&self) -> BTreeMap<String, Stamp> {
        std::fs::read(self.dir.join(STAMP)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }
}

/// Records `entries` (relative path, sha256) in `dir`'s `MANIFEST.sha256`, keeping its other lines;
/// written to a temporary file and renamed, so a reader never sees half a manifest.
///
/// # Errors
/// The manifest cannot be read or written.
pub fn record<'a>(dir: &Path, entries: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<(), ModelError> {
    let path = dir.join(MANIFEST);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(&path, &e)),
    };
    let mut lines: BTreeMap<String, String> = parse_manifest(&text).collect();
    lines.extend(entries.into_iter().map(|(p, s)| (p.to_string(), s.to_string())));
    let body: String = lines.iter().map(|(p, s)| format!("{s}  {p}\n")).collect();
    let tmp = dir.join(format!("{MANIFEST}.{}", std::process::id()));
    std::fs::write(&tmp, body).map_err(|e| io(&tmp, &e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io(&path, &e))
}

/// `sha256  relative/path` lines, as `sha256sum` writes them.
pub fn parse_manifest(text: &str) -> impl Iterator<Item = (String, String)> + '_ {
    text.lines().filter_map(|line| {
        let (sum, path) = line.split_once(char::is_whitespace)?;
        let path = path.trim_start().trim_start_matches('*');
        (sum.len() == 64).then(|| (path.to_string(), sum.to_ascii_lowercase()))
    })
}

/// Hex sha256 of a file, streamed.
///
/// # Errors
/// The file cannot be read.
pub fn sha256_file(path: &Path) -> Result<String, ModelError> {
    let mut file = std::fs::File::open(path).map_err(|e| io(path, &e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| io(path, &e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn io(path: &Path, e: &std::io::Error) -> ModelError {
    ModelError::Io { path: path.display().to_string(), message: e.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(dir: &Path) -> ModelRegistry {
        ModelRegistry::open(dir).unwrap()
    }

    #[test]
    fn verifies_against_the_manifest_and_names_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("m")).unwrap();
        std::fs::write(dir.path().join("m/a.onnx"), b"model bytes").unwrap();
        let good = hex::encode(Sha256::digest(b"model bytes"));
        std::fs::write(dir.path().join(MANIFEST), format!("{good}  m/a.onnx\n{}  m/b.onnx\n", "0".repeat(64))).unwrap();
        std::fs::write(dir.path().join("m/b.onnx"), b"tampered").unwrap();
        let reg = registry(dir.path());
        assert_eq!(reg.file("m/a.onnx").unwrap(), dir.path().join("m/a.onnx"));
        let err = reg.file("m/b.onnx").unwrap_err().to_string();
        assert!(err.contains("m/b.onnx is corrupt") && err.contains("heimdex-models download"), "{err}");
        let err = reg.file("m/c.onnx").unwrap_err().to_string();
        assert!(err.contains("m/c.onnx is missing"), "{err}");
        // The stamp remembers a.onnx; changing its content changes size+mtime and forces a re-hash.
        let stamps = reg.read_stamps();
        assert_eq!(stamps["m/a.onnx"].sha256, good);
        std::fs::write(dir.path().join("m/a.onnx"), b"other model bytes").unwrap();
        let err = registry(dir.path()).file("m/a.onnx").unwrap_err().to_string();
        assert!(err.contains("corrupt"), "{err}");
    }
}
