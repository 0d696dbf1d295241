//! Per-window checkpoints of an index task: each Whisper window's transcript is stored as soon as it
//! is decoded, so a redelivered task (its worker was killed, its time bound hit, a deploy stopped it)
//! decodes only the windows after those already stored instead of starting a long recording again.
//!
//! The chunker and the packer are deterministic, so a redelivery cuts the same windows; a stored window
//! is reused only when the new run cut it at the same place under the same settings, and from the first
//! window that differs on everything is decoded again. Writes go through the run's fence
//! ([`FencedRun::begin`]) like the results. Checkpoints belong to the job's generation: a forced re-run
//! starts a new one and reuses none of an older generation's windows (it overwrites them as it goes);
//! the results transaction deletes them all ([`clear`], called by [`super::persist`]).

use heimdex_shared::jobs::FencedRun;
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
    fenced: FencedRun,
    config: String,
    stored: std::vec::IntoIter<WindowText>,
    diverged: bool,
}

impl Checkpoints {
    /// Loads what earlier runs of this video's index job stored in the run's generation under the same
    /// `config` (a key of the settings that shape the windows and their text).
    ///
    /// # Errors
    /// Database errors.
    pub async fn load(fenced: FencedRun, config: String) -> Result<Self, sqlx::Error> {
        let run = fenced.run();
        let rows: Vec<StoredWindow> = sqlx::query_as(
            "SELECT window_index, offset_s, duration_s, language, segments FROM index_checkpoints
             WHERE video_id = $1 AND config = $2 AND generation = $3 ORDER BY window_index",
        )
        .bind(run.video_id)
        .bind(&config)
        .bind(run.generation)
        .fetch_all(fenced.reader())
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
        Ok(Self { fenced, config, stored: stored.into_iter(), diverged: false })
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
        let Some(mut tx) = self.fenced.begin().await? else {
            return Ok(());
        };
        let run = self.fenced.run();
        sqlx::query(
            "INSERT INTO index_checkpoints (video_id, window_index, offset_s, duration_s, config, language, segments, generation)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (video_id, window_index) DO UPDATE SET offset_s = EXCLUDED.offset_s, duration_s = EXCLUDED.duration_s,
                 config = EXCLUDED.config, language = EXCLUDED.language, segments = EXCLUDED.segments,
                 generation = EXCLUDED.generation, created_at = now()",
        )
        .bind(run.video_id)
        .bind(i32::try_from(window.index).unwrap_or(i32::MAX))
        .bind(window.offset_s)
        .bind(window.duration_s)
        .bind(&self.config)
        .bind(i32::try_from(window.language).unwrap_or_default())
        .bind(sqlx::types::Json(&window.segments))
        .bind(run.generation)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
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
