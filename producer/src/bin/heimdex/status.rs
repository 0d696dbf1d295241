//! `heimdex status`: every live worker from Redis (kind, state, models, warm-up, in-flight jobs), the
//! fleet's warm-up progress, queue depths, job counts by status; or one job's stage timings.

use std::process::ExitCode;

use heimdex_shared::contract::TaskKind;
use heimdex_shared::fleet::{Fleet, WorkerState};
use heimdex_shared::jobs;
use heimdex_shared::topology::{self, Topology};
use heimdex_shared::Settings;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use uuid::Uuid;

#[derive(clap::Args)]
pub struct Args {
    /// Show one job: status, attempts, error and stage timings.
    #[arg(long)]
    job: Option<Uuid>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn run(settings: &Settings, args: Args) -> anyhow::Result<ExitCode> {
    let pool = heimdex_shared::db::pool(&settings.database)?;
    if let Some(job) = args.job {
        let Some(row) = jobs::jobs_by_id(&pool, &[job]).await?.into_iter().next() else {
            eprintln!("no job {job}");
            return Ok(ExitCode::from(1));
        };
        if args.json {
            println!("{}", serde_json::to_string_pretty(&row)?);
        } else {
            println!("job {} ({} of {})", row.id, row.kind, heimdex_shared::remote::redact(&row.uri));
            println!(
                "  status {}  attempts {}  worker deaths {}  worker {}",
                row.status,
                row.attempts,
                row.deaths,
                row.worker_id.as_deref().unwrap_or("-")
            );
            if let Some(e) = &row.last_error {
                println!("  error  {e}");
            }
            println!("  stage timings (ms):");
            for (stage, ms) in row.stage_timings.as_object().into_iter().flatten() {
                println!("    {stage:<12} {ms}");
            }
        }
        return Ok(ExitCode::SUCCESS);
    }

    // Live worker state is in Redis, which is optional: without it, queues and jobs still show.
    let workers = match Fleet::connect(&settings.redis, &settings.amqp.prefix).await {
        Ok(fleet) => fleet.workers().await,
        Err(e) => Err(e),
    }
    .map_err(|e| format!("live worker state is unavailable (redis at {}: {e})", settings.redis.url));
    let (_conn, channel) = topology::connect(&settings.amqp, "heimdex-status").await?;
    let topo = Topology::new(&settings.amqp);
    // Declaring is idempotent and makes a fresh broker show empty queues, not errors.
    topo.declare(&channel, &settings.worker).await?;
    let mut queues = Vec::new();
    for kind in TaskKind::ALL {
        for name in [topo.queue(kind), topo.dlq(kind)] {
            let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
            match channel.queue_declare(name.as_str().into(), passive, FieldTable::default()).await {
                Ok(q) => queues.push((name, Some((q.message_count(), q.consumer_count())))),
                Err(_) => queues.push((name, None)),
            }
        }
    }
    let counts = jobs::counts(&pool).await?;
    if args.json {
        let json = serde_json::json!({
            "workers": workers.as_ref().ok(),
            "workers_error": workers.as_ref().err(),
            "queues": queues.iter().map(|(n, q)| serde_json::json!({"name": n, "messages": q.map(|q| q.0), "consumers": q.map(|q| q.1)})).collect::<Vec<_>>(),
            "jobs": counts.iter().map(|(k, s, n)| serde_json::json!({"kind": k, "status": s, "count": n})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(ExitCode::SUCCESS);
    }

    println!("WORKERS");
    let workers = match workers {
        Ok(workers) => {
            for kind in TaskKind::ALL {
                let of_kind: Vec<_> = workers.iter().filter(|w| w.kind == kind.as_str()).collect();
                let warm = of_kind.iter().filter(|w| w.state == WorkerState::Warm).count();
                println!("  {kind}: warm {warm}/{}", of_kind.len());
            }
            workers
        }
        Err(e) => {
            println!("  {e}");
            Vec::new()
        }
    };
    for w in &workers {
        let models: Vec<String> = w
            .models
            .iter()
            .map(|m| match m.warmup_ms {
                Some(ms) => format!("{} ({ms:.0} ms)", m.name),
                None => m.name.clone(),
            })
            .collect();
        println!(
            "  {:<40} {:<7} {:<8} warm-up {:>8}  in flight {}/{} {:?}  done {}  health http://{}",
            w.id,
            w.kind,
            w.state.as_str(),
            w.warmup_ms.map_or("-".into(), |ms| format!("{ms:.0} ms")),
            w.in_flight.len(),
            w.concurrency,
            w.in_flight,
            w.tasks_done,
            w.health_addr
        );
        if !models.is_empty() {
            println!("      models: {}", models.join(", "));
        }
    }
    println!("QUEUES");
    for (name, q) in &queues {
        match q {
            Some((messages, consumers)) => println!("  {name:<28} {messages:>6} ready  {consumers:>3} consumers"),
            None => println!("  {name:<28} (not declared)"),
        }
    }
    println!("JOBS");
    for (kind, status, n) in &counts {
        println!("  {kind:<7} {status:<10} {n}");
    }
    Ok(ExitCode::SUCCESS)
}
