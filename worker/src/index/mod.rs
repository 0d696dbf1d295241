//! The index pipeline (`worker-index`): audio → Silero VAD speech chunks (≤ 30 s, cut at silences) →
//! speech packed densely into Whisper windows → log-mel → encoder (a row at a time) → greedy KV-cache
//! decoding with timestamps and language detection → segments on the recording's clock, their words
//! timed by the alignment heads → text embeddings → one transaction.
//!
//! Every model is loaded once per process behind its own owner thread (see `engine`); the windows of a
//! video and the windows of concurrent videos share batches on the same sessions.
//!
//! - [`chunker`] and [`vad`]: streaming speech detection and chunking in bounded memory.
//! - [`mel`]: Whisper's exact front end. [`whisper`] and [`decode`]: the model thread and the greedy rules.
//! - [`align`]: word timestamps from the alignment heads' cross-attention.
//! - [`asr`]: the orchestration of one audio stream. [`embed`]: the text encoder. [`persist`]: the output.
//! - [`pack`]: chunks' speech packed into windows. [`checkpoint`]: each window's transcript stored as
//!   it is decoded, so a redelivery resumes.

pub mod align;
pub mod asr;
pub mod checkpoint;
pub mod chunker;
pub mod decode;
pub mod embed;
pub mod mel;
pub mod pack;
pub mod persist;
pub mod vad;
pub mod whisper;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use heimdex_models::quantize::{Activations, Scheme, Scope};
use heimdex_shared::config::IndexSettings;
use heimdex_shared::contract::{SpeechTask, TaskKind};
use heimdex_shared::jobs::FencedRun;
use heimdex_shared::query::Embeddings;

pub use asr::{Transcriber, Transcript};
pub use persist::{IndexOutput, Segment, Word};
pub use whisper::Prompt;

use crate::engine::{InferenceError, Memory, WarmupReport, fused_attention, int8, last_position_logits, scaled_queries};
use crate::error::TaskError;
use crate::media::audio::AudioError;
use crate::pipeline::{LoadContext, ModelInfo, Pipeline, StageTimings, TaskInput};
use checkpoint::Checkpoints;
use chunker::ChunkParams;
use embed::{EmbedRunner, TextEmbedder};
use vad::{FRAME, VadRequest, VadRunner, VadState};
use whisper::{AsrRequest, WhisperRunner};

/// Names of the pipeline's models, one per model thread, used for everything that names a model:
/// [`Pipeline::models`], the warm-up reports (the runtime sums warm-up time per model by name), the
/// model threads and the metrics they label.
pub const WHISPER: &str = "whisper";
pub const SILERO_VAD: &str = "silero-vad";
pub const TEXT_EMBED: &str = "text-embed";

/// Largest Whisper batch (chunks encoded and decoded together). Beyond 4 rows a 2–8 core CPU gains
/// little per row, while warm-up (every batch size) and the cross-attention cache (37 MB a row) grow.
pub const MAX_ASR_BATCH: usize = 4;

/// The loaded index pipeline, shared by every task of the process.
pub struct IndexPipeline {
    settings: IndexSettings,
    transcriber: Transcriber,
    embedder: TextEmbedder,
    models: Vec<ModelInfo>,
    vad_batch: usize,
}

/// Whether Whisper's encoder runs in int8 by rows: with `index.whisper_int8`, on a CPU whose u8×s8
/// GEMM takes the full range (see `IndexPipeline::load`).
fn encoder_int8(settings: &IndexSettings) -> bool {
    settings.whisper_int8 && Activations::for_this_cpu() == Activations::Int8
}

impl IndexPipeline {
    /// Loads and verifies every model of the pipeline and starts their owner threads.
    ///
    /// # Errors
    /// A model file is missing or corrupt, or ONNX Runtime cannot load it.
    pub fn load(ctx: &LoadContext<'_>) -> anyhow::Result<Self> {
        let s = ctx.settings.index.clone();
        let max_batch = ctx.settings.engine.max_batch.max(1);
        // Whisper's three sessions take turns on one thread while VAD runs beside them on the same
        // cores: a pool spinning after its run only takes a core from the next. Without spinning, on
        // the 600 s recording: 21 % less CPU (the spin loop was 21 % of the samples) and 0.95 of the
        // wall time (4 pairs of fresh processes alternating, AMD EPYC with AVX-512 VNNI).
        let engine = ctx.engine.spinning_by_default(false);
        let wfile = |f: &str| ctx.models.file(&format!("{}/{f}", s.whisper_dir)).with_context(|| format!("whisper {f}"));
        // Bounded memory (no arenas): measured with four 600 s recordings at concurrency 4 (bench-index).
        let session =
            |rel: &str, path: &std::path::Path| engine.session_with(path, Memory::Bounded).with_context(|| format!("loading {rel}"));
        let cfg: decode::WhisperConfig = serde_json::from_slice(&std::fs::read(wfile("config.json")?)?).context("whisper config.json")?;
        let text =
            tokenizers::Tokenizer::from_file(wfile("tokenizer.json")?).map_err(|e| anyhow::anyhow!("whisper tokenizer.json: {e}"))?;
        let mel = mel::LogMel::load(&wfile("mel_filters.f32")?)?;
        // decoder_model.onnx is read only for the small cross-attention part the with-past decoder
        // lacks, first, so that its bytes are freed before the other sessions' weights arrive.
        let decoder_model = std::fs::read(wfile("decoder_model.onnx")?).context("reading whisper decoder_model.onnx")?;
        let cross = whisper::cross_cache_model(&decoder_model)?;
        drop(decoder_model);
        // int8 by the scheme that suits the shape (see heimdex_models::quantize). The decoder's steps
        // (a few rows against every weight) gain 1.3–1.7× from MatMulNBits' int8 weights, its greedy
        // tokens the fp32 ones on the bundle's clips. The encoder multiplies 1,500 rows a window:
        // there MatMulNBits is no faster than fp32, and DynamicQuantizeMatMul's one scale per tensor
        // raised the 600 s recording's WER from 2.6 % to 2.9 %; per-row activations (MatMulInteger)
        // make it 1.34× faster on an AVX-512 VNNI CPU with the same words. Only there: without VNNI the
        // u8×s8 GEMM saturates at ±127 (see `Activations`), and with 7-bit activations the encoder was
        // only 1.18× faster and lost a word of the Spanish translate test ("dog"), so it stays fp32.
        // The cross-attention cache
        // stays fp32: by rows it cost two words of the 600 s recording and no measurable time.
        let cross = engine.session_from_memory("whisper cross-attention cache", &cross, Memory::Bounded)?;
        let encoder_rel = "encoder_model.onnx";
        let encoder_path = wfile(encoder_rel)?;
        let encoder = if encoder_int8(&s) || s.whisper_fused_attention {
            let mut bytes = std::fs::read(&encoder_path).with_context(|| format!("reading whisper {encoder_rel}"))?;
            if s.whisper_fused_attention {
                bytes = fused_attention(&format!("whisper {encoder_rel}"), bytes)?;
            }
            if encoder_int8(&s) {
                bytes = int8(&format!("whisper {encoder_rel}"), bytes, Scheme::Rows(Activations::Int8), Scope::All)?;
            }
            engine.session_from_memory(&format!("whisper {encoder_rel}"), &bytes, Memory::Bounded)?
        } else {
            session(encoder_rel, &encoder_path)?
        };
        let with_past_rel = "decoder_with_past_model.onnx";
        let with_past = {
            let name = format!("whisper {with_past_rel}");
            let mut bytes = std::fs::read(wfile(with_past_rel)?).with_context(|| format!("reading {name}"))?;
            // Word timestamps read the alignment heads' cross-attention from the same session: its
            // scores become outputs (an Identity node each; the decoding steps compute them anyway).
            if s.word_timestamps {
                bytes = whisper::expose_alignment(&cfg, bytes)?;
            }
            bytes = scaled_queries(&name, bytes)?;
            // Every use reads one position's logits (see heimdex_models::logits).
            bytes = last_position_logits(&name, bytes)?;
            if s.whisper_int8 {
                bytes = int8(&name, bytes, Scheme::Blocks, Scope::All)?;
            }
            engine.session_from_memory(&name, &bytes, Memory::Bounded)?
        };
        let vad_path = ctx.models.file(&s.vad_model)?;
        let vad_session = session(&s.vad_model, &vad_path)?;
        let embed_rel = format!("{}/{}", s.embed_dir, s.embed_file);
        let embed_path = ctx.models.file(&embed_rel)?;
        let embed_session = session(&embed_rel, &embed_path)?;
        let embed_tok = ctx.models.file(&format!("{}/tokenizer.json", s.embed_dir))?;
        // Whisper is three sessions behind one thread: one model, named by its folder.
        let whisper_path = encoder_path.parent().unwrap_or(&encoder_path);
        let info = |name: &str, path: &std::path::Path| ModelInfo { name: name.into(), path: path.display().to_string() };
        let models = vec![info(WHISPER, whisper_path), info(SILERO_VAD, &vad_path), info(TEXT_EMBED, &embed_path)];

        let asr_batch = max_batch.min(MAX_ASR_BATCH);
        let cfg = Arc::new(cfg);
        let asr = ctx.engine.spawn(
            WHISPER,
            WhisperRunner::new((*cfg).clone(), encoder, cross, with_past, ctx.engine.metrics().clone())?,
            asr_batch,
        );
        let vad = ctx.engine.spawn(SILERO_VAD, VadRunner::new(vad_session), max_batch);
        let runner = EmbedRunner::new(embed_session, s.embed_pooling, s.embed_dim)?;
        let embedder = TextEmbedder::new(&embed_tok, s.embed_max_len, ctx.engine.spawn_eager(TEXT_EMBED, runner, max_batch))?;
        let transcriber = Transcriber {
            cfg,
            text: Arc::new(text),
            mel,
            vad,
            asr,
            params: ChunkParams::new(s.vad_threshold, s.max_chunk_s),
            max_tokens: s.max_decode_tokens,
            max_duration_s: s.max_duration_s,
            words: s.word_timestamps,
            #[cfg(feature = "testing")]
            pack: true,
        };
        Ok(Self { settings: s, transcriber, embedder, models, vad_batch: max_batch })
    }

    pub fn transcriber(&self) -> &Transcriber {
        &self.transcriber
    }

    pub fn embedder(&self) -> &TextEmbedder {
        &self.embedder
    }

    /// Transcribes (or translates) and embeds one media URI, without checkpoints (see
    /// [`Pipeline::process`]).
    ///
    /// # Errors
    /// Permanent for bad audio, retryable for inference failures.
    pub async fn index(
        &self,
        uri: &str,
        language: Option<&str>,
        task: SpeechTask,
        timings: &StageTimings,
    ) -> Result<(IndexOutput, Transcript), TaskError> {
        self.index_run(uri, language, task, None, timings).await
    }

    /// The body of [`Pipeline::process`]: with `fenced` (the run), windows that an earlier run of the
    /// job's generation stored are reused and every window decoded now is stored.
    async fn index_run(
        &self,
        uri: &str,
        language: Option<&str>,
        task: SpeechTask,
        fenced: Option<&FencedRun>,
        timings: &StageTimings,
    ) -> Result<(IndexOutput, Transcript), TaskError> {
        let t = &self.transcriber;
        let prompt = t.prompt(language, task)?;
        let mut checkpoints = match fenced {
            Some(fenced) => Some(Checkpoints::load(fenced.clone(), self.checkpoint_config(prompt)).await?),
            None => None,
        };
        let transcript = timings.time("asr", t.transcribe(uri, prompt, checkpoints.as_mut())).await?;
        if transcript.resumed_windows > 0 {
            tracing::info!(
                resumed = transcript.resumed_windows,
                windows = transcript.windows,
                "resumed from the checkpoints of an earlier run"
            );
        }
        let mut segments = transcript.segments.clone();
        let texts: Vec<String> = segments.iter().map(|s| s.text.clone()).collect();
        let vectors = timings.time("embed", self.embedder.embed(texts)).await?;
        for (seg, v) in segments.iter_mut().zip(vectors) {
            seg.embedding = v;
        }
        // The video's language: the one detected on the most speech.
        let mut by_lang: Vec<(u32, f64)> = Vec::new();
        for &(l, d) in &transcript.languages {
            match by_lang.iter_mut().find(|(x, _)| *x == l) {
                Some((_, total)) => *total += d,
                None => by_lang.push((l, d)),
            }
        }
        let spoken = prompt
            .language
            .or_else(|| by_lang.iter().max_by(|a, b| a.1.total_cmp(&b.1)).map(|x| x.0))
            .map(|l| t.language_code(l))
            .unwrap_or_default();
        // A translation is English text: its language is the one search must use. Where nothing was
        // spoken nothing was translated either, and no language is known.
        let (language, spoken_language) = match task {
            SpeechTask::Translate if !spoken.is_empty() => ("en".to_string(), Some(spoken)),
            SpeechTask::Transcribe | SpeechTask::Translate => (spoken, None),
        };
        let output = IndexOutput {
            segments,
            language,
            task,
            spoken_language,
            audio_s: transcript.stats.audio_s,
            embedding_model: self.settings.embed_model.clone(),
            windows: transcript.windows,
            resumed_windows: transcript.resumed_windows,
        };
        Ok((output, transcript))
    }

    /// What a stored window depends on besides the audio: the model and its weights (fp32 or int8), the
    /// load-time rewrites that round differently (fused attention, the decoder's scale, last-position
    /// logits), the prompt (language, and the task when it translates), the chunking, the packing and
    /// the decoding limit. Checkpoints made under another key are not reused.
    fn checkpoint_config(&self, prompt: Prompt) -> String {
        let language = prompt.language.map_or_else(|| "detect".into(), |l| self.transcriber.language_code(l));
        let task = match prompt.task {
            SpeechTask::Transcribe => "",
            SpeechTask::Translate => "|translate",
        };
        let t = &self.transcriber;
        // A fleet can mix CPUs: windows decoded with an fp32 encoder are not those of an int8 one.
        let int8 = match (self.settings.whisper_int8, encoder_int8(&self.settings)) {
            (false, _) => "",
            (true, true) => "|int8:rows,blocks",
            (true, false) => "|int8:blocks",
        };
        // Fused attention is the same function up to rounding, which can still flip a near tie; so are
        // the decoder's scale on the queries and its logits for the last position only (the prompt
        // step's product is one row, not the prompt's; always, since this version: `|qscale|last`).
        let fused = if self.settings.whisper_fused_attention { "|fused|qscale|last" } else { "|qscale|last" };
        let words = if t.words { "|words" } else { "" };
        format!(
            "{}{int8}{fused}|{language}{task}{words}|{:?}|pack={}|max_tokens={}",
            self.settings.whisper_dir,
            t.params,
            t.packs(),
            t.max_tokens
        )
    }

    async fn warm_asr(&self) -> Result<WarmupReport, InferenceError> {
        let started = Instant::now();
        let t = &self.transcriber;
        let mel = t.mel.compute(&synthetic_audio(10.0));
        // One batch of the largest size: the encoder (one row per run; identical rows are encoded
        // once) and the decoder at the widest batch production uses, so every buffer is sized for it.
        let sizes = vec![t.asr.max_batch()];
        for &n in &sizes {
            // With word timestamps, the alignment pass runs too where the rows decode any text.
            let req =
                AsrRequest { word_positions: t.words.then_some(500), ..AsrRequest::new(mel.clone(), Prompt::transcribe(None), true, 4) };
            t.asr.run_exact(vec![req; n]).await?;
        }
        Ok(WarmupReport { model: WHISPER.into(), batch_sizes: sizes, duration: started.elapsed() })
    }

    async fn warm_vad(&self) -> Result<WarmupReport, InferenceError> {
        let started = Instant::now();
        let audio = synthetic_audio(64.0 * FRAME as f32 / 16_000.0);
        let audio = audio[..audio.len() / FRAME * FRAME].to_vec();
        let sizes = vec![1, self.vad_batch];
        for &n in &sizes {
            let reqs = (0..n).map(|_| VadRequest { samples: audio.clone(), state: VadState::default() }).collect();
            self.transcriber.vad.run_exact(reqs).await?;
        }
        Ok(WarmupReport { model: SILERO_VAD.into(), batch_sizes: sizes, duration: started.elapsed() })
    }

    async fn warm_embed(&self) -> Result<WarmupReport, InferenceError> {
        let started = Instant::now();
        let sizes = vec![1, self.embedder.handle().max_batch()];
        let sentence = "and mister john dashwood had then leisure to consider how much there might be prudently in his power";
        for &n in &sizes {
            let enc = self.embedder.encode(vec![sentence.to_string(); n]).await?;
            self.embedder.handle().run_exact(enc).await?;
        }
        Ok(WarmupReport { model: TEXT_EMBED.into(), batch_sizes: sizes, duration: started.elapsed() })
    }
}

/// Deterministic speech-like audio for warm-up: harmonics with a moving pitch plus noise.
fn synthetic_audio(seconds: f32) -> Vec<f32> {
    let n = (seconds * 16_000.0) as usize;
    (0..n)
        .map(|i| {
            let t = i as f32 / 16_000.0;
            let f0 = 140.0 + 40.0 * (2.0 * std::f32::consts::PI * 0.7 * t).sin();
            let noise = (((i as u64).wrapping_mul(2_654_435_761) % 1000) as f32 / 1000.0 - 0.5) * 0.01;
            (1..=4).map(|h| 0.1 / h as f32 * (2.0 * std::f32::consts::PI * f0 * h as f32 * t).sin()).sum::<f32>() + noise
        })
        .collect()
}

impl Pipeline for IndexPipeline {
    type Output = IndexOutput;

    fn kind(&self) -> TaskKind {
        TaskKind::Index
    }

    fn models(&self) -> Vec<ModelInfo> {
        self.models.clone()
    }

    async fn warm_up(&self) -> Result<Vec<WarmupReport>, TaskError> {
        Ok(vec![self.warm_vad().await?, self.warm_asr().await?, self.warm_embed().await?])
    }

    async fn process(&self, input: &TaskInput, timings: &StageTimings) -> Result<IndexOutput, TaskError> {
        let task = input.options.task.unwrap_or_default();
        let empty = || IndexOutput {
            segments: Vec::new(),
            language: String::new(),
            task,
            spoken_language: None,
            audio_s: 0.0,
            embedding_model: self.settings.embed_model.clone(),
            windows: 0,
            resumed_windows: 0,
        };
        if !input.probe.has_audio {
            if self.settings.allow_no_audio {
                return Ok(empty());
            }
            return Err(TaskError::permanent(format!(
                "{} has no audio track (set index.allow_no_audio to index such videos with an empty transcript)",
                input.media
            )));
        }
        if let Some(d) = input.probe.duration_s.filter(|&d| d > self.settings.max_duration_s) {
            return Err(TaskError::permanent(format!(
                "{} is {d:.0} s long, over the limit of {:.0} s (index.max_duration_s)",
                input.media, self.settings.max_duration_s
            )));
        }
        let language = input.options.language.as_deref().or(Some(self.settings.language.as_str()));
        let (output, _) = match self.index_run(&input.media, language, task, input.fenced.as_ref(), timings).await {
            Err(TaskError::Audio(AudioError::NoAudio { .. })) if self.settings.allow_no_audio => return Ok(empty()),
            other => other?,
        };
        // ffmpeg exits 0 on a file cut short; the container still claims the full length.
        if let Some(d) = input.probe.duration_s.filter(|&d| output.audio_s < 0.9 * d - 2.0) {
            return Err(TaskError::permanent(format!(
                "{}: audio ends at {:.1} s but the container says {d:.1} s (truncated or corrupt file)",
                input.media, output.audio_s
            )));
        }
        Ok(output)
    }

    fn query_model(&self) -> &str {
        &self.settings.embed_model
    }

    async fn embed_query(&self, texts: Vec<String>) -> Result<Embeddings, TaskError> {
        let vectors = self.embedder.embed(texts).await?;
        Ok(Embeddings { model: self.query_model().to_string(), dim: self.settings.embed_dim, vectors })
    }
}
