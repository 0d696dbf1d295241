//! The baselines that the streaming transcription is measured against, built on the index pipeline's
//! public API: every speech chunk of a file collected first (a task streams them instead and never
//! holds a whole file's), then transcribed one after another or all at once (batched).

use std::sync::Arc;

use heimdex_worker::TaskError;
use heimdex_worker::engine::InferenceError;
use heimdex_worker::index::Prompt;
use heimdex_worker::index::chunker::{SpeechChunk, StreamStats, stream_chunks};
use heimdex_worker::index::{Segment, Transcriber};
use heimdex_worker::media::audio::PcmStream;
use tokio::sync::mpsc;

/// Every speech chunk of `uri`, through the same decoder, VAD and chunker as a task.
///
/// # Errors
/// As [`Transcriber::transcribe`].
pub async fn collect_chunks(t: &Transcriber, uri: &str) -> Result<(Vec<SpeechChunk>, StreamStats), TaskError> {
    let stream = PcmStream::open(uri, t.max_duration_s)?;
    let (tx, mut rx) = mpsc::channel(4);
    let collect = async move {
        let mut chunks = Vec::new();
        while let Some(c) = rx.recv().await {
            chunks.push(c);
        }
        chunks
    };
    let (stats, chunks) = tokio::join!(stream_chunks(stream, &t.vad, t.params, Arc::default(), tx), collect);
    Ok((chunks, stats?))
}

/// Transcribes ready chunks, all at once (so the Whisper thread batches them) or one after another.
///
/// # Errors
/// Inference failed.
pub async fn transcribe_chunks(
    t: &Transcriber,
    chunks: Vec<SpeechChunk>,
    language: Option<u32>,
    parallel: bool,
) -> Result<Vec<Segment>, InferenceError> {
    let mut out = Vec::new();
    if parallel {
        for c in futures::future::try_join_all(chunks.into_iter().map(|c| t.chunk(c, Prompt::transcribe(language)))).await? {
            out.extend(c.segments);
        }
    } else {
        for c in chunks {
            out.extend(t.chunk(c, Prompt::transcribe(language)).await?.segments);
        }
    }
    Ok(out)
}
