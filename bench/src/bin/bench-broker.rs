//! What quorum queues cost against classic ones (issue 27): publish-confirm latency and throughput of
//! persistent task-sized messages into a durable queue of each type, on the configured broker (one
//! node, or a cluster through `HEIMDEX__AMQP__URLS`).
//!
//! `cargo run --release -p heimdex-bench --bin bench-broker -- --out bench-results/broker.json`
//!
//! Rounds alternate classic and quorum (`--rounds` of each), so that a drift of the machine's load
//! touches both alike; each round declares a private queue (the arguments of a work queue of its
//! type, as `topology` declares them), measures, and deletes it. Quoted per type: the median over
//! rounds of the round's p50 and p99 latency of one publish waited for alone (publish, confirm, the
//! next), and of the throughput with `--window` publishes waiting for their confirms at once.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use heimdex_bench::measure::{median, ms, quantile, write_report};
use heimdex_shared::config::QueueType;
use heimdex_shared::topology;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-results/broker.json")]
    out: PathBuf,
    /// Rounds of each queue type.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Publishes waited for one at a time, per round.
    #[arg(long, default_value_t = 500)]
    sequential: usize,
    /// Publishes in the throughput part of a round.
    #[arg(long, default_value_t = 5000)]
    pipelined: usize,
    /// Publishes waiting for their confirms at once in the throughput part.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Configuration file (else defaults and `HEIMDEX__*` variables).
    #[arg(long)]
    config: Option<PathBuf>,
}

/// A work queue's arguments for `queue_type` (those of `topology::Topology::declare`).
fn queue_args(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(queue_type.as_str().into()));
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
    args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString("bench-broker.dlq".into()));
    if queue_type == QueueType::Quorum {
        args.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
        args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(topology::DELIVERY_LIMIT)));
    }
    args
}

/// One round: (p50 ms, p99 ms, messages per second).
async fn round(settings: &heimdex_shared::Settings, queue_type: QueueType, args: &Args) -> Result<(f64, f64, f64)> {
    let (connection, channel) = topology::connect(&settings.amqp, "bench-broker").await.context("connecting to the broker")?;
    let queue = format!("bench-broker.{queue_type}.{}", uuid::Uuid::new_v4().simple());
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel.queue_declare(queue.as_str().into(), durable, queue_args(queue_type)).await?;
    // A task message's size: the JSON of a `TaskMessage` with a path and a few options.
    let body = vec![b'x'; 420];
    let props = || BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(2);
    let mut latencies = Vec::with_capacity(args.sequential);
    for _ in 0..args.sequential {
        let t = Instant::now();
        topology::publish_confirmed(&channel, "", &queue, &body, props()).await?;
        latencies.push(ms(t));
    }
    latencies.sort_by(f64::total_cmp);
    let started = Instant::now();
    let mut waiting = std::collections::VecDeque::with_capacity(args.window);
    for _ in 0..args.pipelined {
        if waiting.len() == args.window {
            let confirm: lapin::PublisherConfirm = waiting.pop_front().expect("a publish waits");
            anyhow::ensure!(confirm.await?.is_ack(), "the broker nacked a publish");
        }
        let publish = channel.basic_publish("".into(), queue.as_str().into(), BasicPublishOptions::default(), &body, props());
        waiting.push_back(publish.await?);
    }
    for confirm in waiting {
        anyhow::ensure!(confirm.await?.is_ack(), "the broker nacked a publish");
    }
    let rate = args.pipelined as f64 / started.elapsed().as_secs_f64();
    channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await?;
    let _ = connection.close(200, "done".into()).await;
    Ok((quantile(&latencies, 0.5), quantile(&latencies, 0.99), rate))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let settings = heimdex_shared::config::load(args.config.as_deref())?;
    let types = [QueueType::Classic, QueueType::Quorum];
    let mut rounds: Vec<(QueueType, f64, f64, f64)> = Vec::new();
    for r in 0..args.rounds {
        for &queue_type in &types {
            let (p50, p99, rate) = round(&settings, queue_type, &args).await?;
            eprintln!("round {} {queue_type}: p50 {p50:.2} ms, p99 {p99:.2} ms, {rate:.0} msg/s", r + 1);
            rounds.push((queue_type, p50, p99, rate));
        }
    }
    let brokers = settings.amqp.urls.len();
    println!("| queue type | brokers | confirm p50 (ms) | confirm p99 (ms) | throughput (msg/s, window {}) |", args.window);
    println!("|---|---|---|---|---|");
    let mut results = Vec::new();
    for &queue_type in &types {
        let of = |f: fn(&(QueueType, f64, f64, f64)) -> f64| median(rounds.iter().filter(|r| r.0 == queue_type).map(f).collect());
        let (p50, p99, rate) = (of(|r| r.1), of(|r| r.2), of(|r| r.3));
        println!("| {queue_type} | {brokers} | {p50:.2} | {p99:.2} | {rate:.0} |");
        results.push(json!({ "queue_type": queue_type.as_str(), "confirm_p50_ms": p50, "confirm_p99_ms": p99, "throughput_msg_s": rate }));
    }
    let report: Value = json!({
        "bench": "broker",
        "brokers": brokers,
        "rounds_each": args.rounds,
        "sequential": args.sequential,
        "pipelined": args.pipelined,
        "window": args.window,
        "message_bytes": 420,
        "results": results,
        "rounds": rounds.iter().map(|r| json!({ "queue_type": r.0.as_str(), "p50_ms": r.1, "p99_ms": r.2, "msg_s": r.3 })).collect::<Vec<_>>(),
    });
    write_report(&args.out, &report)?;
    Ok(())
}
