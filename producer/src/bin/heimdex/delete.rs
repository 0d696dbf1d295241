//! `heimdex delete VIDEO [--force]` and `heimdex sweep [--days N]`: forget a video, or every video
//! older than the retention period (`retention.days`), through `heimdex_shared::delete`.

use std::process::ExitCode;

use heimdex_producer::transcript;
use heimdex_shared::Settings;
use heimdex_shared::delete::{self, DeleteError, Deleted};
use heimdex_shared::remote;

#[derive(clap::Args)]
pub struct DeleteArgs {
    /// The video: its id, or its path or URL as it was enqueued.
    video: String,
    /// Delete even while a job of the video runs: the run is superseded (its writes are refused) and
    /// its worker stops it within seconds.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
pub struct SweepArgs {
    /// Keep this many days instead of `retention.days`.
    #[arg(long)]
    days: Option<u32>,
}

/// One line saying what a delete removed.
fn describe(d: &Deleted) -> String {
    let mut line = format!(
        "deleted video {} ({}): {} segments, {} frames, {} faces, {} scenes, {} checkpoints, {} jobs",
        d.video_id,
        remote::redact(&d.uri),
        d.segments,
        d.frames,
        d.faces,
        d.scenes,
        d.checkpoints,
        d.jobs
    );
    if d.superseded_runs > 0 {
        line += &format!("; {} running job(s) stopped", d.superseded_runs);
    }
    line
}

pub async fn delete(settings: &Settings, args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let pool = heimdex_shared::db::pool(&settings.database)?;
    let Some((video_id, _)) = transcript::find_video(&pool, settings, &args.video).await? else {
        eprintln!("heimdex: no video {:?} (give its id, or its path or URL as it was enqueued)", remote::redact(&args.video));
        return Ok(ExitCode::from(2));
    };
    match delete::delete_video(&pool, video_id, args.force).await {
        Ok(deleted) => {
            println!("{}", describe(&deleted));
            Ok(ExitCode::SUCCESS)
        }
        Err(e @ (DeleteError::Running { .. } | DeleteError::NoVideo(_))) => {
            let hint = if matches!(e, DeleteError::Running { .. }) { " (--force)" } else { "" };
            eprintln!("heimdex: {e}{hint}; nothing was deleted");
            Ok(ExitCode::from(2))
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn sweep(settings: &Settings, args: SweepArgs) -> anyhow::Result<ExitCode> {
    let days = args.days.unwrap_or(settings.retention.days);
    if days == 0 {
        println!("retention.days is 0: videos are kept forever, nothing to sweep");
        return Ok(ExitCode::SUCCESS);
    }
    let pool = heimdex_shared::db::pool(&settings.database)?;
    let swept = delete::sweep(&pool, days).await?;
    for d in &swept.deleted {
        println!("{}", describe(d));
    }
    println!("{} video(s) older than {days} days deleted, {} skipped (enqueued again meanwhile)", swept.deleted.len(), swept.skipped);
    Ok(ExitCode::SUCCESS)
}
