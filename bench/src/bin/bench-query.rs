//! Benchmark of query embeddings through the broker: the round trip of `QueryClient::embed` (one short
//! text) from a caller to a warm worker and back, p50 and p99, with 1 and 16 concurrent clients.
//!
//! `cargo run -p heimdex-bench --bin bench-query -- --out bench-results/query.json`
//!
//! It starts a real `worker-index` (or `--kind vision`) process from this target directory against
//! the configured broker, Redis and PostgreSQL server, under a private queue prefix and in a scratch
//! database that it creates, migrates and drops; it waits until the worker consumes its query queue,
//! runs `--warmup` queries, then measures. Each client is one `QueryClient` (its own connection), and
//! asks one query after another.
//!
//! `--flood N` measures instead what a flood of queries costs the tasks (issue 20, item 5): a
//! 10-minute recording (the bundle's speech clips and silences, as `bench-index` builds it) indexed
//! through the queue by the worker, alone and while N maximal requests (32 texts of 2,000
//! characters) sit in the query queue, in alternating rounds (`--rounds` of each). Quoted: the task's
//! time (enqueue to succeeded) and the worker's peak resident memory (VmRSS sampled every 50 ms) in
//! each round, their medians, and the median ratio flooded / alone of neighbouring rounds.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures::StreamExt;
use heimdex_bench::measure::{median, ms, quantile, write_report};
use heimdex_bench::recording::long_recording;
use heimdex_bench::scratch::ScratchDb;
use heimdex_producer::{EnqueueRequest, Producer};
use heimdex_shared::Settings;
use heimdex_shared::contract::TaskKind;
use heimdex_shared::jobs::JobStatus;
use heimdex_shared::query::{EmbedRequest, MAX_TEXT_CHARS, MAX_TEXTS, QueryClient, REPLY_TO};
use heimdex_shared::topology::{self, Topology};
use lapin::BasicProperties;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-results/query.json")]
    out: PathBuf,
    /// The worker kind to ask: `index` (MiniLM) or `vision` (the SigLIP text tower).
    #[arg(long, default_value = "index")]
    kind: String,
    /// Queries per client and concurrency.
    #[arg(long, default_value_t = 200)]
    queries: usize,
    /// Queries before measuring (connections, first batches).
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    /// Concurrent clients, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    clients: Vec<usize>,
    /// Measure a flood instead: N maximal requests in the query queue beside a 10-minute index task.
    #[arg(long, default_value_t = 0)]
    flood: usize,
    /// Rounds of each (alone, flooded) with `--flood`.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// TOML configuration file (broker, database server, models).
    #[arg(long, env = "HEIMDEX_CONFIG")]
    config: Option<PathBuf>,
}

/// Search-like queries, asked in turn.
const QUERIES: [&str; 8] = [
    "he was not an ill disposed young man",
    "a quarterly budget review",
    "someone talks about the weather in London",
    "how to change a bicycle tyre",
    "the speaker thanks the audience",
    "a dog running on the beach",
    "interest rates and inflation",
    "the keynote about distributed systems",
];

/// Runs `clients` clients of `per_client` queries each; returns every round trip in ms, sorted.
async fn measure(settings: &Settings, kind: TaskKind, model: &str, clients: usize, per_client: usize) -> Result<(Vec<f64>, f64)> {
    let mut connected = Vec::new();
    for _ in 0..clients {
        connected.push(QueryClient::connect(settings).await?);
    }
    let started = Instant::now();
    let runs = connected.iter().enumerate().map(|(c, client)| async move {
        let mut times = Vec::with_capacity(per_client);
        for i in 0..per_client {
            let text = QUERIES[(c + i) % QUERIES.len()].to_string();
            let asked = Instant::now();
            client.embed(kind, Some(model), vec![text]).await?;
            times.push(ms(asked));
        }
        anyhow::Ok(times)
    });
    let mut all: Vec<f64> = futures::future::try_join_all(runs).await?.into_iter().flatten().collect();
    let wall_s = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    Ok((all, wall_s))
}

/// The worker's resident memory now, in MiB (VmRSS).
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// One maximal request: 32 texts of 2,000 characters of varied words.
fn maximal_request(seed: usize) -> Vec<u8> {
    let words = QUERIES.join(" ");
    let texts = (0..MAX_TEXTS)
        .map(|i| {
            let mut text = format!("{seed} {i} ");
            while text.len() < MAX_TEXT_CHARS {
                text.push_str(&words);
                text.push(' ');
            }
            text.chars().take(MAX_TEXT_CHARS).collect()
        })
        .collect();
    EmbedRequest::new(texts, None).to_body()
}

/// The rounds of `--flood`: the recording indexed alone and flooded, alternating.
async fn flood(settings: &Settings, pid: u32, recording: &str, args: &Args) -> Result<Value> {
    let producer = Producer::connect(settings).await?;
    let topology = Topology::new(&settings.amqp);
    let queue = topology.query_queue(TaskKind::Index);
    // The flood's caller: one channel that consumes its direct replies and publishes the requests.
    let (_connection, channel) = topology::connect(&settings.amqp, "bench-flood").await?;
    let no_ack = BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() };
    let mut replies = channel.basic_consume(REPLY_TO.into(), "bench-flood".into(), no_ack, FieldTable::default()).await?;
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = answered.clone();
    let drain = tokio::spawn(async move {
        while let Some(Ok(_)) = replies.next().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let mut rounds = Vec::new();
    for round in 0..2 * args.rounds {
        let flooded = round % 2 == 1;
        let answered_before = answered.load(std::sync::atomic::Ordering::Relaxed);
        if flooded {
            for i in 0..args.flood {
                let properties = BasicProperties::default().with_reply_to(REPLY_TO.into()).with_correlation_id(i.to_string().into());
                topology::publish_confirmed(&channel, "", &queue, &maximal_request(i), properties).await?;
            }
        }
        let waiting = topology.declare_query_queue(&channel, TaskKind::Index).await?.message_count();
        let mut request = EnqueueRequest::all(recording);
        request.kinds = vec![TaskKind::Index];
        request.force = round > 0;
        let started = Instant::now();
        let job = producer.enqueue(&request).await?.jobs[0].job_id;
        let mut peak = 0f64;
        let deadline = started + Duration::from_secs(600);
        loop {
            peak = peak.max(rss_mib(pid).unwrap_or(0.0));
            let status: String = sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1").bind(job).fetch_one(producer.pool()).await?;
            if status == JobStatus::Succeeded.as_str() {
                break;
            }
            anyhow::ensure!(status != JobStatus::Dead.as_str() && status != JobStatus::Failed.as_str(), "the index job ended {status}");
            anyhow::ensure!(Instant::now() < deadline, "the index job not done after 600 s ({status})");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let task_s = started.elapsed().as_secs_f64();
        let during = answered.load(std::sync::atomic::Ordering::Relaxed) - answered_before;
        // The next round starts with an empty query queue and no query in the worker.
        let purged = channel.queue_purge(queue.as_str().into(), lapin::options::QueuePurgeOptions::default()).await?;
        let expected = answered_before + if flooded { args.flood - purged as usize } else { 0 };
        while answered.load(std::sync::atomic::Ordering::Relaxed) < expected {
            anyhow::ensure!(Instant::now() < deadline, "the worker did not answer the queries it took");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "round {}: {} task {task_s:.1} s, peak RSS {peak:.0} MiB, {waiting} queries waiting at enqueue, {during} answered during the task",
            round + 1,
            if flooded { "flooded" } else { "alone  " }
        );
        rounds.push(
            json!({"flooded": flooded, "task_s": task_s, "peak_rss_mib": peak, "queries_waiting": waiting, "answered_during_task": during}),
        );
    }
    drain.abort();
    let of = |flooded: bool, key: &str| median(rounds.iter().filter(|r| r["flooded"] == flooded).filter_map(|r| r[key].as_f64()).collect());
    let ratio = median(rounds.chunks(2).filter_map(|pair| Some(pair.get(1)?["task_s"].as_f64()? / pair[0]["task_s"].as_f64()?)).collect());
    println!(
        "a 10-minute index task through the queue, alone and beside {} maximal queries ({} rounds each, medians)",
        args.flood, args.rounds
    );
    println!("{:<10} {:>8} {:>14}", "", "task s", "peak RSS MiB");
    for (name, flooded) in [("alone", false), ("flooded", true)] {
        println!("{name:<10} {:>8.1} {:>14.0}", of(flooded, "task_s"), of(flooded, "peak_rss_mib"));
    }
    println!("flooded / alone: {ratio:.2} (median of neighbouring rounds; target <= 1.25, peak RSS <= 1000 MB)");
    Ok(json!({
        "flood": args.flood,
        "query_share": settings.worker.query_share,
        "median": {
            "alone": {"task_s": of(false, "task_s"), "peak_rss_mib": of(false, "peak_rss_mib")},
            "flooded": {"task_s": of(true, "task_s"), "peak_rss_mib": of(true, "peak_rss_mib")},
        },
        "ratio_flooded_over_alone": ratio,
        "target": {"ratio": 1.25, "peak_rss_mb": 1000},
        "runs": Value::Array(rounds),
    }))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let kind: TaskKind = match args.kind.as_str() {
        "index" => TaskKind::Index,
        "vision" => TaskKind::Vision,
        other => bail!("--kind {other}: index or vision"),
    };
    let mut settings = heimdex_shared::config::load(args.config.as_deref())?;
    settings.amqp.prefix = format!("heimdex-bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let model = match kind {
        TaskKind::Index => settings.index.embed_model.clone(),
        TaskKind::Vision => settings.vision.embed_model.clone(),
    };
    let media = std::env::temp_dir().join(format!("bench-query-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&media)?;
    settings.media.root.clone_from(&media);
    let db = ScratchDb::create(&settings, "query").await?;
    if args.flood > 0 {
        anyhow::ensure!(kind == TaskKind::Index, "--flood measures the index worker");
        long_recording(&settings.models.dir.join("media/speech"), 600.0, &media.join("long.wav")).await?;
    }
    let exe = std::env::current_exe()?;
    let binary = exe.parent().context("target dir")?.join(format!("worker-{kind}"));
    anyhow::ensure!(binary.is_file(), "{} not built: cargo build --bins", binary.display());
    let mut worker = tokio::process::Command::new(&binary)
        .env("HEIMDEX__DATABASE__URL", db.url())
        .env("HEIMDEX__AMQP__PREFIX", &settings.amqp.prefix)
        .env("HEIMDEX__WORKER__HEALTH_ADDR", "127.0.0.1:0")
        .env("HEIMDEX__WORKER__ID", format!("bench-query-{kind}"))
        .env("HEIMDEX__MEDIA__ROOT", &media)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;

    let result = async {
        // Warm means consuming the query queue.
        let (_connection, channel) = topology::connect(&settings.amqp, "bench-query").await?;
        let topology = Topology::new(&settings.amqp);
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut warm_after = Duration::ZERO;
        let started = Instant::now();
        while topology.declare_query_queue(&channel, kind).await?.consumer_count() == 0 {
            if let Some(status) = worker.try_wait()? {
                bail!("worker-{kind} exited ({status}) before it was warm");
            }
            anyhow::ensure!(Instant::now() < deadline, "worker-{kind} not warm after 300 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
            warm_after = started.elapsed();
        }
        eprintln!("worker-{kind} warm after {:.1} s; {} warm-up queries", warm_after.as_secs_f64(), args.warmup);
        measure(&settings, kind, &model, 1, args.warmup).await?;
        println!("CPU: {} cores, {}", std::thread::available_parallelism().map_or(1, usize::from), heimdex_bench::measure::isa_flags());
        let measured = if args.flood > 0 {
            let pid = worker.id().context("the worker's pid")?;
            let recording = media.join("long.wav").display().to_string();
            json!({"flood": flood(&db.settings, pid, &recording, &args).await?})
        } else {
            let mut rows = Vec::new();
            println!("query round trip through the broker to a warm worker-{kind} ({model})");
            println!("{:>8} {:>9} {:>9} {:>9} {:>9} {:>11}", "clients", "queries", "p50 ms", "p99 ms", "max ms", "queries/s");
            for &clients in &args.clients {
                let (times, wall_s) = measure(&settings, kind, &model, clients, args.queries).await?;
                let row = json!({
                    "clients": clients,
                    "queries": times.len(),
                    "p50_ms": quantile(&times, 0.50),
                    "p99_ms": quantile(&times, 0.99),
                    "max_ms": times.last().copied().unwrap_or(f64::NAN),
                    "per_s": times.len() as f64 / wall_s,
                });
                println!(
                    "{:>8} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>11.0}",
                    clients,
                    times.len(),
                    row["p50_ms"].as_f64().unwrap_or(f64::NAN),
                    row["p99_ms"].as_f64().unwrap_or(f64::NAN),
                    row["max_ms"].as_f64().unwrap_or(f64::NAN),
                    row["per_s"].as_f64().unwrap_or(f64::NAN)
                );
                rows.push(row);
            }
            json!({"runs": Value::Array(rows)})
        };
        // The worker first: a worker whose queues vanish under it reconnects until it is stopped.
        let _ = worker.start_kill();
        let _ = worker.wait().await;
        let _ = topology.delete(&channel, &settings.worker).await;
        anyhow::Ok(json!({
            "kind": kind.as_str(),
            "model": model,
            "cores": std::thread::available_parallelism().map_or(1, usize::from),
            "isa": heimdex_bench::measure::isa_flags(),
            "warm_after_s": warm_after.as_secs_f64(),
            "measured": measured,
        }))
    }
    .await;
    let _ = worker.start_kill();
    let _ = worker.wait().await;
    db.drop_it().await;
    let _ = std::fs::remove_dir_all(&media);
    let report = result?;
    write_report(&args.out, &report)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
