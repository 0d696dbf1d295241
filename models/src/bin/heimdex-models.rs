//! `heimdex-models`: install the default models from upstream (`download`) or check a model
//! directory (`verify`) without starting a worker.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use heimdex_models::catalog::{MODELS, Model};
use heimdex_models::install::{Installation, install};
use heimdex_models::registry::{ModelRegistry, parse_manifest};
use heimdex_shared::contract::TaskKind;

#[derive(Parser)]
#[command(about = "Download or verify Heimdex model files")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the models of the worker kinds (default: both): fetch each pinned upstream file
    /// (resumable, sha256-checked), build what upstream does not ship (Whisper's and MiniLM's ONNX
    /// graphs, the mel filter bank), check every file against its pin. Instant when all are there.
    Download {
        #[arg(long, env = "HEIMDEX__MODELS__DIR")]
        dir: PathBuf,
        /// Only the models of this worker kind (repeatable).
        #[arg(long)]
        kind: Vec<TaskKind>,
        /// Fetch from this mirror, laid out as Hugging Face serves files
        /// (`{mirror}/{repo}/resolve/{revision}/{path}`), instead of upstream.
        #[arg(long, env = "HEIMDEX_MODELS_MIRROR")]
        mirror: Option<String>,
    },
    /// Check every file the directory's MANIFEST.sha256 lists and every pinned default model file
    /// present in it; exit 1 naming any file that is missing or does not match.
    Verify {
        #[arg(long, env = "HEIMDEX__MODELS__DIR")]
        dir: PathBuf,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    heimdex_shared::telemetry::init(&heimdex_shared::config::LogSettings::default());
    match Args::parse().command {
        Command::Download { dir, kind, mirror } => {
            let chosen: Vec<&Model> = MODELS.iter().filter(|m| kind.is_empty() || kind.contains(&m.kind)).collect();
            for model in chosen {
                let outcome = install(&dir, model, mirror.as_deref()).await?;
                let said = match outcome {
                    Installation::Present => "present",
                    Installation::Installed => "installed",
                };
                println!("{said:9}  {}", dir.join(model.folder).display());
            }
        }
        Command::Verify { dir } => {
            let registry = ModelRegistry::open(&dir)?;
            let manifest = std::fs::read_to_string(dir.join("MANIFEST.sha256")).unwrap_or_default();
            let mut files: Vec<String> = parse_manifest(&manifest).map(|(path, _)| path).collect();
            let pinned = MODELS.iter().flat_map(|m| m.files).map(|f| f.path.to_string());
            files.extend(pinned.filter(|p| dir.join(p).is_file()));
            files.sort();
            files.dedup();
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                for rel in files {
                    println!("ok  {}", registry.file(&rel)?.display());
                }
                Ok(())
            })
            .await??;
        }
    }
    Ok(())
}
