//! Model files: resolved from the model directory, each verified against its sha256 once per process.
//! (Full implementation lands with the foundation; this is the API pipelines use.)

use std::path::PathBuf;

/// Why a model file cannot be used; the worker refuses to start with this message.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file {path} is missing; run `heimdex-models download --dir {dir}` (or ../shared/models/prepare {dir})")]
    Missing { path: String, dir: String },
    #[error("model file {path} is corrupt: sha256 {actual}, expected {expected}; delete it and run `heimdex-models download`")]
    Corrupt { path: String, expected: String, actual: String },
    #[error("model file {path}: {message}")]
    Io { path: String, message: String },
}

/// The model directory and the hashes its files must have.
#[derive(Debug)]
pub struct ModelRegistry {
    dir: PathBuf,
}

impl ModelRegistry {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Resolves `rel` (e.g. `yunet/face_detection_yunet_2023mar.onnx`) to a verified path.
    ///
    /// # Errors
    /// [`ModelError`] naming the file and what to do.
    pub fn file(&self, rel: &str) -> Result<PathBuf, ModelError> {
        let path = self.dir.join(rel);
        if !path.is_file() {
            return Err(ModelError::Missing { path: path.display().to_string(), dir: self.dir.display().to_string() });
        }
        Ok(path)
    }
}
