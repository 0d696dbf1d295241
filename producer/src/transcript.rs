//! A video's transcript as stored by `worker-index`, exported as SubRip, WebVTT, JSON or plain text.

use std::fmt::Write as _;

use heimdex_shared::Settings;
use heimdex_shared::db::Word;
use heimdex_shared::media;
use sqlx::PgPool;
use uuid::Uuid;

/// An export format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Srt,
    Vtt,
    Json,
    Txt,
}

/// One timed line of a transcript.
#[derive(Clone, Debug, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct Line {
    pub start_s: f64,
    pub end_s: f64,
    pub text: String,
    pub confidence: Option<f32>,
    /// The line's words with their times, where the video was indexed with word timestamps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub words: Option<sqlx::types::Json<Vec<Word>>>,
}

/// A video's transcript.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Transcript {
    pub video_id: Uuid,
    pub uri: String,
    /// ISO code of the spoken language, when there was speech to tell.
    pub language: Option<String>,
    pub segments: Vec<Line>,
}

/// Why a transcript cannot be exported.
#[derive(Debug, thiserror::Error)]
pub enum TranscriptError {
    #[error("no video {0:?} (give its id, or its path or URL as it was enqueued)")]
    NoVideo(String),
    #[error("video {video}: its index job is {status}, so it has no transcript yet")]
    NotIndexed { video: Uuid, status: String },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Reads the transcript of `video`: a video id, or a path or URL as it was enqueued (resolved
/// against the media root like `heimdex enqueue` does).
///
/// # Errors
/// No such video, an index job that has not succeeded, or a database error.
pub async fn load(pool: &PgPool, settings: &Settings, video: &str) -> Result<Transcript, TranscriptError> {
    let (video_id, uri) = find_video(pool, settings, video).await?.ok_or_else(|| TranscriptError::NoVideo(video.to_string()))?;
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM jobs WHERE video_id = $1 AND kind = 'index'").bind(video_id).fetch_optional(pool).await?;
    if status.as_deref() != Some("succeeded") {
        return Err(TranscriptError::NotIndexed { video: video_id, status: status.unwrap_or_else(|| "not enqueued".into()) });
    }
    let segments: Vec<Line> =
        sqlx::query_as("SELECT start_s, end_s, text, confidence, words FROM transcript_segments WHERE video_id = $1 ORDER BY idx")
            .bind(video_id)
            .fetch_all(pool)
            .await?;
    let language: Option<String> =
        sqlx::query_scalar("SELECT language FROM transcript_segments WHERE video_id = $1 AND language IS NOT NULL LIMIT 1")
            .bind(video_id)
            .fetch_optional(pool)
            .await?
            .flatten();
    Ok(Transcript { video_id, uri, language, segments })
}

/// The (id, uri) of `video`: a video id, or a path or URL as it was enqueued (resolved against the
/// media root like `heimdex enqueue` does); `None` when no such video is stored.
///
/// # Errors
/// A database error.
pub async fn find_video(pool: &PgPool, settings: &Settings, video: &str) -> Result<Option<(Uuid, String)>, sqlx::Error> {
    match Uuid::parse_str(video) {
        Ok(id) => sqlx::query_as("SELECT id, uri FROM videos WHERE id = $1").bind(id).fetch_optional(pool).await,
        Err(_) => {
            let uri = media::resolve(video, &settings.media.root, true).unwrap_or_else(|_| video.to_string());
            sqlx::query_as("SELECT id, uri FROM videos WHERE uri = $1").bind(uri).fetch_optional(pool).await
        }
    }
}

/// The transcript in `format`; with `words`, WebVTT cues time each word (a cue timestamp before every
/// word after the first, where the line has word timings). JSON always carries the words it has.
pub fn render(t: &Transcript, format: Format, words: bool) -> String {
    let mut out = String::new();
    match format {
        Format::Srt => {
            for (i, s) in t.segments.iter().enumerate() {
                let _ = write!(out, "{}\n{} --> {}\n{}\n\n", i + 1, timestamp(s.start_s, ','), timestamp(s.end_s, ','), cue_text(&s.text));
            }
        }
        Format::Vtt => {
            out.push_str("WEBVTT\n\n");
            for s in &t.segments {
                let text = match &s.words {
                    Some(w) if words && !w.0.is_empty() => word_cue(s, &w.0),
                    _ => cue_text(&s.text),
                };
                let _ = write!(out, "{} --> {}\n{text}\n\n", timestamp(s.start_s, '.'), timestamp(s.end_s, '.'));
            }
        }
        Format::Json => {
            // A URL's user info and query (signatures, tokens) never leave in an export.
            let shown = Transcript { uri: heimdex_shared::remote::redact(&t.uri), ..t.clone() };
            out = serde_json::to_string_pretty(&shown).unwrap_or_default();
            out.push('\n');
        }
        Format::Txt => {
            for s in &t.segments {
                out.push_str(s.text.trim());
                out.push('\n');
            }
        }
    }
    out
}

/// `HH:MM:SS,mmm` (SubRip) or `HH:MM:SS.mmm` (WebVTT).
fn timestamp(seconds: f64, separator: char) -> String {
    let ms = (seconds.max(0.0) * 1000.0).round() as u64;
    format!("{:02}:{:02}:{:02}{separator}{:03}", ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000)
}

/// A WebVTT cue whose words appear as they are spoken: `go <00:00:01.400>forward`. A cue timestamp
/// must fall strictly inside the cue and after the one before it (WebVTT), so a word whose time does
/// not gets none. The line's own spacing is kept ("ill-disposed" is two words and no space).
fn word_cue(line: &Line, words: &[Word]) -> String {
    let text = cue_text(&line.text);
    let mut rest = text.as_str();
    let mut out = String::new();
    let mut last = line.start_s;
    let ms = |t: f64| (t * 1000.0).round();
    for (i, w) in words.iter().enumerate() {
        let word = cue_text(&w.text);
        match rest.find(word.as_str()) {
            Some(at) => {
                out.push_str(&rest[..at]);
                rest = &rest[at + word.len()..];
            }
            None if i > 0 => out.push(' '),
            None => {}
        }
        if i > 0 && ms(w.start_s) > ms(last) && ms(w.start_s) < ms(line.end_s) {
            let _ = write!(out, "<{}>", timestamp(w.start_s, '.'));
            last = w.start_s;
        }
        out.push_str(&word);
    }
    out.push_str(rest);
    out
}

/// Cue text on one line, without the blank lines that end a cue or the arrow that starts timings.
fn cue_text(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ").replace("-->", "->")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_cues() {
        assert_eq!(timestamp(0.0, ','), "00:00:00,000");
        assert_eq!(timestamp(3725.0456, '.'), "01:02:05.046");
        assert_eq!(cue_text(" a\n\nb --> c "), "a b -> c");
        let t = Transcript {
            video_id: Uuid::nil(),
            uri: "x".into(),
            language: Some("en".into()),
            segments: vec![Line { start_s: 1.0, end_s: 2.5, text: "go forward".into(), confidence: Some(0.9), words: None }],
        };
        assert_eq!(render(&t, Format::Srt, false), "1\n00:00:01,000 --> 00:00:02,500\ngo forward\n\n");
        assert_eq!(render(&t, Format::Vtt, false), "WEBVTT\n\n00:00:01.000 --> 00:00:02.500\ngo forward\n\n");
        assert_eq!(render(&t, Format::Vtt, true), render(&t, Format::Vtt, false), "no word timings: plain cues");
        assert_eq!(render(&t, Format::Txt, false), "go forward\n");
    }

    #[test]
    fn word_cues_time_each_word_inside_the_cue() {
        let word = |text: &str, start_s: f64| Word { text: text.into(), start_s, end_s: start_s + 0.3, probability: 0.9 };
        let words =
            vec![word("go", 1.0), word("forward", 1.4), word("ten", 1.4), word("ill", 1.8), word("-disposed", 2.0), word("meters.", 2.6)];
        let t = Transcript {
            video_id: Uuid::nil(),
            uri: "x".into(),
            language: Some("en".into()),
            segments: vec![Line {
                start_s: 1.0,
                end_s: 2.5,
                text: "go forward ten ill-disposed meters.".into(),
                confidence: Some(0.9),
                words: Some(sqlx::types::Json(words)),
            }],
        };
        // "ten" shares its time with "forward" and "meters." starts after the cue ends: no tag of their
        // own; "-disposed" follows "ill" without a space, as in the text.
        assert_eq!(
            render(&t, Format::Vtt, true),
            "WEBVTT\n\n00:00:01.000 --> 00:00:02.500\ngo <00:00:01.400>forward ten <00:00:01.800>ill<00:00:02.000>-disposed meters.\n\n"
        );
        let json: serde_json::Value = serde_json::from_str(&render(&t, Format::Json, false)).unwrap();
        assert_eq!(json["segments"][0]["words"][1]["text"], "forward");
        assert_eq!(json["segments"][0]["words"][1]["start_s"], 1.4);
    }
}
