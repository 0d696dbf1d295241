//! What the worker binaries share: `--config FILE`, settings, tracing, the shutdown signal.

use std::path::PathBuf;

use clap::Parser;
use heimdex_shared::Settings;

/// Command line of `worker-index` and `worker-vision`. Everything else is configuration:
/// `HEIMDEX__SECTION__KEY` environment variables override the file.
#[derive(Debug, Parser)]
pub struct WorkerArgs {
    /// TOML configuration file (see deploy/heimdex.example.toml).
    #[arg(long, env = "HEIMDEX_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Parses arguments, loads settings and installs tracing.
///
/// # Errors
/// Invalid configuration.
pub fn init() -> anyhow::Result<Settings> {
    let args = WorkerArgs::parse();
    let settings = heimdex_shared::config::load(args.config.as_deref())?;
    heimdex_shared::telemetry::init(&settings.log);
    Ok(settings)
}

/// Ends the process with the worker's result (exit code 0 or 1, the error and its causes on stderr).
///
/// Why not return from `main`: dropping the tokio runtime waits for blocking tasks, and a model load
/// interrupted by SIGTERM may still be running on one; the worker must stop promptly in any state.
/// The error is a log event like every other line (a JSON line where the logs are JSON), unless it
/// came before logging was set up (invalid configuration): then it is plain text.
pub fn exit(result: anyhow::Result<()>) -> ! {
    if let Err(e) = &result {
        if tracing::dispatcher::has_been_set() {
            tracing::error!(error = %format_args!("{e:#}"), "fatal: the worker exits");
        } else {
            eprintln!("Error: {e:?}");
        }
    }
    std::process::exit(i32::from(result.is_err()))
}
