//! `heimdex search`: transcript segments or frames by a text, or frames like a stored frame. Query
//! vectors come from the warm workers over the broker (no model is loaded here); the ranking is
//! the SQL functions' (`heimdex_search_*`, see the README's Search section).

use std::process::ExitCode;
use std::time::Duration;

use heimdex_producer::search::{self, FrameHit, SearchError, SegmentHit};
use heimdex_shared::Settings;
use heimdex_shared::query::{QueryClient, QueryError};
use heimdex_shared::remote::redact;

/// What to search.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// Transcript segments (worker-index's text model, fused with full-text search).
    Segments,
    /// Frames (worker-vision's SigLIP text tower).
    Frames,
}

#[derive(clap::Args)]
pub struct Args {
    /// The text to search for.
    #[arg(required_unless_present = "similar_to", conflicts_with = "similar_to")]
    query: Option<String>,
    /// What to search by text.
    #[arg(long = "in", value_enum, default_value = "segments")]
    target: Target,
    /// Frames like the stored frame of VIDEO nearest SECONDS (VIDEO: id, or path or URL as enqueued).
    #[arg(long, value_name = "VIDEO@SECONDS")]
    similar_to: Option<String>,
    /// Only hits in this video (id, or path or URL as enqueued).
    #[arg(long)]
    video: Option<String>,
    /// Most hits to show.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: u32,
    /// Seconds to wait for a worker's answer.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Print JSON instead of lines.
    #[arg(long)]
    json: bool,
}

/// Exit codes: 0 hits or none; 2 input refused (unknown video, bad `VIDEO@SECONDS`); 3 no worker of
/// the kind answered (none warm, none within the timeout, or all overloaded); 1 anything else.
pub async fn run(settings: &Settings, args: Args) -> anyhow::Result<ExitCode> {
    match search(settings, &args).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            let code = match &e {
                SearchError::Query(QueryError::NoWarmWorker { .. } | QueryError::Timeout { .. } | QueryError::Overloaded { .. }) => 3,
                SearchError::NoVideo(_) | SearchError::NoFrame { .. } | SearchError::BadFrameRef(_) => 2,
                _ => return Err(e.into()),
            };
            eprintln!("heimdex: {e}");
            Ok(ExitCode::from(code))
        }
    }
}

async fn search(settings: &Settings, args: &Args) -> Result<(), SearchError> {
    let pool = heimdex_shared::db::pool(&settings.database)?;
    let video = match &args.video {
        Some(v) => Some(search::resolve_video(&pool, settings, v).await?.0),
        None => None,
    };
    if let Some(frame) = &args.similar_to {
        let (of, at_s) = search::parse_frame_ref(frame)?;
        let (of, uri) = search::resolve_video(&pool, settings, of).await?;
        let hits = search::similar_frames(&pool, settings, of, at_s, args.limit, video).await?;
        let heading = format!("frames like {} at {at_s} s", redact(&uri));
        let source = serde_json::json!({ "video_id": of, "uri": redact(&uri), "at_s": at_s });
        return print_frames(args, &settings.vision.embed_model, &heading, serde_json::json!({ "similar_to": source }), hits);
    }
    let text = args.query.as_deref().unwrap_or_default();
    let timeout = Duration::from_secs_f64(args.timeout.clamp(0.1, 3600.0));
    let queries = QueryClient::connect(settings).await?.with_timeout(timeout);
    let query = serde_json::json!({ "query": text });
    match args.target {
        Target::Segments => {
            let hits = search::segments(&pool, &queries, settings, text, args.limit, video).await?;
            print_segments(args, &settings.index.embed_model, text, query, hits)
        }
        Target::Frames => {
            let hits = search::frames(&pool, &queries, settings, text, args.limit, video).await?;
            print_frames(args, &settings.vision.embed_model, &format!("frames for {text:?}"), query, hits)
        }
    }
}

fn print_segments(args: &Args, model: &str, text: &str, mut head: serde_json::Value, mut hits: Vec<SegmentHit>) -> Result<(), SearchError> {
    hits.iter_mut().for_each(|h| h.uri = redact(&h.uri));
    if args.json {
        head["in"] = "segments".into();
        head["model"] = model.into();
        head["hits"] = serde_json::to_value(&hits).unwrap_or_default();
        println!("{}", serde_json::to_string_pretty(&head).unwrap_or_default());
        return Ok(());
    }
    println!("transcript segments for {text:?} ({model}, fused with full-text search): {} hits", hits.len());
    for (i, h) in hits.iter().enumerate() {
        // Where to jump to: the first word that matches the query, where words are timed.
        let at = h.words.first().map_or_else(String::new, |w| format!(" ({:?} at {:.2} s)", w.text, w.start_s));
        println!("{:>3}. {:.4}  {}  {:.2}–{:.2} s{at}  {}", i + 1, h.score, h.uri, h.start_s, h.end_s, h.text.trim());
        println!("     video {}{}", h.video_id, ranks(h));
    }
    Ok(())
}

/// How a segment got its score: its rank in each list.
fn ranks(h: &SegmentHit) -> String {
    let rank = |r: Option<i64>| r.map_or_else(|| "-".to_string(), |r| r.to_string());
    let similarity = h.similarity.map_or_else(String::new, |s| format!(", similarity {s:.3}"));
    format!("  (by meaning #{}{similarity}, by words #{})", rank(h.semantic_rank), rank(h.text_rank))
}

fn print_frames(args: &Args, model: &str, heading: &str, mut head: serde_json::Value, mut hits: Vec<FrameHit>) -> Result<(), SearchError> {
    hits.iter_mut().for_each(|h| h.uri = redact(&h.uri));
    if args.json {
        head["in"] = "frames".into();
        head["model"] = model.into();
        head["hits"] = serde_json::to_value(&hits).unwrap_or_default();
        println!("{}", serde_json::to_string_pretty(&head).unwrap_or_default());
        return Ok(());
    }
    println!("{heading} ({model}): {} hits", hits.len());
    for (i, h) in hits.iter().enumerate() {
        let scene = match (h.scene_start_s, h.scene_end_s) {
            (Some(s), Some(e)) => format!("scene {} {s:.2}–{e:.2} s", h.scene_idx),
            _ => format!("scene {}", h.scene_idx),
        };
        println!("{:>3}. {:.4}  {}  frame at {:.2} s ({scene})", i + 1, h.score, h.uri, h.ts_s);
        println!("     video {}", h.video_id);
    }
    Ok(())
}
