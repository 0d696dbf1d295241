//! Failure semantics against the real broker and database: crashes around the ack, poison messages,
//! a database outage, SIGTERM, panics.

use std::time::Duration;

use heimdex_producer::{EnqueueRequest, Producer};
use heimdex_shared::contract::{TaskKind, TaskMessage, TaskOptions};
use heimdex_shared::fleet::WorkerState;
use heimdex_tests::proxy::TcpProxy;
use heimdex_tests::{TestEnv, drain_dlq, publish_raw};
use uuid::Uuid;

const WARM: Duration = Duration::from_secs(120);
const TASK: Duration = Duration::from_secs(240);

async fn enqueue_vision(env: &TestEnv, name: &str) -> (Uuid, Uuid) {
    let producer = Producer::connect(&env.settings).await.unwrap();
    let mut req = EnqueueRequest::all(name);
    req.kinds = vec![TaskKind::Vision];
    let e = producer.enqueue(&req).await.unwrap();
    (e.video_id, e.jobs[0].job_id)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_after_commit_before_ack_redelivers_without_duplicates() {
    let env = TestEnv::new().await;
    env.add_media("video/sample.mp4", "sample.mp4");
    let mut first = env.spawn_worker("vision", "hang", &[("HEIMDEX__WORKER__FAILPOINT", "hang_before_ack")]);
    env.wait_state(&first, WorkerState::Warm, WARM).await;
    let (video, job) = enqueue_vision(&env, "sample.mp4").await;
    // Committed (job succeeded in the same transaction as the rows) but not acked.
    env.wait_job(job, "succeeded", TASK).await;
    let queue = env.topology().queue(TaskKind::Vision);
    assert_eq!(env.queue(&queue).await.0, 0, "the message is unacked, held by the worker");
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10)).await;
    env.wait_for("redelivery", TASK, || async { (env.queue(&queue).await.0 == 1).then_some(()) }).await;

    let second = env.spawn_worker("vision", "second", &[]);
    env.wait_state(&second, WorkerState::Warm, WARM).await;
    env.wait_for("the redelivered message to be acked", TASK, || async { (env.queue(&queue).await == (0, 1)).then_some(()) }).await;
    let row = env.job(job).await.unwrap();
    assert_eq!(row.status.as_str(), "succeeded");
    heimdex_tests::assert_results(&env, video).await;
    drop(second);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_task_redelivers_and_completes_once() {
    let env = TestEnv::new().await;
    env.add_media("video/sample.mp4", "sample.mp4");
    let mut first = env.spawn_worker("vision", "victim", &[]);
    env.wait_state(&first, WorkerState::Warm, WARM).await;
    let (video, job) = enqueue_vision(&env, "sample.mp4").await;
    env.wait_job(job, "running", TASK).await;
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10)).await;

    let second = env.spawn_worker("vision", "survivor", &[]);
    let row = env.wait_job(job, "succeeded", TASK).await;
    assert!(row.attempts >= 1);
    heimdex_tests::assert_results(&env, video).await;
    assert_eq!(env.queue(&env.topology().dlq(TaskKind::Vision)).await.0, 0);
    drop(second);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_are_dead_lettered_with_reasons_and_the_worker_keeps_serving() {
    let env = TestEnv::new().await;
    env.add_media("video/corrupt.mp4", "corrupt.mp4");
    std::fs::write(env.media.path().join("empty.mp4"), b"").unwrap();
    let outside = tempfile::NamedTempFile::new().unwrap();
    std::fs::copy(heimdex_tests::bundle_media("video/silent.mp4"), outside.path()).unwrap();
    env.add_media("video/silent.mp4", "good.mp4");
    let worker = env.spawn_worker("vision", "poisoned", &[]);
    env.wait_state(&worker, WorkerState::Warm, WARM).await;

    // A job row that a producer created for each message, so its outcome is visible.
    let producer_rows = |uri: &'static str| {
        let pool = env.pool.clone();
        async move {
            let (video, job) = (Uuid::new_v4(), Uuid::new_v4());
            sqlx::query("INSERT INTO videos (id, uri) VALUES ($1, $2)").bind(video).bind(uri).execute(&pool).await.unwrap();
            sqlx::query("INSERT INTO jobs (id, video_id, kind, status) VALUES ($1, $2, 'vision', 'queued')")
                .bind(job)
                .bind(video)
                .execute(&pool)
                .await
                .unwrap();
            (video, job)
        }
    };
    let task = |video: Uuid, job: Uuid, uri: &str| {
        TaskMessage::new(job, video, TaskKind::Vision, uri.to_string(), TaskOptions::default()).to_body()
    };
    let mut expected = Vec::new();
    let (_, j) = producer_rows("malformed").await;
    publish_raw(&env, "vision", b"{\"v\":1, this is not json", Some(j)).await;
    expected.push((j, "not JSON"));
    let (v, j) = producer_rows("future").await;
    let mut future: serde_json::Value = serde_json::from_slice(&task(v, j, "good.mp4")).unwrap();
    future["v"] = 7.into();
    publish_raw(&env, "vision", &serde_json::to_vec(&future).unwrap(), Some(j)).await;
    expected.push((j, "unsupported contract version 7"));
    for (uri, reason) in [
        ("missing.mp4", "not found"),
        ("corrupt.mp4", "ffprobe cannot read"),
        (outside.path().to_str().unwrap(), "outside the media root"),
        ("empty.mp4", "is empty"),
    ] {
        let (v, j) = (Uuid::new_v4(), Uuid::new_v4());
        publish_raw(&env, "vision", &task(v, j, uri), Some(j)).await;
        expected.push((j, reason));
    }
    let (v, good) = (Uuid::new_v4(), Uuid::new_v4());
    publish_raw(&env, "vision", &task(v, good, "good.mp4"), Some(good)).await;

    env.wait_job(good, "succeeded", TASK).await;
    for (job, reason) in &expected {
        let row = env.wait_job(*job, "failed", TASK).await;
        let error = row.last_error.unwrap_or_default();
        assert!(error.contains(reason), "job {job}: {error:?} should say {reason:?}");
    }
    let dlq = env.topology().dlq(TaskKind::Vision);
    env.wait_for("dead letters", TASK, || async { (env.queue(&dlq).await.0 as usize == expected.len()).then_some(()) }).await;
    let letters = drain_dlq(&env, &dlq).await;
    for (job, reason) in &expected {
        let letter = letters.iter().find(|(id, _)| id.as_deref() == Some(&job.to_string())).expect("dead letter");
        assert!(letter.1.contains(reason), "{letter:?}");
    }
    assert_eq!(env.worker_status("poisoned").await.unwrap().state, WorkerState::Warm, "the worker stays up");
    drop(worker);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn database_outage_pauses_consuming_and_everything_completes_after_recovery() {
    let env = TestEnv::new().await;
    let proxy = TcpProxy::start("127.0.0.1:5432").await;
    let via_proxy = proxy.route(env.settings.database.url.expose());
    let names: Vec<String> = (0..3).map(|i| format!("v{i}.mp4")).collect();
    for n in &names {
        env.add_media("video/silent.mp4", n);
    }
    let worker =
        env.spawn_worker("vision", "cutoff", &[("HEIMDEX__DATABASE__URL", &via_proxy), ("HEIMDEX__DATABASE__ACQUIRE_TIMEOUT_MS", "500")]);
    env.wait_state(&worker, WorkerState::Warm, WARM).await;
    proxy.cut();
    let mut jobs = Vec::new();
    for n in &names {
        jobs.push(enqueue_vision(&env, n).await.1);
    }
    env.wait_state(&worker, WorkerState::Paused, TASK).await;
    let queue = env.topology().queue(TaskKind::Vision);
    env.wait_for("the messages back in the queue, nobody consuming", TASK, || async { (env.queue(&queue).await == (3, 0)).then_some(()) })
        .await;
    assert_eq!(env.queue(&env.topology().dlq(TaskKind::Vision)).await.0, 0, "nothing dead-lettered");

    proxy.restore();
    for job in jobs {
        env.wait_job(job, "succeeded", TASK).await;
    }
    assert_eq!(env.worker_status("cutoff").await.unwrap().state, WorkerState::Warm);
    assert_eq!(env.queue(&env.topology().dlq(TaskKind::Vision)).await.0, 0, "nothing dead-lettered");
    drop(worker);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_the_task_in_flight() {
    let env = TestEnv::new().await;
    env.add_media("video/sample.mp4", "sample.mp4");
    let mut worker = env.spawn_worker("vision", "graceful", &[]);
    env.wait_state(&worker, WorkerState::Warm, WARM).await;
    let (video, job) = enqueue_vision(&env, "sample.mp4").await;
    env.wait_job(job, "running", TASK).await;
    worker.signal("TERM");
    assert_eq!(worker.wait_exit(TASK).await, Some(0), "{}", worker.log());
    assert_eq!(env.job(job).await.unwrap().status.as_str(), "succeeded", "{}", worker.log());
    heimdex_tests::assert_results(&env, video).await;
    assert_eq!(env.queue(&env.topology().queue(TaskKind::Vision)).await.0, 0);
    assert!(env.worker_status("graceful").await.is_none(), "a stopped worker leaves the fleet");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_past_the_drain_timeout_requeues_the_task() {
    let env = TestEnv::new().await;
    env.add_media("video/sample.mp4", "sample.mp4");
    let mut worker = env.spawn_worker("vision", "impatient", &[("HEIMDEX__WORKER__SHUTDOWN_TIMEOUT_MS", "1")]);
    env.wait_state(&worker, WorkerState::Warm, WARM).await;
    let (video, job) = enqueue_vision(&env, "sample.mp4").await;
    env.wait_job(job, "running", TASK).await;
    worker.signal("TERM");
    assert_eq!(worker.wait_exit(TASK).await, Some(0), "{}", worker.log());
    let next = env.spawn_worker("vision", "next", &[]);
    env.wait_job(job, "succeeded", TASK).await;
    heimdex_tests::assert_results(&env, video).await;
    drop(next);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_task_is_retried_with_backoff_then_dead_lettered() {
    let env = TestEnv::new().await;
    env.add_media("video/silent.mp4", "boom.mp4");
    let worker = env.spawn_worker("vision", "buggy", &[("HEIMDEX__WORKER__FAILPOINT", "panic")]);
    env.wait_state(&worker, WorkerState::Warm, WARM).await;
    let (_, job) = enqueue_vision(&env, "boom.mp4").await;
    let row = env.wait_job(job, "dead", TASK).await;
    assert_eq!(row.attempts, 3, "max_attempts deliveries");
    assert!(row.last_error.as_deref().unwrap_or("").contains("panicked"), "{row:?}");
    let dlq = env.topology().dlq(TaskKind::Vision);
    env.wait_for("the dead letter", TASK, || async { (env.queue(&dlq).await.0 == 1).then_some(()) }).await;
    let letters = drain_dlq(&env, &dlq).await;
    assert_eq!(letters.len(), 1);
    assert!(letters[0].1.contains("gave up after 3 attempts"), "{letters:?}");
    assert_eq!(env.worker_status("buggy").await.unwrap().state, WorkerState::Warm, "the worker survives the panic");
    drop(worker);
    env.cleanup().await;
}

/// The harness itself: waiting for a state that a worker which has exited can never reach fails as
/// soon as it has exited, with the end of its log, not at the timeout (a test run without
/// `ORT_DYLIB_PATH` waited 120 s for a worker that had died in 30 ms).
#[tokio::test(flavor = "multi_thread")]
async fn waiting_on_a_worker_that_exited_fails_at_once_with_its_log() {
    let env = TestEnv::new().await;
    let worker = env.spawn_worker("index", "refused", &[("HEIMDEX__WORKER__CONCURRENCY", "0")]);
    let started = std::time::Instant::now();
    let waiting = env.wait_state(&worker, WorkerState::Warm, Duration::from_secs(120));
    let failed = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(waiting)).await;
    let message = failed.err().and_then(|p| p.downcast::<String>().ok()).map(|m| *m).expect("the wait fails");
    assert!(started.elapsed() < Duration::from_secs(30), "it took {:?}: {message}", started.elapsed());
    assert!(message.contains("refused exited while waiting for it to be warm"), "{message}");
    assert!(message.contains("worker.concurrency must be at least 1"), "the worker's own reason: {message}");
    env.cleanup().await;
}
