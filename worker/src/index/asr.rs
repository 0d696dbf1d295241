//! From audio to timed text: stream speech chunks out of the VAD chunker, pack their speech densely into
//! windows (see [`super::pack`]), compute each window's log-mel off the runtime, and send the windows
//! to the one shared Whisper thread concurrently (it batches them, with windows of other tasks), a
//! bounded number in flight. When a window's output
//! stops before the chunk's speech does, the rest of the chunk is decoded from where it stopped.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use futures::future::Either;
use futures::stream::FuturesOrdered;
use futures::{StreamExt, TryFutureExt};
use heimdex_shared::contract::SpeechTask;
use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use super::align;
use super::checkpoint::{Checkpoints, WindowText};
use super::chunker::{ChunkParams, SpeechChunk, StreamStats, stream_chunks};
use super::decode::{WhisperConfig, covered, segments};
use super::mel::LogMel;
use super::pack::{Packed, Packer, audio_time};
use super::persist::{Segment, Word};
use super::vad::VadRunner;
use super::whisper::{AsrRequest, AsrResult, Prompt, WhisperRunner};
use crate::engine::{InferenceError, ModelHandle};
use crate::error::TaskError;
use crate::media::audio::{PcmStream, SAMPLE_RATE};

/// Most decoding passes over one chunk. Each pass resumes at least one finished segment later, and a
/// 30 s chunk rarely needs a second; this only bounds a model that keeps stopping early.
const MAX_PASSES: usize = 6;
/// Speech the VAD heard after a window's last closing timestamp that makes the window incomplete.
/// A closing timestamp can sit a little before the end of the speech it closes (at most 0.48 s over
/// the 28 chunks of the 10-minute recording); a sentence left out leaves seconds.
pub const UNHEARD_SPEECH_S: f64 = 1.0;

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
    /// Time each segment's words (`index.word_timestamps`; see [`super::align`]).
    pub words: bool,
    /// Pack the speech of consecutive chunks densely into windows (always in production); off, each
    /// chunk is one window: the benchmark's baseline for what packing does.
    #[cfg(feature = "testing")]
    pub pack: bool,
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
    /// Whisper windows transcribed, and how many of them an earlier run's checkpoints supplied.
    pub windows: usize,
    pub resumed_windows: usize,
}

impl Transcriber {
    /// Language token of an ISO code (`en`).
    ///
    /// # Errors
    /// [`TaskError::Permanent`] for a code Whisper does not know.
    pub fn language_token(&self, code: &str) -> Result<u32, TaskError> {
        self.cfg.language_ids.get(code).copied().ok_or_else(|| {
            TaskError::permanent(format!("unknown language code {code:?} (Whisper knows {} languages)", self.cfg.language_ids.len()))
        })
    }

    /// The prompt of a task's windows: its language (`None` or empty: detected) and Whisper's task.
    ///
    /// # Errors
    /// [`TaskError::Permanent`] for a language Whisper does not know, or a translation asked of a
    /// model that cannot translate.
    pub fn prompt(&self, language: Option<&str>, task: SpeechTask) -> Result<Prompt, TaskError> {
        let language = language.filter(|l| !l.is_empty()).map(|l| self.language_token(l)).transpose()?;
        if task == SpeechTask::Translate && self.cfg.special_tokens.translate.is_none() {
            return Err(TaskError::permanent("options.task is translate, but this Whisper model is English-only and cannot translate"));
        }
        Ok(Prompt { language, task })
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

    /// Whether speech is packed into windows (see [`Transcriber::pack`]).
    #[cfg(feature = "testing")]
    pub(crate) fn packs(&self) -> bool {
        self.pack
    }

    /// Whether speech is packed into windows: always, in production.
    #[cfg(not(feature = "testing"))]
    pub(crate) fn packs(&self) -> bool {
        true
    }

    /// Decodes one window (≤ 30 s of samples) with the given prompt options.
    ///
    /// # Errors
    /// Inference failed.
    pub async fn decode_window(&self, samples: Vec<f32>, prompt: Prompt, timestamps: bool) -> Result<AsrResult, InferenceError> {
        let positions = samples.len() / (SAMPLE_RATE as usize / align::POSITIONS_PER_S as usize);
        let mel = self.log_mel(samples).await?;
        let request = AsrRequest::new(mel, prompt, timestamps, self.max_tokens);
        self.asr.infer(AsrRequest { word_positions: (self.words && timestamps).then_some(positions), ..request }).await
    }

    /// Decodes one window as [`Transcriber::decode_window`] does, but without the KV cache: the
    /// reference the KV-cache decoder is checked and measured against (`testing` feature).
    ///
    /// # Errors
    /// Inference failed.
    #[cfg(feature = "testing")]
    pub async fn decode_window_without_cache(
        &self,
        samples: Vec<f32>,
        prompt: Prompt,
        timestamps: bool,
    ) -> Result<AsrResult, InferenceError> {
        let mel = self.log_mel(samples).await?;
        self.asr.infer(AsrRequest { kv_cache: false, ..AsrRequest::new(mel, prompt, timestamps, self.max_tokens) }).await
    }

    /// Whisper's log-mel features of a window, computed off the runtime.
    async fn log_mel(&self, samples: Vec<f32>) -> Result<Vec<f32>, InferenceError> {
        let mel = self.mel.clone();
        tokio::task::spawn_blocking(move || mel.compute(&samples))
            .await
            .map_err(|e| InferenceError::Model { model: "mel".into(), message: e.to_string() })
    }

    /// Transcribes one speech chunk into segments with absolute times.
    ///
    /// One window's output does not always cover the chunk: Whisper may end it with a segment left
    /// open (its timestamp grammar for "continue from here in the next window"), or close a segment
    /// and stop although more speech follows (it does so on repeated speech, and after the loop guard
    /// cuts a row). Whatever follows the point where the final output ends would be lost, so while
    /// the VAD heard speech after that point (any, after an open segment; more than
    /// [`UNHEARD_SPEECH_S`] after a closed one, which timestamp rounding does not explain) the rest of
    /// the chunk is decoded as a new window starting there, as `openai-whisper` seeks. The first
    /// pass's language is kept.
    ///
    /// # Errors
    /// Inference failed.
    pub async fn chunk(&self, chunk: SpeechChunk, prompt: Prompt) -> Result<WindowText, InferenceError> {
        let offset = chunk.offset_s;
        let rate = f64::from(SAMPLE_RATE);
        let mut out = Vec::new();
        let mut prompt = prompt;
        let mut start = 0usize;
        for pass in 1..=MAX_PASSES {
            let from_s = start as f64 / rate;
            let window = chunk.samples[start..].to_vec();
            let window_s = window.len() as f64 / rate;
            let res = self.decode_window(window, prompt, true).await?;
            prompt.language = Some(res.language);
            let resume = covered(&res.tokens, &self.cfg).filter(|c| {
                let unheard = chunk.speech_after(from_s + f64::from(c.until_s));
                let need = if c.unfinished { f64::from(self.params.min_speech_s) } else { UNHEARD_SPEECH_S };
                pass < MAX_PASSES && unheard >= need
            });
            let keep = resume.map_or(res.tokens.len(), |c| c.keep);
            // The text's language, which decides how it splits into words: a translation is English.
            let language = match prompt.task {
                SpeechTask::Transcribe => self.language_code(res.language),
                SpeechTask::Translate => "en".to_string(),
            };
            out.extend(self.timed(&res.tokens[..keep], &res.probs[..keep], &res.token_times, &language, offset + from_s, window_s));
            match resume {
                Some(c) => start = (start + (f64::from(c.until_s) * rate).round() as usize).min(chunk.samples.len()),
                None => break,
            }
        }
        Ok(WindowText {
            index: chunk.index,
            offset_s: offset,
            duration_s: chunk.duration_s(),
            segments: out,
            language: prompt.language.unwrap_or_default(),
        })
    }

    /// Transcribes one packed window (see [`super::pack`]) into segments on the recording's clock.
    ///
    /// # Errors
    /// Inference failed.
    pub async fn packed(&self, window: Packed, prompt: Prompt) -> Result<WindowText, InferenceError> {
        let offset_s = window.start_s();
        let Packed { chunk, pieces } = window;
        let speech = chunk.speech.clone();
        let mut text = self.chunk(chunk, prompt).await?;
        align::fit_to_speech(&mut text.segments, &pieces, &speech);
        let centi = |t: f64| (t * 100.0).round() / 100.0;
        for s in &mut text.segments {
            for w in &mut s.words {
                w.start_s = centi(audio_time(&pieces, w.start_s, false));
                w.end_s = centi(audio_time(&pieces, w.end_s, true)).max(w.start_s);
            }
            // With words, a segment spans them, as faster-whisper's do: their times are the finer
            // ones (fitted to the speech the VAD heard), and words never overlap, so neither do segments.
            (s.start_s, s.end_s) = match (s.words.first(), s.words.last()) {
                (Some(first), Some(last)) => (first.start_s, last.end_s),
                _ => {
                    let start = audio_time(&pieces, s.start_s, false);
                    (start, audio_time(&pieces, s.end_s, true).max(start))
                }
            };
        }
        text.offset_s = offset_s;
        Ok(text)
    }

    /// Segments of one window's tokens, with absolute times (`offset_s`: where the window starts),
    /// and their words where `token_times` times the window's text tokens (see [`AsrResult`]).
    fn timed(&self, tokens: &[u32], probs: &[f32], token_times: &[f32], language: &str, offset_s: f64, window_s: f64) -> Vec<Segment> {
        let mut text_tokens = 0;
        let mut out: Vec<Segment> = Vec::new();
        for s in segments(tokens, probs, &self.cfg, window_s as f32) {
            let n = s.tokens.len();
            let words = match token_times.get(text_tokens..=text_tokens + n) {
                Some(times) => align::words(&s.tokens, &s.probs, times, language, |t| self.text.decode(t, false).unwrap_or_default()),
                None => Vec::new(),
            };
            text_tokens += n;
            let text = self.decode_text(&s.tokens);
            if text.is_empty() {
                continue;
            }
            let words = words.into_iter().map(|w| Word { start_s: offset_s + w.start_s, end_s: offset_s + w.end_s, ..w }).collect();
            out.push(Segment {
                start_s: offset_s + f64::from(s.start_s),
                end_s: offset_s + f64::from(s.end_s),
                text,
                confidence: s.confidence,
                embedding: Vec::new(),
                words,
            });
        }
        align::clamp_long_words(&mut out);
        out
    }

    /// Streams `uri` through ffmpeg and the chunker and transcribes the chunks as they come, at most
    /// two batches' worth of windows at once. With `checkpoints`, windows an earlier run stored are
    /// taken from there and every window decoded now is stored as soon as it and those before it are
    /// done.
    ///
    /// Why two batches: with one batch's worth in flight, the model thread alternated a batch of 1
    /// (the first window to arrive, run at once) with a batch of 3 (those that came meanwhile), and a
    /// decoder step costs nearly the same for 1 row as for 4; with two, batches are full: the 600 s
    /// recording 7 % faster (14 windows: batches 4 4 4 1 1 instead of 1 3 1 3 1 3 1 1). A waiting
    /// window holds its 30 s of samples (1.9 MB).
    ///
    /// # Errors
    /// Permanent for undecodable or over-long audio; retryable for inference failures.
    pub async fn transcribe(&self, uri: &str, prompt: Prompt, mut checkpoints: Option<&mut Checkpoints>) -> Result<Transcript, TaskError> {
        let in_flight = 2 * self.asr.max_batch().max(1);
        let stream = PcmStream::open(uri, self.max_duration_s)?;
        let peak = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = mpsc::channel::<SpeechChunk>(2);
        let producer = stream_chunks(stream, &self.vad, self.params, peak.clone(), tx);
        let consumer = async move {
            let mut pending = FuturesOrdered::new();
            let mut out = Transcript::default();
            let mut packer = Packer::new(self.params);
            let mut ready: VecDeque<Packed> = VecDeque::new();
            let mut open = true;
            loop {
                while pending.len() < in_flight {
                    let Some(window) = ready.pop_front() else { break };
                    match checkpoints.as_deref_mut().and_then(|c| c.reuse(&window)) {
                        Some(done) => pending.push_back(Either::Left(std::future::ready(Ok((done, true))))),
                        None => pending.push_back(Either::Right(self.packed(window, prompt).map_ok(|c| (c, false)))),
                    }
                }
                tokio::select! {
                    chunk = rx.recv(), if open && ready.is_empty() => match chunk {
                        Some(chunk) if self.packs() => ready.extend(packer.push(&chunk)),
                        Some(chunk) => ready.push_back(Packed::whole(chunk)),
                        None => {
                            open = false;
                            ready.extend(packer.flush());
                        }
                    },
                    Some(done) = pending.next(), if !pending.is_empty() => {
                        let (window, reused) = done?;
                        out.windows += 1;
                        if reused {
                            out.resumed_windows += 1;
                        } else if let Some(store) = checkpoints.as_deref()
                            && let Err(e) = store.save(&window).await
                        {
                            // Only a later redelivery would miss it; this run goes on.
                            tracing::warn!(error = %e, window = window.index, "could not store the window's checkpoint");
                        }
                        out.languages.push((window.language, window.duration_s));
                        out.segments.extend(window.segments);
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
}
