//! `heimdex-models`: fetch the default models from upstream (`download`) or check a model directory
//! (`verify`) without starting a worker.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use heimdex_shared::config::ModelSettings;
use heimdex_worker::engine::download::CATALOG;
use heimdex_worker::engine::registry::ModelRegistry;

#[derive(Parser)]
#[command(about = "Download or verify Heimdex model files")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download every missing file of the default models (resumable, checksummed).
    Download {
        #[arg(long, env = "HEIMDEX__MODELS__DIR")]
        dir: PathBuf,
    },
    /// Verify every file of the default models present in DIR.
    Verify {
        #[arg(long, env = "HEIMDEX__MODELS__DIR")]
        dir: PathBuf,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    heimdex_shared::telemetry::init(&heimdex_shared::config::LogSettings::default());
    let (dir, download) = match Args::parse().command {
        Command::Download { dir } => (dir, true),
        Command::Verify { dir } => (dir, false),
    };
    let registry = ModelRegistry::open(&ModelSettings { dir, download })?;
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for entry in CATALOG {
            let path = registry.file(entry.path)?;
            println!("ok  {}", path.display());
        }
        Ok(())
    })
    .await??;
    Ok(())
}
