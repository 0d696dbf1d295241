//! `heimdex status`: the fleet's [`status::Snapshot`] as a table (live workers with their models and
//! warm-up, queue depths, job counts) or JSON; one job's stage timings; or the jobs of an external id.

use std::process::ExitCode;

use heimdex_producer::status;
use heimdex_shared::Settings;
use heimdex_shared::contract::TaskKind;
use heimdex_shared::fleet::WorkerState;
use heimdex_shared::jobs;
use heimdex_shared::topology;
use uuid::Uuid;

#[derive(clap::Args)]
pub struct Args {
    /// Show one job: status, attempts, error and stage timings.
    #[arg(long)]
    job: Option<Uuid>,
    /// Show the jobs that carry this external id (given at enqueue), most recent first.
    #[arg(long, conflicts_with = "job")]
    external_id: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Most jobs `--external-id` lists.
const BY_EXTERNAL_ID: i64 = 100;

pub async fn run(settings: &Settings, args: Args) -> anyhow::Result<ExitCode> {
    let pool = heimdex_shared::db::pool(&settings.database)?;
    if let Some(external_id) = &args.external_id {
        let filter = jobs::JobFilter { external_id: Some(external_id.clone()), ..jobs::JobFilter::default() };
        let rows = jobs::list_jobs(&pool, &filter, None, BY_EXTERNAL_ID).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else if rows.is_empty() {
            println!("no job has external id {external_id:?}");
        } else {
            for row in &rows {
                let uri = heimdex_shared::remote::redact(&row.uri);
                println!("job {} {:<6} {:<9} {uri}", row.id, row.kind, row.status);
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
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
            if let Some(id) = &row.external_id {
                println!("  external id {id}");
            }
            if let Some(metadata) = &row.metadata {
                println!("  metadata {metadata}");
            }
            println!("  stage timings (ms):");
            for (stage, ms) in row.stage_timings.as_object().into_iter().flatten() {
                println!("    {stage:<12} {ms}");
            }
        }
        return Ok(ExitCode::SUCCESS);
    }

    let (_conn, channel) = topology::connect(&settings.amqp, "heimdex-status").await?;
    let snapshot = status::snapshot(settings, &pool, &channel).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&snapshot)?);
        return Ok(ExitCode::SUCCESS);
    }

    println!("WORKERS");
    match &snapshot.workers_error {
        Some(e) => println!("  {e}"),
        None => {
            for kind in TaskKind::ALL {
                let of_kind: Vec<_> = snapshot.workers.iter().filter(|w| w.kind == kind.as_str()).collect();
                let warm = of_kind.iter().filter(|w| w.state == WorkerState::Warm).count();
                println!("  {kind}: warm {warm}/{}", of_kind.len());
            }
        }
    }
    for w in &snapshot.workers {
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
    for q in &snapshot.queues {
        match (q.messages, q.consumers) {
            (Some(messages), Some(consumers)) => println!("  {:<28} {messages:>6} ready  {consumers:>3} consumers", q.name),
            _ => println!("  {:<28} (not declared)", q.name),
        }
    }
    println!("JOBS");
    for c in &snapshot.jobs {
        println!("  {:<7} {:<10} {}", c.kind, c.status, c.count);
    }
    Ok(ExitCode::SUCCESS)
}
