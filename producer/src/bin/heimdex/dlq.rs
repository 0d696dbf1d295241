//! `heimdex dlq list|replay`: what is dead-lettered and why, and putting it back to work.
//!
//! Messages are read with `basic.get` and left unacknowledged while we look; closing the channel hands
//! every one we did not replay back to its queue, so listing never loses a message. Only the letters
//! present when the command starts are read.

use std::process::ExitCode;

use heimdex_shared::Settings;
use heimdex_shared::contract::{TaskKind, TaskMessage};
use heimdex_shared::jobs;
use heimdex_shared::topology::{self, ATTEMPT_HEADER, ERROR_HEADER, Topology};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use uuid::Uuid;

#[derive(clap::Subcommand)]
pub enum Command {
    /// List dead letters with their job, attempts and reason.
    List {
        #[arg(long, value_parser = parse_kind)]
        kind: Option<TaskKind>,
    },
    /// Publish dead letters back to their work queue and mark their jobs queued.
    Replay {
        /// Only these jobs (default: every dead letter).
        jobs: Vec<Uuid>,
        #[arg(long, value_parser = parse_kind)]
        kind: Option<TaskKind>,
    },
}

fn parse_kind(s: &str) -> Result<TaskKind, String> {
    s.parse()
}

pub async fn run(settings: &Settings, command: Command) -> anyhow::Result<ExitCode> {
    let (connection, channel) = topology::connect(&settings.amqp, "heimdex-dlq").await?;
    let topo = Topology::new(&settings.amqp);
    let (kind_filter, replay) = match &command {
        Command::List { kind } => (*kind, None),
        Command::Replay { jobs, kind } => (*kind, Some(jobs.clone())),
    };
    let pool = heimdex_shared::db::pool(&settings.database)?;
    let mut total = 0usize;
    let mut replayed = 0usize;
    for kind in TaskKind::ALL.into_iter().filter(|k| kind_filter.is_none_or(|f| f == *k)) {
        let dlq = topo.dlq(kind);
        // Only the letters there now: a replayed task that fails again within milliseconds lands
        // back in this queue while we read it, and must not be read (and replayed) a second time.
        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let present = channel.queue_declare(dlq.as_str().into(), passive, FieldTable::default()).await?.message_count();
        for _ in 0..present {
            let Some(message) = channel.basic_get(dlq.as_str().into(), BasicGetOptions::default()).await? else { break };
            total += 1;
            let props = &message.delivery.properties;
            let job = props.message_id().as_ref().map(|m| m.to_string()).unwrap_or_else(|| "-".into());
            let reason = topology::header_str(props, ERROR_HEADER).unwrap_or_else(|| "(no reason recorded)".into());
            let attempts = topology::header_u32(props, ATTEMPT_HEADER).unwrap_or(1);
            match &replay {
                None => println!("{kind:<6} job {job}  attempts {attempts}  {reason}"),
                Some(only) => {
                    let job_id = Uuid::parse_str(&job).ok();
                    if !only.is_empty() && !job_id.is_some_and(|j| only.contains(&j)) {
                        continue;
                    }
                    let Ok(mut task) = TaskMessage::parse(&message.delivery.data) else {
                        println!("{kind:<6} job {job}  not replayable (not a valid task): {reason}");
                        continue;
                    };
                    // Reset first: a run of the replayed message may end before this command goes on,
                    // and its outcome must not be overwritten back to `queued`. The replay is a new
                    // enqueue: the letter's copy of an earlier one would be superseded. (A foreign
                    // message naming a job id Heimdex does not hold is simply a newer enqueue.)
                    let requeued = jobs::requeue(&pool, task.job_id).await?;
                    task.enqueued_at = requeued.map_or_else(chrono::Utc::now, |q| q.queued_at);
                    let properties = topology::task_properties(&task, 1);
                    topology::publish_confirmed(&channel, topo.exchange(), kind.as_str(), &task.to_body(), properties).await?;
                    message.delivery.ack(BasicAckOptions::default()).await?;
                    replayed += 1;
                    println!("{kind:<6} job {job}  replayed");
                }
            }
        }
    }
    // Unacked messages go back to their dead-letter queue.
    connection.close(200, "done".into()).await?;
    match replay {
        None => println!("{total} dead letter(s)"),
        Some(_) => println!("{replayed} replayed, {} left", total - replayed),
    }
    Ok(ExitCode::SUCCESS)
}
