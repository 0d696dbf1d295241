//! `worker-index`: speech to text and transcript embeddings.

use heimdex_shared::contract::TaskKind;
use heimdex_shared::shutdown::shutdown_signal;
use heimdex_worker::probe_pipeline::ProbePipeline;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = heimdex_worker::cli::init()?;
    heimdex_worker::runtime::run(settings, TaskKind::Index, |_| Ok(ProbePipeline(TaskKind::Index)), shutdown_signal()).await
}
