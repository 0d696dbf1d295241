//! `heimdex enqueue`: validate every input first (nothing is written if one is refused), enqueue, and
//! with `--wait` follow the jobs with a progress bar until they end.

use std::process::ExitCode;
use std::time::Duration;

use heimdex_producer::{EnqueueRequest, Producer};
use heimdex_shared::Settings;
use heimdex_shared::contract::{self, Metadata, TaskKind, TaskOptions};
use heimdex_shared::jobs::{self, JobRow, JobStatus};
use heimdex_shared::remote;
use indicatif::{ProgressBar, ProgressStyle};
use uuid::Uuid;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Kinds {
    Index,
    Vision,
    All,
}

#[derive(clap::Args)]
pub struct Args {
    /// Video paths (absolute or relative to the media root), http(s) URLs or s3://bucket/key URIs.
    #[arg(required = true)]
    inputs: Vec<String>,
    #[arg(long, value_enum, default_value = "all")]
    kind: Kinds,
    /// Re-run jobs that are already queued, running or done.
    #[arg(long)]
    force: bool,
    /// Wait until every job ends; the exit code says whether all succeeded.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    /// Spoken language (index), e.g. `en`; detected when absent.
    #[arg(long)]
    language: Option<String>,
    /// Frames per second to sample (vision).
    #[arg(long)]
    frame_rate: Option<f32>,
    /// `translate`: the index task writes English text whatever the language spoken (default
    /// `transcribe`: the text as spoken).
    #[arg(long, value_name = "transcribe|translate")]
    task: Option<heimdex_shared::contract::SpeechTask>,
    /// Your own id for these jobs (1 to 256 characters): shown by `heimdex status`, returned by the
    /// API (`GET /v1/jobs?external_id=`) and carried by the jobs' events.
    #[arg(long)]
    external_id: Option<String>,
    /// Your own JSON object for these jobs (at most 8 KiB), returned like `--external-id`.
    #[arg(long, value_name = "JSON")]
    metadata: Option<String>,
}

pub async fn run(settings: &Settings, args: Args) -> anyhow::Result<ExitCode> {
    let options = TaskOptions { language: args.language.clone(), frame_rate: args.frame_rate, task: args.task };
    let metadata = match args.metadata.as_deref().map(serde_json::from_str::<Metadata>).transpose() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("refused: --metadata is not a JSON object ({e})\nnothing was enqueued");
            return Ok(ExitCode::from(2));
        }
    };
    let checked = options.validate().and_then(|()| contract::check_caller_fields(args.external_id.as_deref(), metadata.as_ref()));
    if let Err(e) = checked {
        eprintln!("refused: {e}\nnothing was enqueued");
        return Ok(ExitCode::from(2));
    }
    let mut valid = Vec::new();
    let mut refused = false;
    for input in &args.inputs {
        match heimdex_producer::validate(input, settings).await {
            Ok(media) => valid.push(media),
            Err(e) => {
                eprintln!("refused {}: {e}", remote::redact(input));
                refused = true;
            }
        }
    }
    if refused {
        eprintln!("nothing was enqueued");
        return Ok(ExitCode::from(2));
    }
    let kinds = match args.kind {
        Kinds::Index => vec![TaskKind::Index],
        Kinds::Vision => vec![TaskKind::Vision],
        Kinds::All => TaskKind::ALL.to_vec(),
    };
    let producer = Producer::connect(settings).await?;
    let mut job_ids = Vec::new();
    for media in &valid {
        let request = EnqueueRequest {
            uri: media.uri.clone(),
            kinds: kinds.clone(),
            force: args.force,
            options: options.clone(),
            external_id: args.external_id.clone(),
            metadata: metadata.clone(),
        };
        let enqueued = producer.enqueue_valid(media, &request).await?;
        for job in &enqueued.jobs {
            let what = if job.published { "enqueued".to_string() } else { format!("already {}", job.status) };
            println!("{} {:<6} job {} {what}", remote::redact(&enqueued.uri), job.kind, job.job_id);
            job_ids.push(job.job_id);
        }
    }
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let rows = wait(producer.pool(), &job_ids, Duration::from_secs(args.timeout)).await?;
    print_results(producer.pool(), &rows).await?;
    let ok = rows.iter().all(|r| r.status == JobStatus::Succeeded);
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Polls the jobs until all are terminal or `timeout`, showing progress.
async fn wait(pool: &sqlx::PgPool, ids: &[Uuid], timeout: Duration) -> anyhow::Result<Vec<JobRow>> {
    let bar = ProgressBar::new(ids.len() as u64);
    bar.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} jobs done  {msg}")?);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let rows = jobs::jobs_by_id(pool, ids).await?;
        let done = rows.iter().filter(|r| r.status.is_terminal()).count();
        bar.set_position(done as u64);
        let running: Vec<String> = rows.iter().filter(|r| !r.status.is_terminal()).map(|r| format!("{} {}", r.kind, r.status)).collect();
        bar.set_message(running.join(", "));
        if done == ids.len() {
            bar.finish_and_clear();
            return Ok(rows);
        }
        if tokio::time::Instant::now() > deadline {
            bar.abandon();
            anyhow::bail!("timed out after {timeout:?} waiting for {} job(s)", ids.len() - done);
        }
    }
}

async fn print_results(pool: &sqlx::PgPool, rows: &[JobRow]) -> anyhow::Result<()> {
    for row in rows {
        let secs = match (row.started_at, row.finished_at) {
            (Some(s), Some(f)) => format!("{:.1}s", (f - s).num_milliseconds() as f64 / 1000.0),
            _ => "-".into(),
        };
        println!(
            "{} {:<6} {:<9} {secs:>7}  {}",
            remote::redact(&row.uri),
            row.kind,
            row.status,
            row.summary.as_ref().map(ToString::to_string).unwrap_or_default()
        );
        if let Some(err) = &row.last_error {
            println!("    reason: {err}");
        }
        if let Some(id) = &row.external_id {
            println!("    external id: {id}");
        }
        if row.status != JobStatus::Succeeded {
            continue;
        }
        if row.kind == "index" {
            let segments: Vec<(f64, f64, String)> =
                sqlx::query_as("SELECT start_s, end_s, text FROM transcript_segments WHERE video_id = $1 ORDER BY idx LIMIT 12")
                    .bind(row.video_id)
                    .fetch_all(pool)
                    .await?;
            for (start, end, text) in segments {
                println!("    [{start:6.2} → {end:6.2}] {}", text.trim());
            }
        } else {
            let scenes: Vec<(i32, f64, f64, i32, i64)> = sqlx::query_as(
                "SELECT s.idx, s.start_s, s.end_s, s.frame_count,
                        (SELECT count(*) FROM faces f JOIN frames fr ON fr.video_id = f.video_id AND fr.idx = f.frame_idx
                          WHERE f.video_id = s.video_id AND fr.scene_idx = s.idx)
                 FROM scenes s WHERE s.video_id = $1 ORDER BY s.idx",
            )
            .bind(row.video_id)
            .fetch_all(pool)
            .await?;
            for (idx, start, end, frames, faces) in scenes {
                println!("    scene {idx}: {start:6.2} → {end:6.2}  {frames} frames, {faces} face detections");
            }
        }
    }
    Ok(())
}
