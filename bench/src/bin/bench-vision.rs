//! Benchmark of the vision pipeline: cold start, first task vs steady state, throughput by
//! concurrency, SigLIP batch sizes, peak RSS by concurrency, and Rust vs Python ONNX Runtime latency.
//!
//! `cargo run -p heimdex-bench --bin bench-vision -- --out bench-results/vision.json`
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
use heimdex_bench::measure::{child_json, field_median, median, ms, peak_rss_mib};
use heimdex_shared::Settings;
use heimdex_shared::contract::TaskKind;
use heimdex_worker::engine::Engine;
use heimdex_worker::engine::registry::ModelRegistry;
use heimdex_worker::media::frames::{Frame, decode_still};
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
}




fn sample_path(settings: &Settings) -> String {
    settings.models.dir.join("media/video/sample.mp4").display().to_string()
}

async fn load(settings: &Settings) -> Result<(VisionPipeline, Engine, f64, f64)> {
    let started = Instant::now();
    let engine = Engine::new(settings.engine.clone(), Arc::new(Metrics::new()))?;
    let registry = ModelRegistry::open(&settings.models).expect("model directory");
    let vision = VisionPipeline::load(&LoadContext { settings, engine: &engine, models: &registry })?;
    let load_ms = ms(started);
    let started = Instant::now();
    vision.warm_up().await?;
    Ok((vision, engine, load_ms, ms(started)))
}

async fn input(settings: &Settings) -> Result<TaskInput> {
    let media = sample_path(settings);
    let probe = heimdex_shared::media::probe(&media).await?;
    let id = uuid::Uuid::new_v4;
    let run = heimdex_shared::jobs::Run { job_id: id(), video_id: id(), token: id(), attempt: 1, deaths: 0 };
    Ok(TaskInput { run, db: None, kind: TaskKind::Vision, media, probe, options: Default::default() })
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
    let working = Arc::new(Frame::from_rgb(0, 0.0, 640, 360, pillow_bicubic(&frame.rgb, frame.width as usize, frame.height as usize, 640, 360)));
    let pixels = siglip_pixels(&frame.rgb, frame.width, frame.height, settings.vision.embed_image_size)?;
    let image = vision.image_model();
    let yunet_pipe = time_async(iters, || async { Ok(vision.face_model().run_exact(vec![working.clone()]).await.map(drop)?) }).await?;
    let siglip_pipe_1 = time_async(iters, || async { Ok(image.run_exact(vec![pixels.clone()]).await.map(drop)?) }).await?;
    let siglip_pipe_b = time_async(iters, || async { Ok(image.run_exact(vec![pixels.clone(); batch]).await.map(drop)?) }).await?;
    Ok(json!({
        "yunet_b1": { "session_ms": yunet_raw, "pipeline_ms": yunet_pipe },
        "siglip_b1": { "session_ms": siglip_raw[0], "pipeline_ms": siglip_pipe_1 },
        format!("siglip_b{batch}"): { "session_ms": siglip_raw[1], "pipeline_ms": siglip_pipe_b },
    }))
}

/// Median latency of `f` over `iters` runs after 3 warm runs.
async fn time_async<F, Fut>(iters: usize, f: F) -> Result<f64>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut v = Vec::new();
    for i in 0..iters + 3 {
        let t = Instant::now();
        f().await?;
        if i >= 3 {
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
                .args(["--threads", &settings.engine.threads().to_string(), "--spin", if settings.engine.allow_spinning { "1" } else { "0" }])
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

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let settings = heimdex_shared::config::load(None)?;
    if let Some(mode) = &args.child {
        println!("{}", child(mode, args.concurrency, &settings).await?);
        return Ok(());
    }
    let runs = args.runs.max(1);
    eprintln!("bench-vision: {} intra-op threads, max batch {}, {runs} runs each", settings.engine.threads(), settings.engine.max_batch);

    let cold: Vec<Value> = (0..runs).map(|_| spawn_child("cold", 1)).collect::<Result<_>>()?;
    let latency: Vec<Value> = (0..runs).map(|_| spawn_child("latency", 1)).collect::<Result<_>>()?;
    let rss1: Vec<Value> = (0..runs).map(|_| spawn_child("rss", 1)).collect::<Result<_>>()?;
    let rss8: Vec<Value> = (0..runs).map(|_| spawn_child("rss", 8)).collect::<Result<_>>()?;

    let (vision, engine, _, _) = load(&settings).await?;
    let input = input(&settings).await?;
    let mut throughput = Vec::new();
    for c in [1usize, 2, 4] {
        let mut fps = Vec::new();
        let mut faces_ps = Vec::new();
        for _ in 0..runs {
            let (wall, frames, faces) = run_tasks(&vision, &input, c * 2, c).await?;
            fps.push(frames as f64 / wall * 1000.0);
            faces_ps.push(faces as f64 / wall * 1000.0);
        }
        throughput.push(json!({ "concurrency": c, "frames_per_s": median(fps), "faces_per_s": median(faces_ps) }));
    }
    let histogram = vision.image_model().batch_histogram();
    let batch = settings.engine.max_batch;
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
    let lat = |k: &str| field_median(&latency, k);
    let (r1, r8) = (field_median(&rss1, "peak_rss_mib"), field_median(&rss8, "peak_rss_mib"));
    let mut inference = serde_json::Map::new();
    for key in ["yunet_b1".to_string(), "siglip_b1".to_string(), format!("siglip_b{batch}")] {
        let s = median(rust.iter().filter_map(|v| v[&key]["session_ms"].as_f64()).collect());
        let p = median(rust.iter().filter_map(|v| v[&key]["pipeline_ms"].as_f64()).collect());
        let py = python[&key].as_f64().unwrap_or(f64::NAN);
        inference.insert(key, json!({ "rust_session_ms": s, "rust_pipeline_ms": p, "python_ms": py, "rust_over_python": s / py }));
    }
    let result = json!({
        "machine": { "threads": settings.engine.threads(), "max_batch": batch, "runs": runs },
        "cold_start": { "load_ms": field_median(&cold, "load_ms"), "warm_ms": field_median(&cold, "warm_ms"), "cold_to_warm_ms": field_median(&cold, "cold_to_warm_ms"), "runs": cold },
        "first_task": { "first_ms": lat("first_ms"), "steady_median_ms": lat("steady_median_ms"), "ratio": lat("ratio"), "target": 1.15, "runs": latency },
        "throughput": throughput,
        "siglip_batch_histogram": histogram,
        "peak_rss": { "c1_mib": r1, "c8_mib": r8, "ratio": r8 / r1, "target": 1.15, "c1": rss1, "c8": rss8 },
        "inference": inference,
        "python_onnxruntime": python["onnxruntime"],
    });
    print_table(&result);
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&result)?)?;
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
        println!("{:<44} {:>12}", format!("concurrency {}: frames/s | faces/s", t["concurrency"]), format!("{} | {}", f(&t["frames_per_s"]), f(&t["faces_per_s"])));
    }
    println!("{:<44} {:>12}", "SigLIP batch histogram (index = size)", r["siglip_batch_histogram"].to_string());
    println!("{:<44} {:>12}", "peak RSS MiB, concurrency 1 | 8", format!("{} | {}", f(&r["peak_rss"]["c1_mib"]), f(&r["peak_rss"]["c8_mib"])));
    println!("{:<44} {:>12}", "RSS c8 / c1 (target <= 1.15)", format!("{:.3}", r["peak_rss"]["ratio"].as_f64().unwrap_or(f64::NAN)));
    println!("{:<22} {:>10} {:>12} {:>10} {:>8}", "model/batch", "rust ms", "rust+thread", "python ms", "rust/py");
    if let Some(m) = r["inference"].as_object() {
        for (k, v) in m {
            println!("{:<22} {:>10} {:>12} {:>10} {:>8}", k, f(&v["rust_session_ms"]), f(&v["rust_pipeline_ms"]), f(&v["python_ms"]), format!("{:.2}", v["rust_over_python"].as_f64().unwrap_or(f64::NAN)));
        }
    }
}
