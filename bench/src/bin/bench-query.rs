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

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use heimdex_bench::measure::{ms, quantile, write_report};
use heimdex_bench::scratch::ScratchDb;
use heimdex_shared::Settings;
use heimdex_shared::contract::TaskKind;
use heimdex_shared::query::QueryClient;
use heimdex_shared::topology::{self, Topology};
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
    let db = ScratchDb::create(&settings, "query").await?;
    let exe = std::env::current_exe()?;
    let binary = exe.parent().context("target dir")?.join(format!("worker-{kind}"));
    anyhow::ensure!(binary.is_file(), "{} not built: cargo build --bins", binary.display());
    let mut worker = tokio::process::Command::new(&binary)
        .env("HEIMDEX__DATABASE__URL", db.url())
        .env("HEIMDEX__AMQP__PREFIX", &settings.amqp.prefix)
        .env("HEIMDEX__WORKER__HEALTH_ADDR", "127.0.0.1:0")
        .env("HEIMDEX__WORKER__ID", format!("bench-query-{kind}"))
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
        // The worker first: a worker whose queues vanish under it reconnects until it is stopped.
        let _ = worker.start_kill();
        let _ = worker.wait().await;
        let _ = topology.delete(&channel, &settings.worker).await;
        anyhow::Ok(json!({
            "kind": kind.as_str(),
            "model": model,
            "cores": std::thread::available_parallelism().map_or(1, usize::from),
            "warm_after_s": warm_after.as_secs_f64(),
            "runs": Value::Array(rows),
        }))
    }
    .await;
    let _ = worker.start_kill();
    let _ = worker.wait().await;
    db.drop_it().await;
    let report = result?;
    write_report(&args.out, &report)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
