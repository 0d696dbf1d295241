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
