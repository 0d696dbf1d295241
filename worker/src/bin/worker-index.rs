//! `worker-index`: speech to text and transcript embeddings.

use heimdex_shared::contract::TaskKind;
use heimdex_shared::shutdown::shutdown_signal;
use heimdex_worker::index::IndexPipeline;

#[tokio::main]
async fn main() {
    let result = async {
        let settings = heimdex_worker::cli::init()?;
        heimdex_worker::runtime::run(settings, TaskKind::Index, IndexPipeline::load, shutdown_signal()).await
    };
    heimdex_worker::cli::exit(result.await)
}
