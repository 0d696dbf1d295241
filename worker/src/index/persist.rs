//! The index task's output and how it replaces earlier results: one DELETE and one bulk
//! `INSERT ... SELECT FROM UNNEST(...)` inside the runtime's transaction, so a redelivered task leaves
//! exactly one set of rows.

use heimdex_shared::contract::SpeechTask;
pub use heimdex_shared::db::Word;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::pipeline::Persist;

/// One transcript segment with absolute times and its text embedding.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Segment {
    pub start_s: f64,
    pub end_s: f64,
    pub text: String,
    /// Mean probability of the segment's tokens.
    pub confidence: f32,
    /// Unit-length text embedding (empty until embedded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub embedding: Vec<f32>,
    /// The segment's words with their times (`index.word_timestamps`, see [`super::align`]; empty when off).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub words: Vec<Word>,
}

/// Everything the index task produced for one video.
#[derive(Clone, Debug, serde::Serialize)]
pub struct IndexOutput {
    pub segments: Vec<Segment>,
    /// ISO code of the transcript's language (`en`): the language spoken, or `en` for a translation;
    /// empty when there was no speech to tell.
    pub language: String,
    /// What was asked of Whisper (`options.task`).
    pub task: SpeechTask,
    /// The language spoken, when the transcript is its English translation and speech was heard.
    pub spoken_language: Option<String>,
    /// Decoded audio length, seconds (0 without an audio track).
    pub audio_s: f64,
    /// Name of the model that produced the embeddings (keeps embedding spaces apart).
    pub embedding_model: String,
    /// Whisper windows of the audio, and how many of them an earlier run's checkpoints supplied.
    pub windows: usize,
    pub resumed_windows: usize,
}

impl IndexOutput {
    /// Words in the transcript.
    pub fn words(&self) -> usize {
        self.segments.iter().map(|s| s.text.split_whitespace().count()).sum()
    }

    /// The transcript as one string.
    pub fn text(&self) -> String {
        self.segments.iter().map(|s| s.text.as_str()).collect::<Vec<_>>().join(" ")
    }
}

impl Persist for IndexOutput {
    async fn write(&self, conn: &mut PgConnection, video_id: Uuid) -> Result<(), sqlx::Error> {
        super::checkpoint::clear(&mut *conn, video_id).await?;
        sqlx::query("DELETE FROM transcript_segments WHERE video_id = $1").bind(video_id).execute(&mut *conn).await?;
        if self.segments.is_empty() {
            return Ok(());
        }
        let n = self.segments.len();
        let idx: Vec<i32> = (0..n).map(|i| i32::try_from(i).unwrap_or(i32::MAX)).collect();
        let starts: Vec<f64> = self.segments.iter().map(|s| s.start_s).collect();
        let ends: Vec<f64> = self.segments.iter().map(|s| s.end_s).collect();
        let texts: Vec<String> = self.segments.iter().map(|s| s.text.clone()).collect();
        let conf: Vec<f32> = self.segments.iter().map(|s| s.confidence).collect();
        let vectors: Vec<Option<String>> =
            self.segments.iter().map(|s| (!s.embedding.is_empty()).then(|| heimdex_shared::db::vector_literal(&s.embedding))).collect();
        let words: Vec<Option<sqlx::types::Json<&[Word]>>> =
            self.segments.iter().map(|s| (!s.words.is_empty()).then_some(sqlx::types::Json(s.words.as_slice()))).collect();
        let language = (!self.language.is_empty()).then_some(self.language.as_str());
        sqlx::query(
            "INSERT INTO transcript_segments \
               (video_id, idx, start_s, end_s, text, language, confidence, embedding, embedding_model, words) \
             SELECT $1, u.idx, u.start_s, u.end_s, u.text, $2, u.confidence, u.embedding::vector, $3, u.words \
             FROM UNNEST($4::int4[], $5::float8[], $6::float8[], $7::text[], $8::float4[], $9::text[], $10::jsonb[]) \
               AS u(idx, start_s, end_s, text, confidence, embedding, words)",
        )
        .bind(video_id)
        .bind(language)
        .bind(&self.embedding_model)
        .bind(idx)
        .bind(starts)
        .bind(ends)
        .bind(texts)
        .bind(conf)
        .bind(vectors)
        .bind(words)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    fn summary(&self) -> serde_json::Value {
        let mut summary = serde_json::json!({
            "segments": self.segments.len(),
            "language": self.language,
            "words": self.words(),
            "audio_s": (self.audio_s * 100.0).round() / 100.0,
            "windows": self.windows,
            "resumed_windows": self.resumed_windows,
        });
        if self.task != SpeechTask::Transcribe {
            summary["task"] = self.task.as_str().into();
        }
        if let Some(spoken) = &self.spoken_language {
            summary["spoken_language"] = spoken.as_str().into();
        }
        summary
    }
}
