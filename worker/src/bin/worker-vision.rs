//! `worker-vision`: frames, scenes, image embeddings and faces.

use heimdex_shared::contract::TaskKind;
use heimdex_shared::shutdown::shutdown_signal;
use heimdex_worker::vision::VisionPipeline;

#[tokio::main]
async fn main() {
    let result = async {
        let settings = heimdex_worker::cli::init()?;
        heimdex_worker::runtime::run(settings, TaskKind::Vision, VisionPipeline::load, shutdown_signal()).await
    };
    heimdex_worker::cli::exit(result.await)
}
