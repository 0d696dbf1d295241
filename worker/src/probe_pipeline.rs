//! A minimal real pipeline used until the model pipelines land: probes the media and decodes it with
//! ffmpeg, counting frames or samples. (To be replaced by the vision and index pipelines.)

use heimdex_shared::contract::TaskKind;
use tokio::io::AsyncReadExt;

use crate::engine::WarmupReport;
use crate::error::TaskError;
use crate::pipeline::{ModelInfo, Persist, Pipeline, StageTimings, TaskInput};

pub struct ProbePipeline(pub TaskKind);

pub struct Counted(serde_json::Value);

impl Persist for Counted {
    async fn write(&self, _conn: &mut sqlx::PgConnection, _video_id: uuid::Uuid) -> Result<(), sqlx::Error> {
        Ok(())
    }
    fn summary(&self) -> serde_json::Value {
        self.0.clone()
    }
}

impl Pipeline for ProbePipeline {
    type Output = Counted;
    fn kind(&self) -> TaskKind {
        self.0
    }
    fn models(&self) -> Vec<ModelInfo> {
        Vec::new()
    }
    async fn warm_up(&self) -> Result<Vec<WarmupReport>, TaskError> {
        Ok(Vec::new())
    }
    async fn process(&self, input: &TaskInput, timings: &StageTimings) -> Result<Counted, TaskError> {
        let args: &[&str] = match self.0 {
            TaskKind::Index if !input.probe.has_audio => return Err(TaskError::permanent("no audio track")),
            TaskKind::Index => &["-vn", "-ac", "1", "-ar", "16000", "-f", "f32le"],
            TaskKind::Vision => &["-an", "-vf", "fps=1,scale=64:64", "-f", "rawvideo", "-pix_fmt", "gray"],
        };
        let mut child = tokio::process::Command::new("ffmpeg")
            .args(["-v", "error", "-xerror", "-i", &input.media])
            .args(args)
            .arg("pipe:1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| TaskError::retryable(format!("ffmpeg: {e}")))?;
        let mut stdout = child.stdout.take().ok_or_else(|| TaskError::retryable("ffmpeg stdout"))?;
        let started = std::time::Instant::now();
        let mut total = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = stdout.read(&mut buf).await.map_err(|e| TaskError::retryable(e.to_string()))?;
            if n == 0 {
                break;
            }
            total += n;
        }
        let out = child.wait_with_output().await.map_err(|e| TaskError::retryable(e.to_string()))?;
        if !out.status.success() {
            return Err(TaskError::permanent(format!("ffmpeg cannot decode: {}", String::from_utf8_lossy(&out.stderr).trim())));
        }
        timings.record("decode", started);
        Ok(Counted(match self.0 {
            TaskKind::Index => serde_json::json!({ "samples": total / 4 }),
            TaskKind::Vision => serde_json::json!({ "frames": total / 4096 }),
        }))
    }
}
