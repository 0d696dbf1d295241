//! Search over what the workers stored, through the SQL functions of the search migration
//! (`heimdex_search_segments`, `heimdex_search_frames`, `heimdex_similar_frames`), with query vectors
//! from the warm workers ([`heimdex_shared::query`]): no model runs in the caller.
//!
//! - Transcript segments by meaning (the text through worker-index's text model) fused with
//!   PostgreSQL full-text search by reciprocal rank fusion.
//! - Frames by text (the text through worker-vision's SigLIP text tower). With the bundle's SigLIP
//!   stand-in this proves the plumbing only: its towers are not trained together.
//! - Frames like a stored frame (`VIDEO@SECONDS`): its stored embedding, no model at all.

use heimdex_shared::Settings;
use heimdex_shared::contract::TaskKind;
use heimdex_shared::db::{Word, vector_literal};
use heimdex_shared::error::Disposition;
use sqlx::PgPool;
use uuid::Uuid;

use crate::transcript::find_video;
use heimdex_shared::query::{QueryClient, QueryError};

/// A transcript segment found by [`segments`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, schemars::JsonSchema, sqlx::FromRow)]
pub struct SegmentHit {
    pub video_id: Uuid,
    pub uri: String,
    /// The segment's index in its video's transcript.
    pub idx: i32,
    pub start_s: f64,
    pub end_s: f64,
    pub text: String,
    /// Reciprocal rank fusion score: `1/(60 + semantic_rank) + 1/(60 + text_rank)`.
    pub score: f64,
    /// Cosine similarity to the query, when the segment was among the nearest.
    pub similarity: Option<f64>,
    /// Rank among the segments nearest the query vector (none: not among them).
    pub semantic_rank: Option<i64>,
    /// Rank among the full-text matches (none: the words do not match).
    pub text_rank: Option<i64>,
    /// The segment's words that match a word of the query, with their times (where the video was
    /// indexed with word timestamps): where to jump to.
    #[sqlx(skip)]
    pub words: Vec<Word>,
}

/// A frame found by [`frames`] or [`similar_frames`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, schemars::JsonSchema, sqlx::FromRow)]
pub struct FrameHit {
    pub video_id: Uuid,
    pub uri: String,
    /// The frame's index in its video.
    pub idx: i32,
    pub ts_s: f64,
    pub scene_idx: i32,
    /// The time range of the frame's scene.
    pub scene_start_s: Option<f64>,
    pub scene_end_s: Option<f64>,
    /// Cosine similarity to the query.
    pub score: f64,
}

/// Why a search gave no hits (an empty result is not an error).
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error("no video {0:?} (give its id, or its path or URL as it was enqueued)")]
    NoVideo(String),
    #[error("video {video} has no frame embedded with {model} (has its vision job succeeded?)")]
    NoFrame { video: Uuid, model: String },
    #[error("{0:?} is not VIDEO@SECONDS (for example talk.mp4@12.5)")]
    BadFrameRef(String),
    #[error("database")]
    Database(#[from] sqlx::Error),
}

impl SearchError {
    /// A missing video or frame, or a bad reference, is the caller's input; the rest is the query's
    /// or the database's.
    pub fn disposition(&self) -> Disposition {
        match self {
            SearchError::Query(e) => e.disposition(),
            SearchError::NoVideo(_) | SearchError::NoFrame { .. } | SearchError::BadFrameRef(_) => Disposition::Permanent,
            SearchError::Database(e) => heimdex_shared::db::disposition(e),
        }
    }
}

/// Splits `VIDEO@SECONDS` at its last `@` (a path may hold one too).
///
/// # Errors
/// [`SearchError::BadFrameRef`] when there is no `@` or the seconds are not a finite number ≥ 0.
pub fn parse_frame_ref(text: &str) -> Result<(&str, f64), SearchError> {
    let bad = || SearchError::BadFrameRef(text.to_string());
    let (video, seconds) = text.rsplit_once('@').ok_or_else(bad)?;
    let seconds: f64 = seconds.trim().parse().map_err(|_| bad())?;
    if video.is_empty() || !seconds.is_finite() || seconds < 0.0 {
        return Err(bad());
    }
    Ok((video, seconds))
}

/// The (id, uri) of a video given by id, path or URL.
///
/// # Errors
/// [`SearchError::NoVideo`], or a database error.
pub async fn resolve_video(pool: &PgPool, settings: &Settings, video: &str) -> Result<(Uuid, String), SearchError> {
    find_video(pool, settings, video).await?.ok_or_else(|| SearchError::NoVideo(video.to_string()))
}

/// Transcript segments for `text`: its vector from a warm worker-index, fused with full-text search.
///
/// # Errors
/// No warm worker-index ([`QueryError::NoWarmWorker`]), a refused query, or a database error.
pub async fn segments(
    pool: &PgPool,
    queries: &QueryClient,
    settings: &Settings,
    text: &str,
    limit: u32,
    video: Option<Uuid>,
) -> Result<Vec<SegmentHit>, SearchError> {
    let embedded = queries.embed(TaskKind::Index, Some(&settings.index.embed_model), vec![text.to_string()]).await?;
    Ok(segments_by_vector(pool, &embedded.vectors[0], text, &embedded.model, limit, video).await?)
}

/// `heimdex_search_segments(query_vec, query_text, model, k, video)`.
///
/// # Errors
/// A database error.
pub async fn segments_by_vector(
    pool: &PgPool,
    vector: &[f32],
    text: &str,
    model: &str,
    limit: u32,
    video: Option<Uuid>,
) -> Result<Vec<SegmentHit>, sqlx::Error> {
    let mut hits: Vec<SegmentHit> = sqlx::query_as("SELECT * FROM heimdex_search_segments($1::vector, $2, $3, $4, $5)")
        .bind(vector_literal(vector))
        .bind(text)
        .bind(model)
        .bind(limit_arg(limit))
        .bind(video)
        .fetch_all(pool)
        .await?;
    matching_words(pool, &mut hits, text).await?;
    Ok(hits)
}

/// Fills each hit's `words` with the words of its segment that match a word of `text`: the same word
/// (case and punctuation aside), or one that starts with it ("harbour" finds "harbours"; at least three
/// letters).
async fn matching_words(pool: &PgPool, hits: &mut [SegmentHit], text: &str) -> Result<(), sqlx::Error> {
    let terms = plain_words(text);
    if terms.is_empty() || hits.is_empty() {
        return Ok(());
    }
    let videos: Vec<Uuid> = hits.iter().map(|h| h.video_id).collect();
    let idx: Vec<i32> = hits.iter().map(|h| h.idx).collect();
    let rows: Vec<(Uuid, i32, sqlx::types::Json<Vec<Word>>)> = sqlx::query_as(
        "SELECT s.video_id, s.idx, s.words FROM UNNEST($1::uuid[], $2::int4[]) AS u(video_id, idx) \
         JOIN transcript_segments s ON s.video_id = u.video_id AND s.idx = u.idx WHERE s.words IS NOT NULL",
    )
    .bind(videos)
    .bind(idx)
    .fetch_all(pool)
    .await?;
    for (video_id, idx, words) in rows {
        let matches = |w: &Word| {
            plain_words(&w.text)
                .iter()
                .any(|word| terms.iter().any(|t| word == t || (t.chars().count() >= 3 && word.starts_with(t.as_str()))))
        };
        for hit in hits.iter_mut().filter(|h| h.video_id == video_id && h.idx == idx) {
            hit.words = words.0.iter().filter(|w| matches(w)).cloned().collect();
        }
    }
    Ok(())
}

/// The words of `text`, lower case, without punctuation.
fn plain_words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'').filter(|w| !w.is_empty()).map(str::to_lowercase).collect()
}

/// Frames for `text`: its vector from a warm worker-vision's SigLIP text tower.
///
/// # Errors
/// No warm worker-vision ([`QueryError::NoWarmWorker`]), a refused query, or a database error.
pub async fn frames(
    pool: &PgPool,
    queries: &QueryClient,
    settings: &Settings,
    text: &str,
    limit: u32,
    video: Option<Uuid>,
) -> Result<Vec<FrameHit>, SearchError> {
    let embedded = queries.embed(TaskKind::Vision, Some(&settings.vision.embed_model), vec![text.to_string()]).await?;
    Ok(frames_by_vector(pool, &embedded.vectors[0], &embedded.model, limit, video).await?)
}

/// `heimdex_search_frames(query_vec, model, k, video)`.
///
/// # Errors
/// A database error.
pub async fn frames_by_vector(
    pool: &PgPool,
    vector: &[f32],
    model: &str,
    limit: u32,
    video: Option<Uuid>,
) -> Result<Vec<FrameHit>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM heimdex_search_frames($1::vector, $2, $3, $4)")
        .bind(vector_literal(vector))
        .bind(model)
        .bind(limit_arg(limit))
        .bind(video)
        .fetch_all(pool)
        .await
}

/// Frames like the stored frame of `of` nearest `at_s` (that frame first): `heimdex_similar_frames`.
///
/// # Errors
/// [`SearchError::NoFrame`] when `of` has no frame of the configured model, or a database error.
pub async fn similar_frames(
    pool: &PgPool,
    settings: &Settings,
    of: Uuid,
    at_s: f64,
    limit: u32,
    video: Option<Uuid>,
) -> Result<Vec<FrameHit>, SearchError> {
    let model = &settings.vision.embed_model;
    sqlx::query_as("SELECT * FROM heimdex_similar_frames($1, $2, $3, $4, $5)")
        .bind(of)
        .bind(at_s)
        .bind(model)
        .bind(limit_arg(limit))
        .bind(video)
        .fetch_all(pool)
        .await
        .map_err(|e| match &e {
            // `no_data_found`, raised by the function when the video has no such frame.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("P0002") => SearchError::NoFrame { video: of, model: model.clone() },
            _ => SearchError::Database(e),
        })
}

/// The functions take `k` as an integer (and refuse one outside 1 to 1000 with a reason).
fn limit_arg(limit: u32) -> i32 {
    i32::try_from(limit).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_refs() {
        assert_eq!(parse_frame_ref("talk.mp4@12.5").unwrap(), ("talk.mp4", 12.5));
        assert_eq!(parse_frame_ref("a@b.mp4@3").unwrap(), ("a@b.mp4", 3.0));
        for bad in ["talk.mp4", "talk.mp4@", "@3", "talk.mp4@-1", "talk.mp4@x", "talk.mp4@inf"] {
            assert!(matches!(parse_frame_ref(bad), Err(SearchError::BadFrameRef(_))), "{bad}");
        }
    }
}
