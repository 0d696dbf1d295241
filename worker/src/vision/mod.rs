//! The vision pipeline: frames → scenes → SigLIP image embeddings + YuNet faces → one transaction.
//!
//! - [`preprocess`]: resizes for each model and for scene detection.
//! - [`siglip`]: image and text towers (owner-thread runners) and the tokenizer.
//! - [`yunet`]: face detection runner and decoder.
//! - [`scenes`]: cuts from frame differences, mean embedding per scene.
//! - [`output`]: [`VisionOutput`] and how it replaces earlier rows.
//!
//! Frames are streamed: at most [`VisionPipeline::frames_in_flight`] frames of one task are alive at
//! once (read, being resized or inferred), so a task's memory does not grow with the video's length.
//! Across all concurrent tasks, frames are further bounded by a shared budget of
//! [`VisionPipeline::frame_budget`] (a semaphore permit is taken before a frame is read and released
//! when its results are in), so the worker's memory does not grow with its task concurrency either:
//! more tasks share the same frames in flight, and their frames still meet in the model threads'
//! queues and share batches. Resizing runs on tokio's blocking pool, at most one job per core.

pub mod output;
pub mod preprocess;
pub mod scenes;
pub mod siglip;
pub mod stream;
pub mod yunet;

use std::sync::Arc;
use std::time::{Duration, Instant};

use heimdex_models::quantize::{Activations, Scheme, Scope};
use heimdex_shared::config::VisionSettings;
use heimdex_shared::contract::TaskKind;
use heimdex_shared::query::Embeddings;
use tokenizers::Tokenizer;
use tokio::sync::Semaphore;

pub use output::{FaceRow, FrameRow, VisionOutput};
pub use scenes::Scene;
pub use yunet::Face;

use crate::engine::{InferenceError, Memory, ModelHandle, WarmupReport, int8};
use crate::error::TaskError;
use crate::media::frames::{DEFAULT_WORK_SIDE, Frame, FrameGauge, FrameOptions, FrameStream};
use crate::metrics::Metrics;
use crate::pipeline::{LoadContext, ModelInfo, Pipeline, StageTimings, TaskInput};
use siglip::{ImageRunner, TextRunner};
use yunet::YunetRunner;

/// Names of the pipeline's models, one per model thread, used for everything that names a model:
/// [`Pipeline::models`], the warm-up reports (the runtime sums warm-up time per model by name), the
/// model threads and the metrics they label. Which SigLIP checkpoint is loaded shows in the path.
pub const SIGLIP_VISION: &str = "siglip-vision";
pub const SIGLIP_TEXT: &str = "siglip-text";
pub const YUNET: &str = "yunet";

/// Models and settings shared by every vision task of the process.
pub struct VisionPipeline {
    settings: VisionSettings,
    image: ModelHandle<ImageRunner>,
    text: ModelHandle<TextRunner>,
    faces: ModelHandle<YunetRunner>,
    tokenizer: Arc<Tokenizer>,
    pad_id: u32,
    models: Vec<ModelInfo>,
    metrics: Arc<Metrics>,
    /// Frames of one task in flight at once: one full batch, so a lone task still fills batches.
    window: usize,
    /// Frames alive across every task of this pipeline (see [`FrameGauge`]).
    gauge: Arc<FrameGauge>,
    /// Frames in flight across every task (permits); bounds memory whatever the task concurrency.
    budget: Arc<Semaphore>,
    budget_size: usize,
    /// Resize jobs at once (one per core), so the blocking pool never grows past the cores.
    resizers: Arc<Semaphore>,
}

impl VisionPipeline {
    /// Creates the three sessions once and starts their owner threads.
    ///
    /// # Errors
    /// A model file is missing or corrupt, a session cannot be created, or a model's inputs and
    /// outputs are not the expected ones.
    pub fn load(ctx: &LoadContext<'_>) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let settings = ctx.settings.vision.clone();
        let max_batch = ctx.settings.engine.max_batch.max(1);
        let dir = settings.embed_dir.trim_end_matches('/');
        let vision_path = ctx.models.file(&format!("{dir}/{}", siglip::VISION_FILE))?;
        let text_path = ctx.models.file(&format!("{dir}/{}", siglip::TEXT_FILE))?;
        let tokenizer_path = ctx.models.file(&format!("{dir}/{}", siglip::TOKENIZER_FILE))?;
        let face_path = ctx.models.file(&settings.face_model)?;

        let image = if settings.embed_int8 {
            let bytes = std::fs::read(&vision_path).with_context(|| format!("reading {}", vision_path.display()))?;
            let bytes = int8(SIGLIP_VISION, bytes, Scheme::Rows(Activations::for_this_cpu()), Scope::Feeding(siglip::ENCODER_OUTPUT))
                .context("vision.embed_int8 needs the image tower's last_hidden_state output; set it to false to run the file as it is")?;
            ctx.engine.session_from_memory(SIGLIP_VISION, &bytes, Memory::Arena)?
        } else {
            ctx.engine.session(&vision_path)?
        };
        let image = ImageRunner::new(image, SIGLIP_VISION, &settings).context("SigLIP image tower")?;
        let (tokenizer, pad_id) = siglip::load_tokenizer(&tokenizer_path, settings.text_max_len)?;
        let text = TextRunner::new(ctx.engine.session(&text_path)?, SIGLIP_TEXT, pad_id, settings.text_max_len, settings.embed_dim)
            .context("SigLIP text tower")?;
        let faces = std::fs::read(&face_path).with_context(|| format!("reading {}", face_path.display()))?;
        let faces = heimdex_models::shapes::free_input_dims(&faces, &[2, 3]).context("freeing YuNet's input size")?;
        // YuNet runs beside SigLIP, which has every core: one thread of its own (inside the pipeline
        // 23–40 ms a frame with one thread, 35–54 ms with a pool of two; bench-vision, 2 cores).
        let faces = ctx.engine.single_threaded().session_from_memory(YUNET, &faces, Memory::Arena)?;
        let faces = YunetRunner::new(faces, settings.face_score_threshold, settings.face_nms_iou).context("YuNet face detector")?;

        let info = |name: &str, path: &std::path::Path| ModelInfo { name: name.into(), path: path.display().to_string() };
        let models = vec![info(SIGLIP_VISION, &vision_path), info(SIGLIP_TEXT, &text_path), info(YUNET, &face_path)];
        Ok(Self {
            image: ctx.engine.spawn(SIGLIP_VISION, image, max_batch),
            // Text queries come one at a time (search); batch 1 is the only shape, and it is warmed.
            text: ctx.engine.spawn(SIGLIP_TEXT, text, 1),
            faces: ctx.engine.spawn(YUNET, faces, max_batch),
            tokenizer: Arc::new(tokenizer),
            pad_id,
            models,
            metrics: ctx.engine.metrics().clone(),
            window: max_batch,
            gauge: Arc::new(FrameGauge::default()),
            budget: Arc::new(Semaphore::new(2 * max_batch)),
            budget_size: 2 * max_batch,
            resizers: Arc::new(Semaphore::new(std::thread::available_parallelism().map_or(1, usize::from))),
            settings,
        })
    }

    /// Embeds a text query with the text tower (for text-to-frame search). Only comparable with image
    /// embeddings when the configured model is a real two-tower model.
    ///
    /// # Errors
    /// Tokenisation or inference failed.
    pub async fn embed_text(&self, text: &str) -> Result<Vec<f32>, TaskError> {
        let ids = self.tokenize(text).await?;
        Ok(self.text.infer(ids).await?)
    }

    async fn tokenize(&self, text: &str) -> Result<Vec<i64>, TaskError> {
        let (tokenizer, text, len, pad) = (self.tokenizer.clone(), text.to_string(), self.settings.text_max_len, self.pad_id);
        blocking(move || siglip::tokenize(&tokenizer, &text, len, pad)).await?.map_err(TaskError::from)
    }

    /// The exact f32 tensor (CHW) the image tower is fed for `frame`.
    ///
    /// # Errors
    /// The frame has no pixels.
    pub fn siglip_tensor(&self, frame: &Frame) -> Result<Vec<f32>, TaskError> {
        let size = self.settings.embed_image_size;
        let pixels =
            preprocess::siglip_pixels(&frame.rgb, frame.width, frame.height, size).map_err(|e| TaskError::permanent(e.to_string()))?;
        let mut out = vec![0.0; pixels.len()];
        ImageRunner::tensor_of(&pixels, self.settings.embed_mean, self.settings.embed_std, &mut out);
        Ok(out)
    }

    /// Cosine between this pipeline's embedding of each frame and the image tower file's own fp32
    /// run on the same tensor (`testing` feature): how far `vision.embed_int8` moved the embeddings.
    /// The vision test and bench-vision hold it to the same bars.
    ///
    /// # Errors
    /// The file did not load, or a run failed.
    #[cfg(feature = "testing")]
    pub async fn cosines_to_fp32(&self, engine: &crate::engine::Engine, frames: &[Frame]) -> Result<Vec<f32>, TaskError> {
        use ort::value::TensorRef;
        let file = self.models.iter().find(|m| m.name == SIGLIP_VISION).expect("the image tower is always loaded");
        let mut fp32 = engine.session(std::path::Path::new(&file.path))?;
        let side = self.settings.embed_image_size as usize;
        let mut cosines = Vec::with_capacity(frames.len());
        for frame in frames {
            let tensor = self.siglip_tensor(frame)?;
            let input = TensorRef::from_array_view(([1usize, 3, side, side], tensor.as_slice())).map_err(InferenceError::from)?;
            let out = fp32.run(ort::inputs![input]).map_err(InferenceError::from)?;
            let (_, want) = out[self.settings.embed_output.as_str()].try_extract_tensor::<f32>().map_err(InferenceError::from)?;
            let mut want = want.to_vec();
            crate::engine::l2_normalise(&mut want);
            let got = self.embed_frame(frame).await?;
            cosines.push(got.iter().zip(&want).map(|(a, b)| a * b).sum());
        }
        Ok(cosines)
    }

    /// Embeds one frame (batched with whatever else is waiting).
    ///
    /// # Errors
    /// Resizing or inference failed.
    pub async fn embed_frame(&self, frame: &Frame) -> Result<Vec<f32>, TaskError> {
        let pixels = self.siglip_pixels(frame)?;
        Ok(self.image.infer(pixels).await?)
    }

    /// Embeds frames as exactly one batch.
    ///
    /// # Errors
    /// Resizing or inference failed.
    pub async fn embed_batch(&self, frames: &[Frame]) -> Result<Vec<Vec<f32>>, TaskError> {
        let pixels = frames.iter().map(|f| self.siglip_pixels(f)).collect::<Result<Vec<_>, _>>()?;
        Ok(self.image.run_exact(pixels).await?)
    }

    fn siglip_pixels(&self, frame: &Frame) -> Result<Vec<u8>, TaskError> {
        preprocess::siglip_pixels(&frame.rgb, frame.width, frame.height, self.settings.embed_image_size)
            .map_err(|e| TaskError::permanent(e.to_string()))
    }

    /// Detects faces on one frame, in that frame's pixels.
    ///
    /// # Errors
    /// Inference failed.
    pub async fn detect_faces(&self, frame: Arc<Frame>) -> Result<Vec<Face>, TaskError> {
        Ok(self.faces.infer(frame).await?)
    }

    /// The image tower's model thread, for the benchmark to time it and read its batch sizes
    /// (`testing` feature).
    #[cfg(feature = "testing")]
    pub fn image_model(&self) -> &ModelHandle<ImageRunner> {
        &self.image
    }

    /// The face detector's model thread, for the benchmark to time it (`testing` feature).
    #[cfg(feature = "testing")]
    pub fn face_model(&self) -> &ModelHandle<YunetRunner> {
        &self.faces
    }

    /// Most frames of one task alive at once.
    pub fn frames_in_flight(&self) -> usize {
        self.window
    }

    /// Most frames alive at once across every task of this pipeline (twice the batch size: a full
    /// batch in the model while the next one is resized).
    pub fn frame_budget(&self) -> usize {
        self.budget_size
    }

    /// Frames alive across every task of this pipeline.
    pub fn gauge(&self) -> &Arc<FrameGauge> {
        &self.gauge
    }

    /// [`Pipeline::process`] counting frames on `gauge` instead of the pipeline's own.
    ///
    /// Stage timings: `decode` is the time spent waiting for ffmpeg; `preprocess`, `embed` and
    /// `faces` are per-frame latencies summed over frames, which overlap, so they can exceed the
    /// task's wall time (the runtime records the total).
    ///
    /// # Errors
    /// [`TaskError::Permanent`] for unusable video (no video stream, size out of range, corrupt or
    /// truncated, no frames); [`TaskError::Retryable`] for model or tool failures.
    pub async fn process_with_gauge(
        &self,
        input: &TaskInput,
        timings: &StageTimings,
        gauge: Arc<FrameGauge>,
    ) -> Result<VisionOutput, TaskError> {
        let rate = input.options.frame_rate.unwrap_or(self.settings.frame_rate);
        let options = FrameOptions { rate: Some(rate), max_side: self.settings.max_side, work_side: DEFAULT_WORK_SIDE };
        let mut stream = FrameStream::open(&input.media, &input.probe, options, gauge)?;
        let (sw, sh) = stream.source_size;
        let (ww, wh) = stream.size;
        let (sx, sy) = (sw as f32 / ww as f32, sh as f32 / wh as f32);

        let mut detector = scenes::SceneDetector::new(self.settings.scene_threshold, 1.0 / f64::from(rate));
        let mut out = VisionOutput { model: self.settings.embed_model.clone(), frames: Vec::new(), scenes: Vec::new(), faces: Vec::new() };
        let (mut pre, mut embed, mut detect) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        let decode = stream::run(&mut stream, &self.frame_worker(), self.window, &self.budget, |a| {
            (pre, embed, detect) = (pre + a.preprocess, embed + a.embed, detect + a.detect);
            let scene = detector.push(a.index, a.ts, a.thumbnail, &a.embedding);
            out.faces.extend(a.faces.iter().map(|f| FaceRow { frame: a.index, ts: a.ts, face: f.mapped(sx, sy, sw as f32, sh as f32) }));
            out.frames.push(FrameRow { index: a.index, ts: a.ts, scene, embedding: a.embedding });
        })
        .await?;
        out.scenes = detector.finish(input.probe.duration_s);
        for (stage, took) in [("decode", decode), ("preprocess", pre), ("embed", embed), ("faces", detect)] {
            timings.record(stage, Instant::now().checked_sub(took).unwrap_or_else(Instant::now));
        }
        Ok(out)
    }

    fn frame_worker(&self) -> stream::FrameWorker {
        stream::FrameWorker {
            image: self.image.clone(),
            faces: self.faces.clone(),
            resizers: self.resizers.clone(),
            image_size: self.settings.embed_image_size,
        }
    }

    async fn warm(
        &self,
        model: &str,
        batch_sizes: Vec<usize>,
        run: impl Future<Output = Result<(), InferenceError>>,
    ) -> Result<WarmupReport, TaskError> {
        let started = Instant::now();
        run.await?;
        let duration = started.elapsed();
        self.metrics.set_warmup(model, duration);
        tracing::info!(model, ?batch_sizes, ms = duration.as_secs_f64() * 1000.0, "warmed up");
        Ok(WarmupReport { model: model.into(), batch_sizes, duration })
    }
}

/// Runs CPU work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, TaskError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| TaskError::retryable(format!("worker thread failed: {e}")))
}

/// A 640×360 frame with gradients and edges, so warm-up runs every layer on realistic values.
fn warmup_frame() -> Frame {
    let (w, h) = (DEFAULT_WORK_SIDE, DEFAULT_WORK_SIDE * 9 / 16);
    let rgb =
        (0..h).flat_map(|y| (0..w).flat_map(move |x| [(x % 256) as u8, (y % 256) as u8, ((x / 40 + y / 40) % 2 * 255) as u8])).collect();
    Frame::from_rgb(0, 0.0, w, h, rgb)
}

impl Pipeline for VisionPipeline {
    type Output = VisionOutput;

    fn kind(&self) -> TaskKind {
        TaskKind::Vision
    }

    fn models(&self) -> Vec<ModelInfo> {
        self.models.clone()
    }

    async fn warm_up(&self) -> Result<Vec<WarmupReport>, TaskError> {
        let frame = warmup_frame();
        let pixels = self.siglip_pixels(&frame)?;
        // Dynamic batching produces every size from 1 to max_batch; ONNX Runtime plans memory per
        // input shape on first sight, so each size is run once here rather than in the first task.
        let sizes: Vec<usize> = (1..=self.image.max_batch()).collect();
        let image = self.warm(SIGLIP_VISION, sizes.clone(), async {
            for &n in &sizes {
                self.image.run_exact(vec![pixels.clone(); n]).await?;
            }
            Ok(())
        });
        let image = image.await?;
        let frame = Arc::new(frame);
        let faces = self.warm(YUNET, vec![1], async { self.faces.run_exact(vec![frame]).await.map(drop) }).await?;
        // The whole per-frame path once (blocking-pool resize, thumbnail, both models through their
        // queues), so the first task does not pay for first-use costs outside the models either.
        let permit = self.budget.clone().acquire_owned().await.map_err(|e| TaskError::retryable(e.to_string()))?;
        self.frame_worker().analyse(warmup_frame(), permit).await?;
        let ids = self.tokenize("a photo of a person").await?;
        let text = self.warm(SIGLIP_TEXT, vec![1], async { self.text.run_exact(vec![ids]).await.map(drop) }).await?;
        Ok(vec![image, faces, text])
    }

    async fn process(&self, input: &TaskInput, timings: &StageTimings) -> Result<VisionOutput, TaskError> {
        self.process_with_gauge(input, timings, self.gauge.clone()).await
    }

    fn query_model(&self) -> &str {
        &self.settings.embed_model
    }

    /// The SigLIP text tower, whose vectors share the space of the frames' image embeddings (with
    /// the stand-in only nominally: it is not a trained two-tower model).
    async fn embed_query(&self, texts: Vec<String>) -> Result<Embeddings, TaskError> {
        let vectors = futures::future::try_join_all(texts.iter().map(|t| self.embed_text(t))).await?;
        Ok(Embeddings { model: self.query_model().to_string(), dim: self.settings.embed_dim, vectors })
    }
}
