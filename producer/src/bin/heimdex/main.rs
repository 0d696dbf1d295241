//! `heimdex`: enqueue videos, watch the fleet, search, export transcripts, delete videos (one, or those
//! past the retention period), inspect, replay and purge dead letters, migrate the schema, serve the
//! HTTP API and status page.
//!
//! Exit codes: 0 success; 1 a job failed (with `--wait`) or an operation failed; 2 input refused
//! (nothing was written); 3 no worker answered a search's query (none warm, or none in time).

mod delete;
mod dlq;
mod enqueue;
mod search;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "heimdex", version, about = "Heimdex video indexing: enqueue, status, search, transcripts, dead letters, migrations")]
struct Cli {
    /// TOML configuration file; `HEIMDEX__SECTION__KEY` environment variables override it.
    #[arg(long, global = true, env = "HEIMDEX_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate and enqueue videos (paths under the media root, http(s) URLs, s3://bucket/key).
    Enqueue(enqueue::Args),
    /// Live workers, queue depths, job counts, or one job's stage timings.
    Status(status::Args),
    /// Transcript segments or frames by a text (query vectors from the warm workers), or frames like
    /// a stored frame.
    Search(search::Args),
    /// Dead-letter queues: list what is there and why, replay it, or purge it.
    Dlq {
        #[command(subcommand)]
        command: dlq::Command,
    },
    /// Delete a video and all its rows (results, checkpoints, jobs); refused while a job of it runs,
    /// unless --force.
    Delete(delete::DeleteArgs),
    /// Delete every video whose jobs all ended more than `retention.days` days ago.
    Sweep(delete::SweepArgs),
    /// Export a video's transcript (by video id, or its path or URL as enqueued).
    Transcript {
        video: String,
        #[arg(long, value_enum, default_value = "srt")]
        format: heimdex_producer::transcript::Format,
        /// Time each word inside its WebVTT cue (`--format vtt`; json always carries the words).
        #[arg(long)]
        words: bool,
    },
    /// Bring the database schema up to date (migrations, vector indexes, the worker role's rights); run
    /// as the schema's owner. Workers never change the schema.
    Migrate,
    /// Serve the HTTP API (enqueue, jobs, transcripts, status) and the status page at `/`.
    Serve {
        /// Address to listen on (port 0 picks a free port; the address is printed). A non-loopback
        /// address needs `serve.api_keys`.
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: std::net::SocketAddr,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match heimdex_shared::config::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("heimdex: {e}");
            return ExitCode::from(2);
        }
    };
    let mut log = settings.log.clone();
    log.filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
    heimdex_shared::telemetry::init(&log);
    let result = match cli.command {
        Command::Enqueue(args) => enqueue::run(&settings, args).await,
        Command::Status(args) => status::run(&settings, args).await,
        Command::Search(args) => search::run(&settings, args).await,
        Command::Dlq { command } => dlq::run(&settings, command).await,
        Command::Delete(args) => delete::delete(&settings, args).await,
        Command::Sweep(args) => delete::sweep(&settings, args).await,
        Command::Transcript { video, format, words } => transcript(&settings, &video, format, words).await,
        Command::Migrate => migrate(&settings).await,
        Command::Serve { addr } => serve(&settings, addr).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("heimdex: {}", heimdex_shared::telemetry::chain(e.as_ref()));
            ExitCode::from(1)
        }
    }
}

async fn transcript(
    settings: &heimdex_shared::Settings,
    video: &str,
    format: heimdex_producer::transcript::Format,
    words: bool,
) -> anyhow::Result<ExitCode> {
    use heimdex_producer::transcript::{self, Format, TranscriptError};
    if words && format != Format::Vtt {
        eprintln!("heimdex: --words times words in WebVTT cues: use it with --format vtt");
        return Ok(ExitCode::from(2));
    }
    let pool = heimdex_shared::db::pool(&settings.database)?;
    match transcript::load(&pool, settings, video).await {
        Ok(t) => {
            print!("{}", transcript::render(&t, format, words));
            Ok(ExitCode::SUCCESS)
        }
        Err(e @ (TranscriptError::NoVideo(_) | TranscriptError::NotIndexed { .. })) => {
            eprintln!("heimdex: {e}");
            Ok(ExitCode::from(2))
        }
        Err(e) => Err(e.into()),
    }
}

async fn migrate(settings: &heimdex_shared::Settings) -> anyhow::Result<ExitCode> {
    let pool = heimdex_shared::db::pool(&settings.database)?;
    heimdex_shared::db::migrate(&pool, settings).await?;
    let role = settings.database.worker_role.trim();
    if role.is_empty() {
        println!("schema up to date at {}", settings.database.url);
    } else {
        println!("schema up to date at {}; role {role:?} may read and write its rows", settings.database.url);
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(settings: &heimdex_shared::Settings, addr: std::net::SocketAddr) -> anyhow::Result<ExitCode> {
    use heimdex_producer::serve::ServeError;
    let announce = |bound| println!("listening on http://{bound}");
    match heimdex_producer::serve::serve(settings, addr, announce, heimdex_shared::shutdown::shutdown_signal()).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e @ ServeError::Refused(_)) => {
            eprintln!("heimdex: {e}");
            Ok(ExitCode::from(2))
        }
        Err(e) => Err(e.into()),
    }
}
