//! Which message runs a job: only the latest enqueue's. A copy from an earlier enqueue (a duplicate
//! of a queued job, the message a `--force` replaced) is acked as superseded whatever state the job is
//! in; the outbox forgets only what it published; a stored message that is not a task fails its job;
//! options are checked before anything is written.

use std::time::Duration;

use heimdex_producer::{EnqueueRequest, Producer, ProducerError};
use heimdex_shared::contract::{TaskKind, TaskMessage, TaskOptions};
use heimdex_shared::fleet::WorkerState;
use heimdex_shared::jobs::{self, JobStatus};
use heimdex_shared::outbox;
use heimdex_tests::{TestEnv, http_get, publish_raw};
use lapin::options::{BasicAckOptions, BasicGetOptions};

const WARM: Duration = Duration::from_secs(120);
const TASK: Duration = Duration::from_secs(200);

fn vision(name: &str, frame_rate: f32, force: bool) -> EnqueueRequest {
    let mut req = EnqueueRequest::all(name);
    req.kinds = vec![TaskKind::Vision];
    req.force = force;
    req.options = TaskOptions { frame_rate: Some(frame_rate), ..TaskOptions::default() };
    req
}

/// Takes the next message of the vision queue off it (acked): its body.
async fn take(env: &TestEnv) -> Vec<u8> {
    let queue = env.topology().queue(TaskKind::Vision);
    let got = env.channel.basic_get(queue.as_str().into(), BasicGetOptions::default()).await.unwrap().expect("a message");
    got.delivery.ack(BasicAckOptions::default()).await.unwrap();
    got.delivery.data
}

/// How many deliveries the worker counted with `outcome`.
async fn outcomes(addr: &str, outcome: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics").await;
    body.lines()
        .filter(|l| l.starts_with("heimdex_tasks_total") && l.contains(&format!(r#"outcome="{outcome}""#)))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_latest_enqueue_runs_and_with_its_options() {
    let env = TestEnv::new().await;
    env.add_media("video/silent.mp4", "twice.mp4");
    let producer = Producer::connect(&env.settings).await.unwrap();
    // Two enqueues while no worker runs: 1 fps, then forced at 2 fps. Both messages wait in the queue.
    let first = producer.enqueue(&vision("twice.mp4", 1.0, false)).await.unwrap();
    let forced = producer.enqueue(&vision("twice.mp4", 2.0, true)).await.unwrap();
    let job = first.jobs[0].job_id;
    assert_eq!(forced.jobs[0].job_id, job, "one job per (video, kind)");
    assert_eq!(env.queue(&env.topology().queue(TaskKind::Vision)).await.0, 2);

    let worker = env.spawn_worker("vision", "latest", &[]);
    let status = env.wait_state(&worker, WorkerState::Warm, WARM).await;
    let row = env.wait_job(job, "succeeded", TASK).await;
    env.wait_for("both messages handled", TASK, || async { (outcomes(&status.health_addr, "superseded").await == 1.0).then_some(()) })
        .await;
    // 4 s at the forced enqueue's 2 fps, once.
    let frames = env.count("SELECT count(*) FROM frames WHERE video_id = $1", first.video_id).await;
    assert_eq!(frames, 8, "the latest enqueue's options ran: {row:?}");
    assert_eq!((row.attempts, outcomes(&status.health_addr, "succeeded").await), (1, 1.0), "{row:?}");
    drop(worker);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_from_an_earlier_enqueue_never_runs_an_ended_job_again() {
    let env = TestEnv::new().await;
    env.add_media("video/silent.mp4", "ended.mp4");
    let producer = Producer::connect(&env.settings).await.unwrap();
    let job = producer.enqueue(&vision("ended.mp4", 1.0, false)).await.unwrap().jobs[0].job_id;
    let old = take(&env).await;
    producer.enqueue(&vision("ended.mp4", 1.0, true)).await.unwrap();
    take(&env).await;
    // The forced enqueue's run ended dead, and its letter is routed; then the old copy turns up (a
    // publisher's retry, a message held back in a network split).
    let reason = "gave up after 3 attempts: a test's reason";
    sqlx::query("UPDATE jobs SET status = 'dead', attempts = 3, last_error = $2, finished_at = now() WHERE id = $1")
        .bind(job)
        .bind(reason)
        .execute(&env.pool)
        .await
        .unwrap();
    let worker = env.spawn_worker("vision", "stale", &[]);
    let status = env.wait_state(&worker, WorkerState::Warm, WARM).await;
    publish_raw(&env, "vision", &old, Some(job)).await;
    env.wait_for("the old copy acked as superseded", TASK, || async {
        (outcomes(&status.health_addr, "superseded").await == 1.0).then_some(())
    })
    .await;
    let row = env.job(job).await.unwrap();
    assert_eq!((row.status, row.attempts, row.last_error.as_deref()), (JobStatus::Dead, 3, Some(reason)), "untouched: {row:?}");
    assert_eq!(env.count("SELECT count(*) FROM frames WHERE video_id = $1", row.video_id).await, 0);
    assert_eq!(env.queue(&env.topology().dlq(TaskKind::Vision)).await.0, 0, "no second letter");
    drop(worker);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_outbox_forgets_only_the_message_it_published() {
    let env = TestEnv::new().await;
    let msg =
        |queued: &jobs::Queued, video| TaskMessage::of_enqueue(queued, video, TaskKind::Vision, "o.mp4".into(), TaskOptions::default());
    let video = uuid::Uuid::new_v4();
    sqlx::query("INSERT INTO videos (id, uri) VALUES ($1, 'o.mp4')").bind(video).execute(&env.pool).await.unwrap();
    let mut tx = env.pool.begin().await.unwrap();
    let first = jobs::queue_job(&mut tx, video, TaskKind::Vision, false).await.unwrap().unwrap();
    outbox::store(&mut tx, first.job_id, &msg(&first, video)).await.unwrap();
    tx.commit().await.unwrap();
    // A forced enqueue replaces the stored message before the first publisher deletes its own.
    let mut tx = env.pool.begin().await.unwrap();
    let second = jobs::queue_job(&mut tx, video, TaskKind::Vision, true).await.unwrap().unwrap();
    outbox::store(&mut tx, second.job_id, &msg(&second, video)).await.unwrap();
    tx.commit().await.unwrap();
    assert!(second.queued_at > first.queued_at);

    outbox::publish(&env.pool, &env.channel, &env.topology(), &msg(&first, video)).await.unwrap();
    let left: Vec<Vec<u8>> = sqlx::query_scalar("SELECT body FROM outbox").fetch_all(&env.pool).await.unwrap();
    assert_eq!(left, vec![msg(&second, video).to_body()], "the newer message is still to be published");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stored_message_that_is_not_a_task_fails_its_job() {
    let env = TestEnv::new().await;
    env.add_media("video/silent.mp4", "broken.mp4");
    let job = env.enqueue("broken.mp4", TaskKind::Vision, false).await.unwrap().1;
    take(&env).await;
    // As a bad migration or a hand edit could leave it.
    sqlx::query("INSERT INTO outbox (job_id, body, created_at) VALUES ($1, $2, now() - interval '1 hour')")
        .bind(job)
        .bind(br#"{"v": 1, "job_id": "not a uuid"}"#.to_vec())
        .execute(&env.pool)
        .await
        .unwrap();
    let relayed = outbox::relay(&env.pool, &env.channel, &env.topology(), Duration::ZERO).await.unwrap();
    assert_eq!(relayed, 0);
    let row = env.job(job).await.unwrap();
    assert_eq!(row.status, JobStatus::Failed, "{row:?}");
    assert!(row.last_error.as_deref().unwrap_or("").contains("stored task message is not a task"), "{row:?}");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&env.pool).await.unwrap();
    assert_eq!(left, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_language_whisper_does_not_know_is_refused_at_enqueue() {
    let env = TestEnv::new().await;
    env.add_media("video/sample.mp4", "talk.mp4");
    let producer = Producer::connect(&env.settings).await.unwrap();
    let mut req = EnqueueRequest::all("talk.mp4");
    req.options.language = Some("klingon".into());
    let err = producer.enqueue(&req).await.unwrap_err();
    assert!(matches!(err, ProducerError::Options(_)), "{err}");
    assert!(err.to_string().contains(r#"options.language "klingon""#), "{err}");
    let (code, _, stderr) = env.cli(&["enqueue", "talk.mp4", "--language", "xx"]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains(r#"options.language "xx""#) && stderr.contains("nothing was enqueued"), "{stderr}");
    let (code, out, _) = env.cli(&["enqueue", "talk.mp4", "--language", "de", "--kind", "index"]).await;
    assert_eq!(code, 0, "{out}");
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&env.pool).await.unwrap();
    assert_eq!(jobs, 1, "only the valid enqueue wrote a job");
    env.cleanup().await;
}
