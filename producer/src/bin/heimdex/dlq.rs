//! `heimdex dlq list|replay|purge`: what is dead-lettered and why, putting it back to work, and
//! dropping it.
//!
//! Messages are read with `basic.get` and left unacknowledged while we look; closing the channel hands
//! every one we did not replay or purge back to its queue, so listing never loses a message. Only the
//! letters present when the command starts are read.
//!
//! A letter's age, for `purge --older-than`, runs from when its job ended (`jobs.finished_at`, the
//! moment it was dead-lettered); a letter whose job Heimdex does not hold (deleted, or a foreign id)
//! counts from its enqueue (the message's timestamp), and one with neither is kept. Purging leaves the
//! jobs as they are (`dead` or `failed`, with their reasons).

use std::process::ExitCode;

use chrono::{DateTime, TimeDelta, Utc};
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
    /// Drop dead letters for good (their jobs keep their status and reason).
    Purge {
        #[arg(long, value_parser = parse_kind)]
        kind: Option<TaskKind>,
        /// Only letters dead-lettered longer ago than this: `30d`, `12h`, `45m`, `90s`, or a sum (`1d12h`).
        #[arg(long, value_parser = parse_age)]
        older_than: Option<TimeDelta>,
    },
}

fn parse_kind(s: &str) -> Result<TaskKind, String> {
    s.parse()
}

/// `30d`, `12h`, `45m`, `90s`, or a sum of them (`1d12h`).
fn parse_age(text: &str) -> Result<TimeDelta, String> {
    let bad = || format!("{text:?} is not an age like 30d, 12h, 45m, 90s or 1d12h");
    let mut total = TimeDelta::zero();
    let mut number = String::new();
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: i64 = number.parse().map_err(|_| bad())?;
        number.clear();
        let part = match c {
            'd' => TimeDelta::try_days(n),
            'h' => TimeDelta::try_hours(n),
            'm' => TimeDelta::try_minutes(n),
            's' => TimeDelta::try_seconds(n),
            _ => None,
        };
        total = total.checked_add(&part.ok_or_else(bad)?).ok_or_else(bad)?;
    }
    if !number.is_empty() || total <= TimeDelta::zero() {
        return Err(bad());
    }
    Ok(total)
}

/// What the command does with each letter.
enum Action {
    List,
    Replay(Vec<Uuid>),
    Purge(Option<TimeDelta>),
}

/// When a letter was dead-lettered: its job's end, or else its enqueue (see the module's docs).
async fn dead_since(pool: &sqlx::PgPool, job: Option<Uuid>, props: &lapin::BasicProperties) -> anyhow::Result<Option<DateTime<Utc>>> {
    if let Some(job) = job {
        let ended: Option<Option<DateTime<Utc>>> =
            sqlx::query_scalar("SELECT finished_at FROM jobs WHERE id = $1").bind(job).fetch_optional(pool).await?;
        if let Some(Some(ended)) = ended {
            return Ok(Some(ended));
        }
    }
    Ok((*props.timestamp()).and_then(|t| DateTime::from_timestamp(i64::try_from(t).ok()?, 0)))
}

pub async fn run(settings: &Settings, command: Command) -> anyhow::Result<ExitCode> {
    let (connection, channel) = topology::connect(&settings.amqp, "heimdex-dlq").await?;
    let topo = Topology::new(&settings.amqp);
    let (kind_filter, action) = match command {
        Command::List { kind } => (kind, Action::List),
        Command::Replay { jobs, kind } => (kind, Action::Replay(jobs)),
        Command::Purge { kind, older_than } => (kind, Action::Purge(older_than)),
    };
    let pool = heimdex_shared::db::pool(&settings.database)?;
    let mut total = 0usize;
    let mut done = 0usize;
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
            match &action {
                Action::List => println!("{kind:<6} job {job}  attempts {attempts}  {reason}"),
                Action::Purge(older_than) => {
                    if let Some(age) = older_than {
                        let since = dead_since(&pool, Uuid::parse_str(&job).ok(), props).await?;
                        if since.is_none_or(|t| Utc::now() - t <= *age) {
                            continue;
                        }
                    }
                    message.delivery.ack(BasicAckOptions::default()).await?;
                    done += 1;
                    println!("{kind:<6} job {job}  purged  ({reason})");
                }
                Action::Replay(only) => {
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
                    done += 1;
                    println!("{kind:<6} job {job}  replayed");
                }
            }
        }
    }
    // Unacked messages go back to their dead-letter queue.
    connection.close(200, "done".into()).await?;
    match action {
        Action::List => println!("{total} dead letter(s)"),
        Action::Replay(_) => println!("{done} replayed, {} left", total - done),
        Action::Purge(_) => println!("{done} purged, {} left", total - done),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_sums_of_days_hours_minutes_and_seconds() {
        assert_eq!(parse_age("30d"), Ok(TimeDelta::days(30)));
        assert_eq!(parse_age("1d12h"), Ok(TimeDelta::hours(36)));
        assert_eq!(parse_age("90s"), Ok(TimeDelta::seconds(90)));
        assert_eq!(parse_age("45m"), Ok(TimeDelta::minutes(45)));
        for bad in ["", "0s", "12", "d", "3w", "-1d", "1.5h", "99999999999999d"] {
            assert!(parse_age(bad).is_err(), "{bad:?} accepted");
        }
    }
}
