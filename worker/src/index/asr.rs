//! From audio to timed text: stream speech chunks out of the VAD chunker, compute each chunk's
//! log-mel off the runtime, and send the chunks to the one shared Whisper thread concurrently (it
//! batches them, with chunks of other tasks), a bounded number in flight.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use super::chunker::{ChunkParams, SpeechChunk, StreamStats, stream_chunks};
use super::decode::{WhisperConfig, segments};
use super::mel::LogMel;
use super::persist::Segment;
use super::vad::VadRunner;
use super::whisper::{AsrRequest, AsrResult, WhisperRunner};
use crate::engine::{InferenceError, ModelHandle};
use crate::error::TaskError;
use crate::media::audio::PcmStream;

/// The models and tables a transcription needs; cheap to clone.
#[derive(Clone)]
pub struct Transcriber {
    pub cfg: Arc<WhisperConfig>,
    pub text: Arc<Tokenizer>,
    pub mel: LogMel,
    pub vad: ModelHandle<VadRunner>,
    pub asr: ModelHandle<WhisperRunner>,
    pub params: ChunkParams,
    pub max_tokens: usize,
    pub max_duration_s: f64,
}

/// Segments of a whole audio stream.
#[derive(Clone, Debug, Default)]
pub struct Transcript {
    pub segments: Vec<Segment>,
    /// Language token id per chunk, with the chunk's speech length (for the video's language).
    pub languages: Vec<(u32, f64)>,
    pub stats: StreamStats,
    /// Most samples the chunker ever buffered.
    pub peak_buffer: usize,
}

impl Transcriber {
    /// Language token of an ISO code (`en`).
    ///
    /// # Errors
    /// [`TaskError::Permanent`] for a code Whisper does not know.
    pub fn language_token(&self, code: &str) -> Result<u32, TaskError> {
        self.cfg
            .language_ids
            .get(code)
            .copied()
            .ok_or_else(|| TaskError::permanent(format!("unknown language code {code:?} (Whisper knows {} languages)", self.cfg.language_ids.len())))
    }

    /// ISO code of a language token.
    pub fn language_code(&self, token: u32) -> String {
        self.cfg.language_ids.iter().find(|(_, t)| **t == token).map(|(c, _)| c.clone()).unwrap_or_default()
    }

    /// Decoded text of tokens (timestamps and special tokens dropped).
    pub fn decode_text(&self, tokens: &[u32]) -> String {
        let eot = self.cfg.special_tokens.eot;
        let text: Vec<u32> = tokens.iter().copied().filter(|&t| t < eot).collect();
        self.text.decode(&text, true).map(|s| s.trim().to_string()).unwrap_or_default()
    }

    /// Decodes one window (≤ 30 s of samples) with the given prompt options.
    ///
    /// # Errors
    /// Inference failed.
    pub async fn decode_window(
        &self,
        samples: Vec<f32>,
        language: Option<u32>,
        timestamps: bool,
        kv_cache: bool,
    ) -> Result<AsrResult, InferenceError> {
        let mel = self.mel.clone();
        let features = tokio::task::spawn_blocking(move || mel.compute(&samples))
            .await
            .map_err(|e| InferenceError::Model { model: "mel".into(), message: e.to_string() })?;
        self.asr
            .infer(AsrRequest { mel: features, language, timestamps, kv_cache, max_tokens: self.max_tokens })
            .await
    }

    /// Transcribes one speech chunk into segments with absolute times.
    ///
    /// # Errors
    /// Inference failed.
    pub async fn chunk(&self, chunk: SpeechChunk, language: Option<u32>) -> Result<(Vec<Segment>, u32, f64), InferenceError> {
        let (offset, dur) = (chunk.offset_s, chunk.duration_s());
        let res = self.decode_window(chunk.samples, language, true, true).await?;
        let segs = segments(&res.tokens, &res.probs, &self.cfg, dur as f32)
            .into_iter()
            .filter_map(|s| {
                let text = self.decode_text(&s.tokens);
                (!text.is_empty()).then(|| Segment {
                    start_s: offset + f64::from(s.start_s),
                    end_s: offset + f64::from(s.end_s),
                    text,
                    confidence: s.confidence,
                    embedding: Vec::new(),
                })
            })
            .collect();
        Ok((segs, res.language, dur))
    }

    /// Streams `uri` through ffmpeg and the chunker and transcribes the chunks as they come, at most
    /// `in_flight` at once.
    ///
    /// # Errors
    /// Permanent for undecodable or over-long audio; retryable for inference failures.
    pub async fn transcribe(&self, uri: &str, language: Option<u32>, in_flight: usize) -> Result<Transcript, TaskError> {
        let stream = PcmStream::open(uri, self.max_duration_s)?;
        let peak = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = mpsc::channel::<SpeechChunk>(2);
        let producer = stream_chunks(stream, &self.vad, self.params, peak.clone(), tx);
        let consumer = async move {
            let mut pending = FuturesOrdered::new();
            let mut out = Transcript::default();
            let mut open = true;
            loop {
                tokio::select! {
                    chunk = rx.recv(), if open && pending.len() < in_flight.max(1) => match chunk {
                        Some(chunk) => pending.push_back(self.chunk(chunk, language)),
                        None => open = false,
                    },
                    Some(done) = pending.next(), if !pending.is_empty() => {
                        let (segs, lang, dur) = done?;
                        out.segments.extend(segs);
                        out.languages.push((lang, dur));
                    }
                    else => break,
                }
            }
            Ok::<_, TaskError>(out)
        };
        let (stats, transcript) = tokio::join!(producer, consumer);
        let stats = stats?;
        let mut transcript = transcript?;
        transcript.stats = stats;
        transcript.peak_buffer = peak.load(std::sync::atomic::Ordering::Relaxed);
        Ok(transcript)
    }

    /// Collects every speech chunk of `uri` (for tests and the benchmark; tasks stream instead).
    ///
    /// # Errors
    /// As [`Transcriber::transcribe`].
    pub async fn collect_chunks(&self, uri: &str) -> Result<(Vec<SpeechChunk>, StreamStats), TaskError> {
        let stream = PcmStream::open(uri, self.max_duration_s)?;
        let (tx, mut rx) = mpsc::channel(4);
        let collect = async move {
            let mut chunks = Vec::new();
            while let Some(c) = rx.recv().await {
                chunks.push(c);
            }
            chunks
        };
        let (stats, chunks) = tokio::join!(stream_chunks(stream, &self.vad, self.params, Arc::default(), tx), collect);
        Ok((chunks, stats?))
    }

    /// Transcribes ready chunks, all at once (batched) or one after another (the benchmark's baseline).
    ///
    /// # Errors
    /// Inference failed.
    pub async fn transcribe_chunks(
        &self,
        chunks: Vec<SpeechChunk>,
        language: Option<u32>,
        parallel: bool,
    ) -> Result<Vec<Segment>, InferenceError> {
        let mut out = Vec::new();
        if parallel {
            for (segs, _, _) in futures::future::try_join_all(chunks.into_iter().map(|c| self.chunk(c, language))).await? {
                out.extend(segs);
            }
        } else {
            for c in chunks {
                out.extend(self.chunk(c, language).await?.0);
            }
        }
        Ok(out)
    }
}
