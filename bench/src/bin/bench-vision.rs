//! Benchmark of the vision pipeline: cold start, first task vs steady state, throughput by
//! concurrency against what SigLIP alone sustains, SigLIP batch sizes, peak RSS by concurrency, Rust
//! vs Python ONNX Runtime latency, and where a task's time goes (ffmpeg decode alone vs whole task).
//!
//! `cargo run -p heimdex-bench --bin bench-vision -- --out bench-results/vision.json`; at SigLIP base's
//! real size: `HEIMDEX__VISION__EMBED_DIR=siglip-base-standin` (see the bundle's README).
//!
//! Cold start, first-task latency and peak RSS are measured in fresh child processes (this binary
//! re-executed with the hidden `--child` flag), so each number starts from an empty process and
//! none inherits another's allocations. Every figure is the median of several runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Parser;
use heimdex_bench::measure::{child_json, cpu_seconds, field_median, histogram_totals, isa_flags, median, ms, peak_rss_mib, write_report};
use heimdex_models::registry::ModelRegistry;
use heimdex_shared::Settings;
use heimdex_shared::contract::TaskKind;
use heimdex_worker::engine::Engine;
use heimdex_worker::media::frames::{
    DECODER_ARGS, DEFAULT_WORK_SIDE, Frame, FrameOptions, FrameStream, decode_still, sampling_filter, working_size,
};
use heimdex_worker::metrics::Metrics;
use heimdex_worker::pipeline::{LoadContext, Pipeline, StageTimings, TaskInput};
use heimdex_worker::vision::VisionPipeline;
use heimdex_worker::vision::preprocess::{pillow_bicubic, siglip_pixels};
use ort::value::TensorRef;
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-results/vision.json")]
    out: PathBuf,
    /// Runs per measurement (medians are quoted).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Python interpreter with onnxruntime.
    #[arg(long, env = "HEIMDEX_PYTHON", default_value = ".deps/venv/bin/python")]
    python: PathBuf,
    /// Internal: run one measurement in this (fresh) process and print JSON.
    #[arg(long, hide = true)]
    child: Option<String>,
    #[arg(long, hide = true, default_value_t = 1)]
    concurrency: usize,
    /// Parts to run, comma-separated: cold, latency, rss, throughput, siglip, inference, decode,
    /// decode-modes
    /// (default: all). `throughput` alternates, round by round, with our SigLIP image tower alone (as
    /// the worker loads it, in a fresh process); `siglip` alternates that with SigLIP alone through
    /// onnxruntime's Python API as shipped (fp32), and checks our embeddings against fp32's.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    parts: Vec<String>,
    /// Batch sizes at which SigLIP alone is timed (ours and Python's); our best images/s is what the
    /// pipeline is held to.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    alone_batches: Vec<usize>,
    /// More videos (besides sample.mp4) whose decode-alone and whole-task times are compared.
    #[arg(long)]
    decode_video: Vec<PathBuf>,
}

impl Args {
    fn wants(&self, part: &str) -> bool {
        self.parts.iter().any(|p| p == "all" || p == part)
    }
}

fn sample_path(settings: &Settings) -> String {
    settings.models.dir.join("media/video/sample.mp4").display().to_string()
}

async fn load(settings: &Settings) -> Result<(VisionPipeline, Engine, f64, f64)> {
    let started = Instant::now();
    let engine = Engine::new(settings.engine.clone(), Arc::new(Metrics::new()))?;
    let registry = ModelRegistry::open(&settings.models.dir).expect("model directory");
    let vision = VisionPipeline::load(&LoadContext { settings, engine: &engine, models: &registry })?;
    let load_ms = ms(started);
    let started = Instant::now();
    vision.warm_up().await?;
    Ok((vision, engine, load_ms, ms(started)))
}

async fn input(settings: &Settings) -> Result<TaskInput> {
    input_for(sample_path(settings)).await
}

async fn input_for(media: String) -> Result<TaskInput> {
    let probe = heimdex_shared::media::probe(&media).await?;
    let id = uuid::Uuid::new_v4;
    let run = heimdex_shared::jobs::Run { job_id: id(), video_id: id(), token: id(), attempt: 1, deaths: 0, generation: 0 };
    Ok(TaskInput { run, fenced: None, kind: TaskKind::Vision, media, probe, options: Default::default() })
}

/// Runs `tasks` tasks, `concurrency` at a time; returns (wall ms, frames, faces).
async fn run_tasks(vision: &VisionPipeline, input: &TaskInput, tasks: usize, concurrency: usize) -> Result<(f64, usize, usize)> {
    use futures::StreamExt;
    let started = Instant::now();
    let results: Vec<_> = futures::stream::iter(0..tasks)
        .map(|_| async { vision.process(input, &StageTimings::default()).await })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let wall = ms(started);
    let (mut frames, mut faces) = (0, 0);
    for r in results {
        let out = r?;
        frames += out.frames.len();
        faces += out.faces.len();
    }
    Ok((wall, frames, faces))
}

/// One throughput measurement: `c * 2` tasks at concurrency `c`, with where the time went: CPU per
/// frame (this process and its ffmpeg children), and per model the share of the wall time its thread
/// spent running batches and its time per item.
async fn throughput_row(vision: &VisionPipeline, engine: &Engine, input: &TaskInput, c: usize) -> Result<Value> {
    let totals = |model: &str| {
        let text = engine.metrics().encode();
        let (seconds, _) = histogram_totals(&text, "heimdex_inference_seconds", model);
        let (items, _) = histogram_totals(&text, "heimdex_inference_batch_size", model);
        (seconds, items)
    };
    let models = [heimdex_worker::vision::SIGLIP_VISION, heimdex_worker::vision::YUNET];
    let before: Vec<(f64, f64)> = models.iter().map(|m| totals(m)).collect();
    let cpu = cpu_seconds();
    let (wall, frames, faces) = run_tasks(vision, input, c * 2, c).await?;
    let cpu = cpu_seconds() - cpu;
    let mut row = json!({
        "concurrency": c, "frames_per_s": frames as f64 / wall * 1000.0, "faces_per_s": faces as f64 / wall * 1000.0,
        "cpu_ms_per_frame": cpu * 1000.0 / frames as f64,
    });
    for (m, (s0, n0)) in models.iter().zip(before) {
        let (s1, n1) = totals(m);
        row[*m] = json!({ "busy": (s1 - s0) * 1000.0 / wall, "ms_per_item": (s1 - s0) * 1000.0 / (n1 - n0) });
    }
    Ok(row)
}

/// The hidden child modes: `cold`, `latency`, `rss`.
async fn child(mode: &str, concurrency: usize, settings: &Settings) -> Result<Value> {
    let (vision, _engine, load_ms, warm_ms) = load(settings).await?;
    let input = input(settings).await?;
    match mode {
        "cold" => Ok(json!({ "load_ms": load_ms, "warm_ms": warm_ms, "cold_to_warm_ms": load_ms + warm_ms })),
        "latency" => {
            let mut times = Vec::new();
            for _ in 0..11 {
                let started = Instant::now();
                vision.process(&input, &StageTimings::default()).await?;
                times.push(ms(started));
            }
            let steady = median(times[1..].to_vec());
            Ok(json!({ "first_ms": times[0], "steady_median_ms": steady, "ratio": times[0] / steady }))
        }
        "rss" => {
            let after_warm = peak_rss_mib();
            run_tasks(&vision, &input, concurrency * 2, concurrency).await?;
            Ok(json!({ "concurrency": concurrency, "after_warmup_mib": after_warm, "peak_rss_mib": peak_rss_mib() }))
        }
        other => bail!("unknown child mode {other}"),
    }
}

fn spawn_child(mode: &str, concurrency: usize) -> Result<Value> {
    child_json(Command::new(std::env::current_exe()?).args(["--child", mode, "--concurrency", &concurrency.to_string()]))
}

/// The image tower alone as the worker runs it (its owner thread, `vision.embed_int8` as
/// configured), in this fresh process: images/s at each of `batches`, timed as ort_vision.py's
/// sweep times Python's (one warm run, then the median of three).
async fn siglip_alone_rust(settings: &Settings, batches: &[usize]) -> Result<Value> {
    let (vision, ..) = load(settings).await?;
    let photo = settings.models.dir.join("media/photos/astronaut.png");
    let frame = decode_still(&photo.display().to_string(), settings.vision.max_side, DEFAULT_WORK_SIDE).await?;
    let pixels = siglip_pixels(&frame.rgb, frame.width, frame.height, settings.vision.embed_image_size)?;
    let image = vision.image_model();
    let (mut per_batch, mut cpu_per_image) = (serde_json::Map::new(), serde_json::Map::new());
    for &b in batches {
        let cpu = cpu_seconds();
        let took = time_runs(1, 3, || async { Ok(image.run_exact(vec![pixels.clone(); b]).await.map(drop)?) }).await?;
        cpu_per_image.insert(b.to_string(), json!((cpu_seconds() - cpu) * 1000.0 / (4 * b) as f64));
        per_batch.insert(b.to_string(), json!(b as f64 / took * 1000.0));
    }
    let (best, rate) = per_batch
        .iter()
        .map(|(b, v)| (b.clone(), v.as_f64().unwrap_or(0.0)))
        .fold((String::new(), 0.0), |a, x| if x.1 > a.1 { x } else { a });
    Ok(
        json!({ "images_per_s": per_batch, "cpu_ms_per_image": cpu_per_image, "best_batch": best.parse::<u64>().ok(), "best_images_per_s": rate, "int8": settings.vision.embed_int8 }),
    )
}

fn spawn_siglip_child(batches: &[usize]) -> Result<Value> {
    let sizes: Vec<String> = batches.iter().map(ToString::to_string).collect();
    child_json(Command::new(std::env::current_exe()?).args(["--child", "siglip", "--alone-batches", &sizes.join(",")]))
}

/// Our image embeddings against fp32's (the file run as it is, same tensors) on the bundle's real
/// frames: sample.mp4 at the configured rate and the four photos. With the stand-ins the weights are
/// random, so this checks the arithmetic, not the meaning; a real export is checked the same way.
async fn siglip_fidelity(vision: &VisionPipeline, engine: &Engine, settings: &Settings) -> Result<Value> {
    let v = &settings.vision;
    let mut frames = Vec::new();
    let input = input(settings).await?;
    let options = FrameOptions { rate: Some(v.frame_rate), max_side: v.max_side, work_side: DEFAULT_WORK_SIDE };
    let mut stream = FrameStream::open(&input.media, &input.probe, options, Arc::default())?;
    while let Some(frame) = stream.next().await? {
        frames.push(frame);
    }
    for photo in ["astronaut", "camera", "coffee", "chelsea"] {
        let path = settings.models.dir.join(format!("media/photos/{photo}.png"));
        frames.push(decode_still(&path.display().to_string(), v.max_side, DEFAULT_WORK_SIDE).await?);
    }
    let cosines: Vec<f64> = vision.cosines_to_fp32(engine, &frames).await?.into_iter().map(f64::from).collect();
    let mean = cosines.iter().sum::<f64>() / cosines.len() as f64;
    let min = cosines.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(json!({
        "frames": cosines.len(), "mean_cosine": mean, "min_cosine": min, "targets": { "mean": 0.995, "min": 0.99 },
        "int8": v.embed_int8, "embed_dir": v.embed_dir,
    }))
}

/// Per-batch latency of the raw sessions and of the production path (owner thread + preprocessing in
/// the runner), with inputs of production shape.
async fn rust_inference(vision: &VisionPipeline, engine: &Engine, settings: &Settings, batch: usize, iters: usize) -> Result<Value> {
    let photo = settings.models.dir.join("media/photos/astronaut.png");
    let frame = Arc::new(decode_still(&photo.display().to_string(), settings.vision.max_side, 640).await?);
    let time = |mut f: Box<dyn FnMut() -> Result<()> + '_>| -> Result<f64> {
        for _ in 0..3 {
            f()?;
        }
        let mut v = Vec::new();
        for _ in 0..iters {
            let t = Instant::now();
            f()?;
            v.push(ms(t));
        }
        Ok(median(v))
    };
    let yunet_path = settings.models.dir.join(&settings.vision.face_model);
    let siglip_path = settings.models.dir.join(&settings.vision.embed_dir).join("vision_model.onnx");
    let mut yunet = engine.session(&yunet_path)?;
    let mut siglip = engine.session(&siglip_path)?;
    let yx: Vec<f32> = (0..3 * 640 * 640).map(|i| (i % 255) as f32).collect();
    let sx: Vec<f32> = (0..batch * 3 * 224 * 224).map(|i| ((i % 97) as f32 / 48.0) - 1.0).collect();
    let yunet_raw = time(Box::new(|| {
        yunet.run(ort::inputs!["input" => TensorRef::from_array_view(([1usize, 3, 640, 640], yx.as_slice()))?])?;
        Ok(())
    }))?;
    let mut siglip_raw = Vec::new();
    for n in [1, batch] {
        let x = &sx[..n * 3 * 224 * 224];
        siglip_raw.push(time(Box::new(|| {
            siglip.run(ort::inputs!["pixel_values" => TensorRef::from_array_view(([n, 3, 224, 224], x))?])?;
            Ok(())
        }))?);
    }
    // The production path: the owner thread, batch assembly and the runner's own input preparation
    // (f32 conversion; for YuNet the letterbox of a 640x360 working frame), from inputs that are
    // already at working size as they are in a task.
    let working =
        Arc::new(Frame::from_rgb(0, 0.0, 640, 360, pillow_bicubic(&frame.rgb, frame.width as usize, frame.height as usize, 640, 360)));
    let pixels = siglip_pixels(&frame.rgb, frame.width, frame.height, settings.vision.embed_image_size)?;
    let image = vision.image_model();
    let yunet_pipe = time_runs(3, iters, || async { Ok(vision.face_model().run_exact(vec![working.clone()]).await.map(drop)?) }).await?;
    let siglip_pipe_1 = time_runs(3, iters, || async { Ok(image.run_exact(vec![pixels.clone()]).await.map(drop)?) }).await?;
    let siglip_pipe_b = time_runs(3, iters, || async { Ok(image.run_exact(vec![pixels.clone(); batch]).await.map(drop)?) }).await?;
    Ok(json!({
        "yunet_b1": { "session_ms": yunet_raw, "pipeline_ms": yunet_pipe },
        "siglip_b1": { "session_ms": siglip_raw[0], "pipeline_ms": siglip_pipe_1 },
        format!("siglip_b{batch}"): { "session_ms": siglip_raw[1], "pipeline_ms": siglip_pipe_b },
    }))
}

/// Median latency of `f` over `iters` runs after `warm` warm runs.
async fn time_runs<F, Fut>(warm: usize, iters: usize, f: F) -> Result<f64>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut v = Vec::new();
    for i in 0..iters + warm {
        let t = Instant::now();
        f().await?;
        if i >= warm {
            v.push(ms(t));
        }
    }
    Ok(median(v))
}

fn python_inference(python: &Path, settings: &Settings, batch: usize, iters: usize, runs: usize) -> Result<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/ort_vision.py");
    let mut all = Vec::new();
    for _ in 0..runs {
        all.push(child_json(
            Command::new(python)
                .arg(&script)
                .args(["--yunet", &settings.models.dir.join(&settings.vision.face_model).display().to_string()])
                .args(["--siglip", &settings.models.dir.join(&settings.vision.embed_dir).join("vision_model.onnx").display().to_string()])
                .args(["--threads", &settings.engine.threads().to_string(), "--spin", if settings.engine.spinning() { "1" } else { "0" }])
                .args(["--batch", &batch.to_string(), "--iters", &iters.to_string()]),
        )?);
    }
    let keys = ["yunet_b1".to_string(), "siglip_b1".to_string(), format!("siglip_b{batch}")];
    let mut res = serde_json::Map::new();
    for k in keys {
        res.insert(k.clone(), json!(median(all.iter().filter_map(|v| v[&k]["median_ms"].as_f64()).collect())));
    }
    res.insert("onnxruntime".into(), all[0]["onnxruntime"].clone());
    Ok(Value::Object(res))
}

/// SigLIP's image tower alone through onnxruntime's Python API, in a fresh process, at each of
/// `batches`: images/s by batch size and the best (the ceiling for the pipeline's frames/s).
fn siglip_alone_python(python: &Path, settings: &Settings, batches: &[usize]) -> Result<Value> {
    let sizes: Vec<String> = batches.iter().map(ToString::to_string).collect();
    child_json(
        Command::new(python)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("python/ort_vision.py"))
            .args(["--siglip", &settings.models.dir.join(&settings.vision.embed_dir).join("vision_model.onnx").display().to_string()])
            .args(["--threads", &settings.engine.threads().to_string(), "--spin", if settings.engine.spinning() { "1" } else { "0" }])
            .args(["--sweep", &sizes.join(","), "--iters", "3"]),
    )
}

/// Cheaper ways to decode `media` at the task's rate, against the task's own decode (issue 22): per
/// way, ffmpeg's CPU per sampled frame (median of `runs`, the ways alternating within each round) and
/// how many sampled frames are bit-identical to the task's. A way that changes a frame changes the
/// picture a timestamp shows. Frames are hashed (`framemd5`, about 1 ms a 640×360 frame, in every way).
fn decode_modes(settings: &Settings, media: &Path, probe: &heimdex_shared::media::Probe, runs: usize) -> Result<Value> {
    let (Some(stream), Some(width), Some(height)) = (probe.video_stream, probe.width, probe.height) else {
        bail!("{} has no video stream", media.display());
    };
    let rate = Some(settings.vision.frame_rate);
    let task = sampling_filter(rate, working_size(width, height, DEFAULT_WORK_SIDE));
    let side = settings.vision.embed_image_size;
    let ways: [(&str, &[&str], Option<String>); 6] = [
        ("the task's (exact)", &[], Some(task.clone())),
        ("-skip_frame noref", &["-skip_frame", "noref"], Some(task.clone())),
        ("-skip_frame nokey", &["-skip_frame", "nokey"], Some(task.clone())),
        ("-skip_loop_filter noref", &["-skip_loop_filter", "noref"], Some(task.clone())),
        ("YUV straight to SigLIP's side", &[], Some(sampling_filter(rate, (side, side)))),
        ("decoding alone (every frame)", &[], None),
    ];
    let run = |pre: &[&str], filter: &Option<String>| -> Result<(f64, Vec<String>)> {
        let mut cmd = Command::new("ffmpeg");
        cmd.args(DECODER_ARGS).args(heimdex_shared::media::INPUT_FENCE).args(pre).arg("-i").arg(format!("file:{}", media.display()));
        cmd.args(["-map", &format!("0:{stream}"), "-an", "-sn", "-dn"]);
        match filter {
            Some(filter) => cmd.args(["-vf", filter, "-pix_fmt", "rgb24", "-f", "framemd5", "-"]),
            None => cmd.args(["-f", "null", "-"]),
        };
        let cpu0 = cpu_seconds();
        let out = cmd.output()?;
        let cpu = cpu_seconds() - cpu0;
        if !out.status.success() {
            bail!("ffmpeg {pre:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let hashes = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit(',').next())
            .map(|h| h.trim().to_string())
            .collect();
        Ok((cpu, hashes))
    };
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); ways.len()];
    let mut hashes: Vec<Vec<String>> = vec![Vec::new(); ways.len()];
    for _ in 0..runs {
        for (i, (_, pre, filter)) in ways.iter().enumerate() {
            let (seconds, h) = run(pre, filter)?;
            cpu[i].push(seconds);
            hashes[i] = h;
        }
    }
    let sampled = hashes[0].len();
    let rows: Vec<Value> = ways
        .iter()
        .zip(cpu)
        .zip(&hashes)
        .map(|(((name, _, filter), cpu), h)| {
            let identical = (filter.as_deref() == Some(task.as_str())).then(|| h.iter().zip(&hashes[0]).filter(|(a, b)| a == b).count());
            json!({ "way": name, "cpu_ms_per_sampled_frame": median(cpu) * 1000.0 / sampled as f64, "frames": filter.is_some().then_some(h.len()), "identical_to_task": identical })
        })
        .collect();
    Ok(json!({ "media": media.display().to_string(), "sampled_frames": sampled, "runs": runs, "isa": isa_flags(), "ways": rows }))
}

/// Where a task's time goes on `media`: the task's own ffmpeg frame stream read to the end with no
/// models, against the whole task (concurrency 1), alternating which runs first.
async fn decode_breakdown(vision: &VisionPipeline, settings: &Settings, media: &Path, runs: usize) -> Result<Value> {
    let input = input_for(media.display().to_string()).await?;
    let options = FrameOptions { rate: Some(settings.vision.frame_rate), max_side: settings.vision.max_side, work_side: DEFAULT_WORK_SIDE };
    let (mut decode, mut task, mut waits, mut cpu, mut frames) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0);
    for round in 0..runs {
        for step in 0..2 {
            if (round + step) % 2 == 0 {
                let started = Instant::now();
                let mut stream = FrameStream::open(&input.media, &input.probe, options, Arc::default())?;
                let mut n = 0usize;
                while stream.next().await?.is_some() {
                    n += 1;
                }
                decode.push(ms(started));
                frames = n;
            } else {
                let timings = StageTimings::default();
                let (started, cpu0) = (Instant::now(), cpu_seconds());
                vision.process(&input, &timings).await?;
                task.push(ms(started));
                cpu.push(cpu_seconds() - cpu0);
                waits.push(timings.to_json()["decode"].as_f64().unwrap_or(f64::NAN));
            }
        }
    }
    let shares: Vec<f64> = decode.iter().zip(&task).map(|(d, t)| d / t).collect();
    let (decode_ms, task_ms) = (median(decode), median(task));
    Ok(json!({
        "media": input.media, "duration_s": input.probe.duration_s, "size": [input.probe.width, input.probe.height], "frames": frames,
        "decode_alone_ms": decode_ms, "task_ms": task_ms, "decode_share": median(shares), "task_waiting_for_decode_ms": median(waits),
        "decode_frames_per_s": frames as f64 / decode_ms * 1000.0, "task_frames_per_s": frames as f64 / task_ms * 1000.0, "runs": runs,
        // The cost of a vision job: CPU-seconds of this process and its ffmpeg per hour of video.
        "task_cpu_s_per_video_hour": input.probe.duration_s.map_or(f64::NAN, |d| median(cpu) * 3600.0 / d),
    }))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let settings = heimdex_shared::config::load(None)?;
    if let Some(mode) = &args.child {
        let out = match mode.as_str() {
            "siglip" => siglip_alone_rust(&settings, &args.alone_batches).await?,
            _ => child(mode, args.concurrency, &settings).await?,
        };
        println!("{out}");
        return Ok(());
    }
    let runs = args.runs.max(1);
    eprintln!(
        "bench-vision: {}, {} intra-op threads, max batch {}, {runs} runs each",
        settings.vision.embed_dir,
        settings.engine.threads(),
        settings.engine.max_batch
    );

    let children = |part: &str, mode: &str, c: usize| -> Result<Vec<Value>> {
        if !args.wants(part) {
            return Ok(Vec::new());
        }
        (0..runs).map(|_| spawn_child(mode, c)).collect()
    };
    let cold = children("cold", "cold", 1)?;
    let latency = children("latency", "latency", 1)?;
    let rss1 = children("rss", "rss", 1)?;
    let rss8 = children("rss", "rss", 8)?;

    let (vision, engine, _, _) = load(&settings).await?;
    let input = input(&settings).await?;
    let batch = settings.engine.max_batch;
    let mut result = json!({
        "machine": { "threads": settings.engine.threads(), "max_batch": batch, "runs": runs, "embed_dir": settings.vision.embed_dir },
    });
    if args.wants("cold") {
        result["cold_start"] = json!({ "load_ms": field_median(&cold, "load_ms"), "warm_ms": field_median(&cold, "warm_ms"), "cold_to_warm_ms": field_median(&cold, "cold_to_warm_ms"), "runs": cold });
    }
    if args.wants("latency") {
        let lat = |k: &str| field_median(&latency, k);
        result["first_task"] = json!({ "first_ms": lat("first_ms"), "steady_median_ms": lat("steady_median_ms"), "ratio": lat("ratio"), "target": 1.15, "runs": latency });
    }
    if args.wants("rss") {
        let (r1, r8) = (field_median(&rss1, "peak_rss_mib"), field_median(&rss8, "peak_rss_mib"));
        result["peak_rss"] = json!({ "c1_mib": r1, "c8_mib": r8, "ratio": r8 / r1, "target": 1.15, "c1": rss1, "c8": rss8 });
    }

    // Throughput, in rounds that alternate with our SigLIP alone (a fresh process) so that both see
    // the same machine load; the pipeline is held to SigLIP alone's best batch size.
    if args.wants("throughput") {
        let concurrencies = [1usize, 2, 4];
        let (mut rounds, mut alone) = (Vec::new(), Vec::new());
        for round in 0..runs {
            if round % 2 == 1 {
                alone.push(spawn_siglip_child(&args.alone_batches)?);
            }
            let mut row = Vec::new();
            for c in concurrencies {
                row.push(throughput_row(&vision, &engine, &input, c).await?);
            }
            rounds.push(row);
            if round % 2 == 0 {
                alone.push(spawn_siglip_child(&args.alone_batches)?);
            }
            eprintln!(
                "throughput round {}: {} | SigLIP alone {}",
                round + 1,
                Value::from(rounds[round].clone()),
                alone[round]["images_per_s"]
            );
        }
        let fps = |r: &Vec<Value>, i: usize| r[i]["frames_per_s"].as_f64().unwrap_or(f64::NAN);
        let best_alone = |r: usize| alone[r]["best_images_per_s"].as_f64().unwrap_or(f64::NAN);
        let mut throughput = Vec::new();
        let mut versus = serde_json::Map::new();
        for (i, c) in concurrencies.iter().enumerate() {
            let med = |f: &dyn Fn(&Value) -> &Value| median(rounds.iter().filter_map(|r| f(&r[i]).as_f64()).collect());
            throughput.push(json!({
                "concurrency": c, "frames_per_s": median(rounds.iter().map(|r| fps(r, i)).collect()), "faces_per_s": med(&|r| &r["faces_per_s"]),
                "cpu_ms_per_frame": med(&|r| &r["cpu_ms_per_frame"]),
                "siglip_busy": med(&|r| &r[heimdex_worker::vision::SIGLIP_VISION]["busy"]),
                "siglip_ms_per_image": med(&|r| &r[heimdex_worker::vision::SIGLIP_VISION]["ms_per_item"]),
                "yunet_busy": med(&|r| &r[heimdex_worker::vision::YUNET]["busy"]),
                "yunet_ms_per_frame": med(&|r| &r[heimdex_worker::vision::YUNET]["ms_per_item"]),
            }));
            versus.insert(format!("c{c}"), json!(median((0..runs).map(|r| fps(&rounds[r], i) / best_alone(r)).collect())));
        }
        let best_pipeline = |r: usize| (0..concurrencies.len()).map(|i| fps(&rounds[r], i)).fold(f64::NAN, f64::max);
        versus.insert("best".into(), json!(median((0..runs).map(|r| best_pipeline(r) / best_alone(r)).collect())));
        versus.insert("target".into(), json!(0.85));
        let mut by_batch = serde_json::Map::new();
        for b in &args.alone_batches {
            let key = b.to_string();
            by_batch.insert(key.clone(), json!(median(alone.iter().filter_map(|a| a["images_per_s"][&key].as_f64()).collect())));
        }
        result["throughput"] = json!(throughput);
        result["siglip_batch_histogram"] = json!(vision.image_model().batch_histogram());
        result["siglip_alone"] = json!({
            "images_per_s": by_batch, "best_images_per_s": field_median(&alone, "best_images_per_s"),
            "best_batch": alone.iter().filter_map(|a| a["best_batch"].as_u64()).collect::<Vec<_>>(),
            "threads": settings.engine.threads(), "int8": settings.vision.embed_int8, "rounds": alone,
        });
        result["pipeline_over_siglip_alone"] = Value::Object(versus);
        result["throughput_rounds"] = json!(rounds);
    }

    // SigLIP alone, ours against onnxruntime's Python API as shipped (fp32), each in a fresh process,
    // alternating which runs first; then our embeddings against fp32's.
    if args.wants("siglip") {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for round in 0..runs {
            for step in 0..2 {
                if (round + step) % 2 == 0 {
                    ours.push(spawn_siglip_child(&args.alone_batches)?);
                } else {
                    theirs.push(siglip_alone_python(&args.python, &settings, &args.alone_batches)?);
                }
            }
            eprintln!("siglip round {}: ours {} | python fp32 {}", round + 1, ours[round]["images_per_s"], theirs[round]["images_per_s"]);
        }
        let best = |v: &Value| v["best_images_per_s"].as_f64().unwrap_or(f64::NAN);
        let by_batch = |runs: &[Value]| -> Value {
            args.alone_batches
                .iter()
                .map(|b| (b.to_string(), json!(median(runs.iter().filter_map(|r| r["images_per_s"][b.to_string()].as_f64()).collect()))))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        result["siglip"] = json!({
            "ours": { "images_per_s": by_batch(&ours), "best_images_per_s": field_median(&ours, "best_images_per_s"), "int8": settings.vision.embed_int8, "rounds": ours },
            "python_fp32": { "images_per_s": by_batch(&theirs), "best_images_per_s": field_median(&theirs, "best_images_per_s"), "onnxruntime": theirs[0]["onnxruntime"], "rounds": theirs },
            "ratio": median(ours.iter().zip(&theirs).map(|(o, t)| best(o) / best(t)).collect()),
            "round_ratios": ours.iter().zip(&theirs).map(|(o, t)| best(o) / best(t)).collect::<Vec<_>>(),
            "target": 1.5,
            "fidelity": siglip_fidelity(&vision, &engine, &settings).await?,
            "isa": heimdex_bench::measure::isa_flags(),
        });
    }

    if args.wants("inference") {
        let iters = 30;
        // Rust and Python alternate run by run, so that both see the same machine load.
        let (mut rust, mut py_runs) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            rust.push(rust_inference(&vision, &engine, &settings, batch, iters).await?);
            py_runs.push(python_inference(&args.python, &settings, batch, iters, 1)?);
        }
        let python = {
            let mut m = serde_json::Map::new();
            for key in ["yunet_b1".to_string(), "siglip_b1".to_string(), format!("siglip_b{batch}")] {
                m.insert(key.clone(), json!(median(py_runs.iter().filter_map(|v| v[&key].as_f64()).collect())));
            }
            m.insert("onnxruntime".into(), py_runs[0]["onnxruntime"].clone());
            Value::Object(m)
        };
        let mut inference = serde_json::Map::new();
        for key in ["yunet_b1".to_string(), "siglip_b1".to_string(), format!("siglip_b{batch}")] {
            let s = median(rust.iter().filter_map(|v| v[&key]["session_ms"].as_f64()).collect());
            let p = median(rust.iter().filter_map(|v| v[&key]["pipeline_ms"].as_f64()).collect());
            let py = python[&key].as_f64().unwrap_or(f64::NAN);
            inference.insert(key, json!({ "rust_session_ms": s, "rust_pipeline_ms": p, "python_ms": py, "rust_over_python": s / py }));
        }
        result["inference"] = Value::Object(inference);
        result["python_onnxruntime"] = python["onnxruntime"].clone();
    }

    if args.wants("decode") {
        let mut videos = vec![PathBuf::from(sample_path(&settings))];
        videos.extend(args.decode_video.iter().cloned());
        let mut rows = Vec::new();
        for v in &videos {
            let row = decode_breakdown(&vision, &settings, v, runs).await?;
            eprintln!("decode vs task: {row}");
            rows.push(row);
        }
        result["decode_vs_task"] = json!(rows);
    }
    if args.wants("decode-modes") {
        let mut rows = Vec::new();
        for v in std::iter::once(PathBuf::from(sample_path(&settings))).chain(args.decode_video.iter().cloned()) {
            let probe = heimdex_shared::media::probe(&v.display().to_string()).await?;
            let row = decode_modes(&settings, &v, &probe, runs)?;
            eprintln!("decode modes: {row}");
            rows.push(row);
        }
        result["decode_modes"] = json!(rows);
    }
    print_table(&result);
    write_report(&args.out, &result)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.1}"));
    println!("{:<44} {:>12}", "measure", "value");
    println!("{:<44} {:>12}", "cold start -> warm (load + warm-up) ms", f(&r["cold_start"]["cold_to_warm_ms"]));
    println!("{:<44} {:>12}", "  load ms / warm-up ms", format!("{} / {}", f(&r["cold_start"]["load_ms"]), f(&r["cold_start"]["warm_ms"])));
    println!("{:<44} {:>12}", "first task ms (sample.mp4)", f(&r["first_task"]["first_ms"]));
    println!("{:<44} {:>12}", "median of next 10 tasks ms", f(&r["first_task"]["steady_median_ms"]));
    println!("{:<44} {:>12}", "first / steady (target <= 1.15)", format!("{:.3}", r["first_task"]["ratio"].as_f64().unwrap_or(f64::NAN)));
    for t in r["throughput"].as_array().into_iter().flatten() {
        println!(
            "{:<44} {:>12}",
            format!("concurrency {}: frames/s | faces/s", t["concurrency"]),
            format!("{} | {}", f(&t["frames_per_s"]), f(&t["faces_per_s"]))
        );
        let pct = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{:.0} %", x * 100.0));
        println!(
            "{:<44} {:>12}",
            "  CPU ms/frame | SigLIP busy, ms/image | YuNet busy, ms/frame",
            format!(
                "{} | {}, {} | {}, {}",
                f(&t["cpu_ms_per_frame"]),
                pct(&t["siglip_busy"]),
                f(&t["siglip_ms_per_image"]),
                pct(&t["yunet_busy"]),
                f(&t["yunet_ms_per_frame"])
            )
        );
    }
    if let Some(m) = r["siglip_alone"]["images_per_s"].as_object() {
        let sweep: Vec<String> = m.iter().map(|(b, v)| format!("b{b} {}", f(v))).collect();
        println!("{:<44} {:>12}", "SigLIP alone (ours) images/s", sweep.join(" | "));
        println!("{:<44} {:>12}", "SigLIP alone: best images/s", f(&r["siglip_alone"]["best_images_per_s"]));
        let v = &r["pipeline_over_siglip_alone"];
        println!(
            "{:<44} {:>12}",
            "pipeline / SigLIP alone, c1 | c2 | c4",
            format!(
                "{:.2} | {:.2} | {:.2}",
                v["c1"].as_f64().unwrap_or(f64::NAN),
                v["c2"].as_f64().unwrap_or(f64::NAN),
                v["c4"].as_f64().unwrap_or(f64::NAN)
            )
        );
        println!(
            "{:<44} {:>12}",
            "best pipeline / SigLIP alone (target >= 0.85)",
            format!("{:.2}", v["best"].as_f64().unwrap_or(f64::NAN))
        );
    }
    if r["siglip"].is_object() {
        let s = &r["siglip"];
        let sweep = |m: &Value| {
            m.as_object().map(|m| m.iter().map(|(b, v)| format!("b{b} {}", f(v))).collect::<Vec<_>>().join(" | ")).unwrap_or_default()
        };
        println!("{:<44} {:>12}", format!("SigLIP alone, ours (int8 {}) images/s", s["ours"]["int8"]), sweep(&s["ours"]["images_per_s"]));
        println!("{:<44} {:>12}", "SigLIP alone, Python ORT fp32 images/s", sweep(&s["python_fp32"]["images_per_s"]));
        println!(
            "{:<44} {:>12}",
            "ours / Python fp32, best (target >= 1.5)",
            format!("{:.2} {}", s["ratio"].as_f64().unwrap_or(f64::NAN), s["round_ratios"])
        );
        let fid = &s["fidelity"];
        println!(
            "{:<44} {:>12}",
            format!("cosine to fp32 over {} real frames, mean | min", fid["frames"]),
            format!("{:.4} | {:.4}", fid["mean_cosine"].as_f64().unwrap_or(f64::NAN), fid["min_cosine"].as_f64().unwrap_or(f64::NAN))
        );
        println!("{:<44} {:>12}", "CPU flags", s["isa"].as_str().unwrap_or("-"));
    }
    println!("{:<44} {:>12}", "SigLIP batch histogram (index = size)", r["siglip_batch_histogram"].to_string());
    println!(
        "{:<44} {:>12}",
        "peak RSS MiB, concurrency 1 | 8",
        format!("{} | {}", f(&r["peak_rss"]["c1_mib"]), f(&r["peak_rss"]["c8_mib"]))
    );
    println!("{:<44} {:>12}", "RSS c8 / c1 (target <= 1.15)", format!("{:.3}", r["peak_rss"]["ratio"].as_f64().unwrap_or(f64::NAN)));
    if let Some(rows) = r["decode_vs_task"].as_array() {
        println!(
            "{:<28} {:>7} {:>12} {:>10} {:>9} {:>12} {:>14}",
            "video (concurrency 1)", "frames", "decode ms", "task ms", "decode %", "task wait ms", "CPU s/video h"
        );
        for v in rows {
            let name = v["media"].as_str().and_then(|m| m.rsplit('/').next()).unwrap_or("-");
            let share = v["decode_share"].as_f64().map_or("-".into(), |x| format!("{:.1}", x * 100.0));
            println!(
                "{:<28} {:>7} {:>12} {:>10} {:>9} {:>12} {:>14}",
                name,
                v["frames"],
                f(&v["decode_alone_ms"]),
                f(&v["task_ms"]),
                share,
                f(&v["task_waiting_for_decode_ms"]),
                f(&v["task_cpu_s_per_video_hour"])
            );
        }
    }
    for video in r["decode_modes"].as_array().into_iter().flatten() {
        let name = video["media"].as_str().and_then(|m| m.rsplit('/').next()).unwrap_or("-");
        println!("decode {name} at the task's rate, each way's ffmpeg (cpu {})", video["isa"].as_str().unwrap_or("-"));
        println!("{:<34} {:>14} {:>8} {:>20}", "way", "CPU ms/frame", "frames", "identical to task's");
        for w in video["ways"].as_array().into_iter().flatten() {
            let identical = w["identical_to_task"].as_u64().map_or("-".into(), |n| format!("{n} of {}", video["sampled_frames"]));
            println!(
                "{:<34} {:>14} {:>8} {:>20}",
                w["way"].as_str().unwrap_or("-"),
                f(&w["cpu_ms_per_sampled_frame"]),
                w["frames"].as_u64().map_or("-".into(), |n| n.to_string()),
                identical
            );
        }
    }
    println!("{:<22} {:>10} {:>12} {:>10} {:>8}", "model/batch", "rust ms", "rust+thread", "python ms", "rust/py");
    if let Some(m) = r["inference"].as_object() {
        for (k, v) in m {
            println!(
                "{:<22} {:>10} {:>12} {:>10} {:>8}",
                k,
                f(&v["rust_session_ms"]),
                f(&v["rust_pipeline_ms"]),
                f(&v["python_ms"]),
                format!("{:.2}", v["rust_over_python"].as_f64().unwrap_or(f64::NAN))
            );
        }
    }
}
