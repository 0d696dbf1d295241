//! Per-window checkpoints of an index task: each Whisper window's transcript is stored as soon as it
//! is decoded, so a redelivered task (its worker was killed, its time bound hit, a deploy stopped it)
//! decodes only the windows after those already stored instead of starting a long recording again.
//!
//! The chunker and the packer are deterministic, so a redelivery cuts the same windows; a stored window
//! is reused only when the new run cut it at the same place under the same settings, and from the first
//! window that differs on everything is decoded again. Writes are fenced by the run's token like every other write
//! of a run. The results transaction deletes the checkpoints (see [`super::persist`]); a forced re-run
//! clears them when it queues the job.

use heimdex_shared::jobs::Run;
use sqlx::PgPool;
use uuid::Uuid;

use super::pack::Packed;
use super::persist::Segment;

/// Where two runs may place the same window differently and still call it the same (seconds): far
/// below one VAD frame (32 ms).
const SAME_PLACE_S: f64 = 0.001;

/// One window's transcript.
#[derive(Clone, Debug, PartialEq)]
pub struct WindowText {
    /// Position in the stream's window sequence.
    pub index: usize,
    /// Where the window's audio starts in the recording, seconds.
    pub offset_s: f64,
    pub duration_s: f64,
    /// Segments with absolute times (not yet embedded).
    pub segments: Vec<Segment>,
    /// Language token the window was decoded in.
    pub language: u32,
}

/// A row of `index_checkpoints`.
#[derive(sqlx::FromRow)]
struct StoredWindow {
    window_index: i32,
    offset_s: f64,
    duration_s: f64,
    language: i32,
    segments: sqlx::types::Json<Vec<Segment>>,
}

/// The checkpoints of one run: those an earlier run left, and where new ones go.
#[derive(Debug)]
pub struct Checkpoints {
    pool: PgPool,
    run: Run,
    config: String,
    stored: std::vec::IntoIter<WindowText>,
    diverged: bool,
}

impl Checkpoints {
    /// Loads what earlier runs of this video's index job stored under the same `config` (a key of the
    /// settings that shape the windows and their text).
    ///
    /// # Errors
    /// Database errors.
    pub async fn load(pool: PgPool, run: Run, config: String) -> Result<Self, sqlx::Error> {
        let rows: Vec<StoredWindow> = sqlx::query_as(
            "SELECT window_index, offset_s, duration_s, language, segments FROM index_checkpoints
             WHERE video_id = $1 AND config = $2 ORDER BY window_index",
        )
        .bind(run.video_id)
        .bind(&config)
        .fetch_all(&pool)
        .await?;
        let stored: Vec<WindowText> = rows
            .into_iter()
            .map(|r| WindowText {
                index: usize::try_from(r.window_index).unwrap_or(usize::MAX),
                offset_s: r.offset_s,
                duration_s: r.duration_s,
                segments: r.segments.0,
                language: u32::try_from(r.language).unwrap_or_default(),
            })
            .collect();
        Ok(Self { pool, run, config, stored: stored.into_iter(), diverged: false })
    }

    /// The stored transcript of `window`, if an earlier run stored one for a window cut at the same
    /// place and no earlier window of this run differed.
    pub fn reuse(&mut self, window: &Packed) -> Option<WindowText> {
        if self.diverged {
            return None;
        }
        let same = self.stored.next().filter(|c| {
            c.index == window.chunk.index
                && (c.offset_s - window.start_s()).abs() < SAME_PLACE_S
                && (c.duration_s - window.chunk.duration_s()).abs() < SAME_PLACE_S
        });
        self.diverged = same.is_none();
        same
    }

    /// Stores a window's transcript while this run still holds the job.
    ///
    /// # Errors
    /// Database errors.
    pub async fn save(&self, window: &WindowText) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO index_checkpoints (video_id, window_index, offset_s, duration_s, config, language, segments)
             SELECT $1, $2, $3, $4, $5, $6, $7 WHERE EXISTS (SELECT 1 FROM jobs WHERE id = $8 AND run_token = $9)
             ON CONFLICT (video_id, window_index) DO UPDATE SET offset_s = EXCLUDED.offset_s, duration_s = EXCLUDED.duration_s,
                 config = EXCLUDED.config, language = EXCLUDED.language, segments = EXCLUDED.segments, created_at = now()",
        )
        .bind(self.run.video_id)
        .bind(i32::try_from(window.index).unwrap_or(i32::MAX))
        .bind(window.offset_s)
        .bind(window.duration_s)
        .bind(&self.config)
        .bind(i32::try_from(window.language).unwrap_or_default())
        .bind(sqlx::types::Json(&window.segments))
        .bind(self.run.job_id)
        .bind(self.run.token)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// Deletes a video's checkpoints (inside the results transaction).
///
/// # Errors
/// Database errors.
pub async fn clear(conn: &mut sqlx::PgConnection, video_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM index_checkpoints WHERE video_id = $1").bind(video_id).execute(conn).await?;
    Ok(())
}
