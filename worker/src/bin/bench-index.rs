//! Benchmark of the index pipeline on the real models and media (`cargo run -p heimdex-worker --bin
//! bench-index -- --out bench-results/index.json`): cold start, first task against steady state,
//! real-time factors, parallel against sequential chunks, KV cache, embedding throughput, peak RSS at
//! two concurrencies (each in a fresh child process), and the same encoder/embedding runs through
//! onnxruntime's Python API side by side. Prints a table and writes JSON.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use heimdex_worker::bench::{median, ms, peak_rss_mib};
use heimdex_shared::Settings;
use heimdex_worker::engine::Engine;
use heimdex_worker::engine::registry::ModelRegistry;
use heimdex_worker::index::IndexPipeline;
use heimdex_worker::media::audio::decode_all;
use heimdex_worker::metrics::Metrics;
use heimdex_worker::pipeline::{LoadContext, Pipeline, StageTimings};
use ort::value::Tensor;
use serde_json::{Value, json};

#[derive(Parser, Debug)]
struct Args {
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-results/index.json")]
    out: PathBuf,
    /// Length of the long synthetic audio (speech clips with silences), seconds.
    #[arg(long, default_value_t = 600.0)]
    long_s: f64,
    /// Repetitions behind each median.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Internal: measure peak RSS with this many concurrent tasks and print it.
    #[arg(long, hide = true)]
    rss_child: Option<usize>,
}

/// A scratch folder removed on drop (tempfile is only a dev-dependency).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        let path = std::env::temp_dir().join(format!("bench-index-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}




fn load(settings: &Settings, engine: &Engine) -> Result<IndexPipeline> {
    let models = ModelRegistry::open(&settings.models).expect("model directory");
    IndexPipeline::load(&LoadContext { settings, engine, models: &models })
}

fn ffmpeg(args: &[&str]) -> Result<()> {
    let out = Command::new("ffmpeg").args(["-nostdin", "-v", "error", "-y"]).args(args).output()?;
    if !out.status.success() {
        bail!("ffmpeg {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The bundle's speech clips, each followed by 2 s of silence, repeated to `seconds`.
fn long_audio(dir: &Path, speech: &Path, seconds: f64) -> Result<PathBuf> {
    let silence = dir.join("silence.wav");
    ffmpeg(&["-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "2", "-c:a", "pcm_s16le", &silence.display().to_string()])?;
    let mut clips: Vec<PathBuf> = std::fs::read_dir(speech)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wav") && !p.ends_with("librivox_5clips.wav"))
        .collect();
    clips.sort();
    let mut list = String::new();
    let mut total = 0.0;
    while total < seconds {
        for c in &clips {
            list.push_str(&format!("file '{}'\nfile '{}'\n", c.display(), silence.display()));
            total += std::fs::metadata(c)?.len() as f64 / 32_000.0 + 2.0;
        }
    }
    let list_path = dir.join("list.txt");
    std::fs::write(&list_path, list)?;
    let out = dir.join("long.wav");
    ffmpeg(&["-f", "concat", "-safe", "0", "-i", &list_path.display().to_string(), "-t", &seconds.to_string(), &out.display().to_string()])?;
    Ok(out)
}

async fn rss_child(concurrency: usize, settings: &Settings, engine: &Engine, sample: &str) -> Result<Value> {
    let p = load(settings, engine)?;
    p.warm_up().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let after_warm = peak_rss_mib();
    for _ in 0..3 {
        let timings: Vec<StageTimings> = (0..concurrency).map(|_| StageTimings::default()).collect();
        let tasks = timings.iter().map(|t| p.index(sample, None, t));
        for r in futures::future::join_all(tasks).await {
            r.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    Ok(json!({"concurrency": concurrency, "vm_hwm_mb": peak_rss_mib(), "vm_hwm_after_warmup_mb": after_warm}))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let settings = Settings::default();
    let bundle = settings.models.dir.clone();
    let sample = bundle.join("media/video/sample.mp4").display().to_string();
    let engine = Engine::new(settings.engine.clone(), Arc::new(Metrics::new()))?;
    if let Some(n) = args.rss_child {
        println!("{}", rss_child(n, &settings, &engine, &sample).await?);
        return Ok(());
    }
    let mut results = serde_json::Map::new();
    let threads = settings.engine.threads();
    results.insert("machine".into(), json!({"cores": std::thread::available_parallelism().map_or(1, usize::from), "intra_threads": threads, "max_batch": settings.engine.max_batch}));

    // Cold start to warm.
    let t = Instant::now();
    let p = load(&settings, &engine)?;
    let load_ms = ms(t);
    let t = Instant::now();
    let reports = p.warm_up().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let warm_ms = ms(t);
    results.insert("cold_start".into(), json!({"load_ms": load_ms, "warmup_ms": warm_ms, "total_ms": load_ms + warm_ms,
        "warmup": reports.iter().map(|r| json!({"model": r.model, "batches": r.batch_sizes, "ms": r.duration.as_secs_f64() * 1000.0})).collect::<Vec<_>>()}));

    // First task against the median of the next ten, and the real-time factor on the sample video.
    let mut task_ms = Vec::new();
    let mut audio_s = 0.0;
    for _ in 0..11 {
        let t = Instant::now();
        let (out, _) = p.index(&sample, None, &StageTimings::default()).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        task_ms.push(ms(t));
        audio_s = out.audio_s;
    }
    let steady = median(task_ms[1..].to_vec());
    results.insert("first_task".into(), json!({"first_ms": task_ms[0], "steady_median_ms": steady, "ratio": task_ms[0] / steady, "target_ratio": 1.15}));
    results.insert("rtf_sample".into(), json!({"audio_s": audio_s, "median_ms": steady, "rtf": steady / 1000.0 / audio_s}));

    // Long audio: real-time factor, then parallel (batched) against sequential chunks.
    let dir = TempDir::new()?;
    let long = long_audio(dir.path(), &bundle.join("media/speech"), args.long_s)?.display().to_string();
    let t = Instant::now();
    let (out, transcript) = p.index(&long, None, &StageTimings::default()).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let long_ms = ms(t);
    results.insert("rtf_long".into(), json!({"audio_s": out.audio_s, "ms": long_ms, "rtf": long_ms / 1000.0 / out.audio_s,
        "chunks": transcript.stats.chunks, "segments": out.segments.len(), "runs": 1}));
    let tr = p.transcriber();
    let (chunks, _) = tr.collect_chunks(&long).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let n = chunks.len().min(2 * tr.asr.max_batch());
    let chunks = chunks[..n].to_vec();
    let en = tr.language_token("en").ok();
    let t = Instant::now();
    tr.transcribe_chunks(chunks.clone(), en, false).await?;
    let seq_ms = ms(t);
    let t = Instant::now();
    tr.transcribe_chunks(chunks, en, true).await?;
    let par_ms = ms(t);
    let speedup = seq_ms / par_ms;
    results.insert("parallel_chunks".into(), json!({"chunks": n, "sequential_ms": seq_ms, "parallel_ms": par_ms, "speedup": speedup,
        "efficiency_vs_batch": speedup / tr.asr.max_batch().min(n) as f64, "asr_batch_histogram": tr.asr.batch_histogram()}));

    // Decoder tokens/s with and without the KV cache (one clip, one window, batch 1; the token loop
    // only, timed by the model thread, so the encoder is not counted).
    let clip = decode_all(&bundle.join("media/speech/sense_and_sensibility_01_austen_64kb-0870.wav").display().to_string(), 60.0).await?;
    let mut kv = Vec::new();
    for cache in [true, false] {
        let mut times = Vec::new();
        let mut tokens = 0;
        for _ in 0..args.runs.min(3) {
            let res = tr.decode_window(clip.clone(), en, false, cache).await?;
            tokens = res.tokens.len();
            times.push(f64::from(res.decode_s) * 1000.0);
        }
        let m = median(times);
        kv.push(json!({"kv_cache": cache, "tokens": tokens, "decode_median_ms": m, "tokens_per_s": tokens as f64 / (m / 1000.0)}));
    }
    results.insert("decoder".into(), Value::Array(kv));

    // Embeddings/s at batch 1 and 32 through the engine.
    let sentence = "he might even have been made amiable himself had he married a more amiable woman";
    let mut emb = serde_json::Map::new();
    for b in [1usize, 32] {
        let enc = p.embedder().encode(vec![sentence.to_string(); b]).await?;
        let mut times = Vec::new();
        for _ in 0..args.runs {
            let t = Instant::now();
            p.embedder().handle().run_exact(enc.clone()).await?;
            times.push(ms(t));
        }
        let m = median(times);
        emb.insert(format!("batch_{b}"), json!({"median_ms": m, "per_s": b as f64 / (m / 1000.0)}));
    }
    results.insert("embeddings".into(), Value::Object(emb));
    drop(p);

    // Rust against Python ORT on the same files, threads and batches (direct session runs).
    // Two alternating rounds, so that load from other processes hits both sides alike.
    let mut rounds = Vec::new();
    for _ in 0..2 {
        rounds.push(rust_vs_python(&settings, &engine, &sample, dir.path(), args.runs).await?);
    }
    let mut summary = serde_json::Map::new();
    for side in ["rust_ms", "python_ms"] {
        let mut m = serde_json::Map::new();
        for k in ["encoder_b1_ms", "encoder_b4_ms", "embed_b1_ms", "embed_b32_ms"] {
            m.insert(k.into(), json!(median(rounds.iter().filter_map(|r| r[side][k].as_f64()).collect())));
        }
        summary.insert(side.into(), Value::Object(m));
    }
    summary.insert("rounds".into(), Value::Array(rounds));
    results.insert("rust_vs_python".into(), Value::Object(summary));

    // Peak RSS, each concurrency in a fresh process.
    let exe = std::env::current_exe()?;
    let mut rss = Vec::new();
    for c in [1usize, 4] {
        let out = Command::new(&exe).args(["--rss-child", &c.to_string()]).output()?;
        if !out.status.success() {
            bail!("rss child: {}", String::from_utf8_lossy(&out.stderr));
        }
        let line = String::from_utf8_lossy(&out.stdout);
        rss.push(serde_json::from_str::<Value>(line.lines().last().unwrap_or("{}"))?);
    }
    let ratio = rss[1]["vm_hwm_mb"].as_f64().unwrap_or(0.0) / rss[0]["vm_hwm_mb"].as_f64().unwrap_or(1.0);
    results.insert("peak_rss".into(), json!({"runs": rss, "ratio_c4_c1": ratio, "target_ratio": 1.15}));

    let results = Value::Object(results);
    print_table(&results);
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&results)?)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

async fn rust_vs_python(settings: &Settings, engine: &Engine, sample: &str, dir: &Path, runs: usize) -> Result<Value> {
    let s = &settings.index;
    let wdir = settings.models.dir.join(&s.whisper_dir);
    let embed_path = settings.models.dir.join(&s.embed_dir).join(&s.embed_file);
    let mel = heimdex_worker::index::mel::LogMel::load(&wdir.join("mel_filters.f32"))?;
    let audio = decode_all(sample, 60.0).await?;
    let features = mel.compute(&audio);
    let mel_file = dir.join("mel.f32");
    std::fs::write(&mel_file, features.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())?;
    let tok = tokenizers::Tokenizer::from_file(settings.models.dir.join(&s.embed_dir).join("tokenizer.json")).map_err(|e| anyhow::anyhow!("{e}"))?;
    let ids: Vec<i64> = tok
        .encode("he might even have been made amiable himself had he married a more amiable woman", true)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .get_ids()
        .iter()
        .map(|&i| i64::from(i))
        .collect();
    let (enc_batches, emb_batches) = ([1usize, 4], [1usize, 32]);
    let mut rust = serde_json::Map::new();
    let timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?;
        let mut t = Vec::new();
        for _ in 0..runs {
            let s = Instant::now();
            f()?;
            t.push(ms(s));
        }
        Ok(median(t))
    };
    let mut enc = engine.session(&wdir.join("encoder_model.onnx"))?;
    for b in enc_batches {
        let feats: Vec<f32> = features.repeat(b);
        let m = timed(&mut || {
            enc.run(ort::inputs!["input_features" => Tensor::from_array(([b, 80, 3000], feats.clone()))?])?;
            Ok(())
        })?;
        rust.insert(format!("encoder_b{b}_ms"), json!(m));
    }
    drop(enc);
    let mut emb = engine.session(&embed_path)?;
    let names: Vec<String> = emb.inputs().iter().map(|i| i.name().to_string()).collect();
    for b in emb_batches {
        let x: Vec<i64> = ids.repeat(b);
        let len = ids.len();
        let m = timed(&mut || {
            let mut feed: Vec<(String, ort::session::SessionInputValue<'_>)> = Vec::new();
            for n in &names {
                let data = match n.as_str() {
                    "input_ids" => x.clone(),
                    "attention_mask" => vec![1; b * len],
                    _ => vec![0; b * len],
                };
                feed.push((n.clone(), Tensor::from_array(([b, len], data))?.into()));
            }
            emb.run(feed)?;
            Ok(())
        })?;
        rust.insert(format!("embed_b{b}_ms"), json!(m));
    }
    let spec = json!({"threads": settings.engine.threads(), "spinning": settings.engine.allow_spinning, "runs": runs,
        "encoder": wdir.join("encoder_model.onnx"), "embed": embed_path, "mel_file": mel_file,
        "encoder_batches": enc_batches, "embed_batches": emb_batches, "embed_ids": ids});
    let spec_file = dir.join("spec.json");
    std::fs::write(&spec_file, spec.to_string())?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("../.deps/venv/bin/python");
    let out = Command::new(&python).arg(root.join("benches/ort_index.py")).arg(&spec_file).output().with_context(|| format!("{}", python.display()))?;
    if !out.status.success() {
        bail!("python ORT reference failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let py: Value = serde_json::from_slice(&out.stdout)?;
    Ok(json!({"rust_ms": rust, "python_ms": py, "threads": settings.engine.threads(), "runs": runs}))
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.2}"));
    println!("{:<46} {:>14}", "metric", "value");
    let rows = [
        ("cold start: load ms", &r["cold_start"]["load_ms"]),
        ("cold start: warm-up ms", &r["cold_start"]["warmup_ms"]),
        ("first task ms", &r["first_task"]["first_ms"]),
        ("steady median ms (next 10)", &r["first_task"]["steady_median_ms"]),
        ("first / steady (target <= 1.15)", &r["first_task"]["ratio"]),
        ("RTF sample.mp4", &r["rtf_sample"]["rtf"]),
        ("RTF long audio", &r["rtf_long"]["rtf"]),
        ("long audio s", &r["rtf_long"]["audio_s"]),
        ("chunks: sequential ms", &r["parallel_chunks"]["sequential_ms"]),
        ("chunks: parallel ms", &r["parallel_chunks"]["parallel_ms"]),
        ("chunks: speed-up", &r["parallel_chunks"]["speedup"]),
        ("decoder tokens/s KV cache", &r["decoder"][0]["tokens_per_s"]),
        ("decoder tokens/s no cache", &r["decoder"][1]["tokens_per_s"]),
        ("embeddings/s batch 1", &r["embeddings"]["batch_1"]["per_s"]),
        ("embeddings/s batch 32", &r["embeddings"]["batch_32"]["per_s"]),
        ("peak RSS MB concurrency 1", &r["peak_rss"]["runs"][0]["vm_hwm_mb"]),
        ("peak RSS MB concurrency 4", &r["peak_rss"]["runs"][1]["vm_hwm_mb"]),
        ("RSS c4 / c1 (target <= 1.15)", &r["peak_rss"]["ratio_c4_c1"]),
    ];
    for (name, v) in rows {
        println!("{name:<46} {:>14}", f(v));
    }
    for k in ["encoder_b1_ms", "encoder_b4_ms", "embed_b1_ms", "embed_b32_ms"] {
        println!(
            "{:<46} {:>14}",
            format!("{k}: rust / python"),
            format!("{} / {}", f(&r["rust_vs_python"]["rust_ms"][k]), f(&r["rust_vs_python"]["python_ms"][k]))
        );
    }
}
