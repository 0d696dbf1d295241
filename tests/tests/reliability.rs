//! No message and no crash takes a worker kind down or loops forever: bounded error texts and bodies,
//! attempts counted where a crash cannot skip them, fenced runs, the outbox, a contained model panic,
//! retry copies that cannot be published. Each test reproduces one failure seen on the old runtime.

use std::time::Duration;

use heimdex_producer::{EnqueueRequest, Producer, ProducerError};
use heimdex_shared::contract::{TaskKind, TaskMessage, TaskOptions};
use heimdex_shared::fleet::WorkerState;
use heimdex_shared::jobs::{self, FencedRun, JobStatus, Start};
use heimdex_tests::{TestEnv, drain_dlq, http_get, publish_raw};
use lapin::options::{QueueBindOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use uuid::Uuid;

const WARM: Duration = Duration::from_secs(120);
const TASK: Duration = Duration::from_secs(240);

fn peak_rss_mb(pid: i32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("worker is alive");
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kb / 1024.0
}

async fn frames(env: &TestEnv, video: Uuid) -> i64 {
    env.count("SELECT count(*) FROM frames WHERE video_id = $1", video).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_huge_field_name_is_dead_lettered_with_a_short_reason_and_the_worker_stays_up() {
    let env = TestEnv::new().await;
    env.add_media("video/silent.mp4", "good.mp4");
    let worker = env.spawn_worker("vision", "sturdy", &[]);
    env.wait_state(&worker, WorkerState::Warm, WARM).await;

    // A v1 task with one unknown field whose name is 200 KB long (serde repeats it in its error);
    // the old worker put that into a header, RabbitMQ closed the connection (frame_too_large), the
    // worker exited and the next one died on the same message.
    let job = Uuid::new_v4();
    let mut body =
        serde_json::to_value(TaskMessage::new(job, Uuid::new_v4(), TaskKind::Vision, "good.mp4".into(), TaskOptions::default())).unwrap();
    body["f".repeat(200_000)] = 1.into();
    publish_raw(&env, "vision", &serde_json::to_vec(&body).unwrap(), Some(job)).await;
    let (video, good) = (Uuid::new_v4(), Uuid::new_v4());
    let task = TaskMessage::new(good, video, TaskKind::Vision, "good.mp4".into(), TaskOptions::default());
    publish_raw(&env, "vision", &task.to_body(), Some(good)).await;

    env.wait_job(good, "succeeded", TASK).await;
    assert!(frames(&env, video).await >= 4, "the good message behind the poison one ran");
    let dlq = env.topology().dlq(TaskKind::Vision);
    env.wait_for("the dead letter", TASK, || async { (env.queue(&dlq).await.0 == 1).then_some(()) }).await;
    let letters = drain_dlq(&env, &dlq).await;
    assert_eq!(letters[0].0.as_deref(), Some(job.to_string().as_str()));
    assert!(
        letters[0].1.contains("over the contract's limit") && letters[0].1.len() <= 1024,
        "{} bytes: {:.200}",
        letters[0].1.len(),
        letters[0].1
    );
    assert_eq!(env.worker_status("sturdy").await.expect("still in the fleet").state, WorkerState::Warm, "{}", worker.log());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_80_mb_body_is_dead_lettered_without_swelling_the_worker() {
    let env = TestEnv::new().await;
    let worker = env.spawn_worker("vision", "lean", &[]);
    env.wait_state(&worker, WorkerState::Warm, WARM).await;
    let before = peak_rss_mb(worker.pid());
    let job = Uuid::new_v4();
    let mut body = br#"{"v":1,"padding":""#.to_vec();
    body.resize(80 * 1024 * 1024, b'x');
    body.extend_from_slice(br#""}"#);
    publish_raw(&env, "vision", &body, Some(job)).await;
    drop(body);
    let dlq = env.topology().dlq(TaskKind::Vision);
    env.wait_for("the dead letter", TASK, || async { (env.queue(&dlq).await.0 == 1).then_some(()) }).await;
    let letters = drain_dlq(&env, &dlq).await;
    assert!(letters[0].1.contains("over the contract's limit"), "{letters:?}");
    let growth = peak_rss_mb(worker.pid()) - before;
    // The body itself arrives (80 MB) and is published once more to the DLQ; parsing it is refused
    // (the old worker built a serde tree of it and grew by 1.4 GB).
    assert!(growth < 400.0, "peak RSS grew by {growth:.0} MB");
    assert_eq!(env.worker_status("lean").await.unwrap().state, WorkerState::Warm);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_video_that_kills_its_worker_is_dead_after_max_attempts() {
    let env = TestEnv::new().await;
    env.add_long_video("killer.mp4");
    let (_, job) = env.enqueue("killer.mp4", TaskKind::Vision, false).await.unwrap();
    // As an OOM kill would: SIGKILL in the middle of the task, every time, with a fresh worker.
    for attempt in 1..=3 {
        let mut worker = env.spawn_worker("vision", &format!("victim{attempt}"), &[]);
        env.wait_for(&format!("attempt {attempt} running"), TASK, || async {
            env.job(job).await.filter(|j| j.status == JobStatus::Running && j.attempts == attempt)
        })
        .await;
        worker.signal("KILL");
        worker.wait_exit(Duration::from_secs(10)).await;
    }
    let last = env.spawn_worker("vision", "last", &[]);
    let row = env.wait_job(job, "dead", TASK).await;
    assert_eq!((row.attempts, row.deaths), (3, 3), "{row:?}");
    let reason = row.last_error.unwrap_or_default();
    assert!(reason.contains("the worker died 3 times while processing this task"), "{reason}");
    let dlq = env.topology().dlq(TaskKind::Vision);
    env.wait_for("the dead letter", TASK, || async { (env.queue(&dlq).await.0 == 1).then_some(()) }).await;
    let letters = drain_dlq(&env, &dlq).await;
    assert!(letters[0].1.contains("the worker died 3 times"), "{letters:?}");
    assert_eq!(env.queue(&env.topology().queue(TaskKind::Vision)).await.0, 0, "nothing left to loop on");
    drop(last);
    env.cleanup().await;
}

/// The worker that marks a job `dead` writes the row first and dead-letters the message second; a
/// worker killed between the two leaves the message to be redelivered. That copy must finish the
/// dead-lettering, not start a new series of attempts (the random-kill crash test caught a killer
/// video run again this way, after it had been declared dead).
#[tokio::test(flavor = "multi_thread")]
async fn a_redelivered_message_of_a_job_already_dead_is_dead_lettered_not_run_again() {
    use lapin::options::{BasicGetOptions, BasicNackOptions};
    let env = TestEnv::new().await;
    env.add_media("video/silent.mp4", "ended.mp4");
    let (video, job) = env.enqueue("ended.mp4", TaskKind::Vision, false).await.unwrap();
    // As the worker that ran out of attempts leaves it: the row is dead, the message not yet routed.
    let reason = "the worker died 3 times while processing this task (gave up after 3 attempts)";
    sqlx::query("UPDATE jobs SET status = 'dead', attempts = 3, deaths = 3, last_error = $2, finished_at = now() WHERE id = $1")
        .bind(job)
        .bind(reason)
        .execute(&env.pool)
        .await
        .unwrap();
    // Its worker dies: the broker puts the message back, marked redelivered.
    let queue = env.topology().queue(TaskKind::Vision);
    let taken = env.channel.basic_get(queue.as_str().into(), BasicGetOptions::default()).await.unwrap().expect("the task's message");
    taken.delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await.unwrap();

    let worker = env.spawn_worker("vision", "finisher", &[]);
    let dlq = env.topology().dlq(TaskKind::Vision);
    env.wait_for("the dead letter", TASK, || async { (env.queue(&dlq).await.0 == 1).then_some(()) }).await;
    let letters = drain_dlq(&env, &dlq).await;
    assert_eq!(letters[0].0.as_deref(), Some(job.to_string().as_str()), "{letters:?}");
    assert_eq!(letters[0].1, reason, "the letter carries the stored reason");
    let row = env.job(job).await.unwrap();
    assert_eq!((row.status, row.attempts, row.deaths), (JobStatus::Dead, 3, 3), "not run again: {row:?}");
    assert_eq!(frames(&env, video).await, 0);

    // A copy enqueued after the end (a publisher re-running the job without our producer) still runs.
    let uri: String = sqlx::query_scalar("SELECT uri FROM videos WHERE id = $1").bind(video).fetch_one(&env.pool).await.unwrap();
    let rerun = TaskMessage::new(job, video, TaskKind::Vision, uri, TaskOptions::default());
    publish_raw(&env, "vision", &rerun.to_body(), Some(job)).await;
    env.wait_job(job, "succeeded", TASK).await;
    assert!(frames(&env, video).await > 0);
    drop(worker);
    env.cleanup().await;
}

/// A work queue deleted under a live connection (an operator, a policy) cancels the consumer; the
/// worker declares its queues again and consumes on, instead of failing to consume in a tight loop.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_work_queue_is_declared_again_and_consumed() {
    let env = TestEnv::new().await;
    env.add_media("video/silent.mp4", "after.mp4");
    let worker = env.spawn_worker("vision", "redeclare", &[]);
    env.wait_state(&worker, WorkerState::Warm, WARM).await;
    let queue = env.topology().queue(TaskKind::Vision);
    // A passive declare of a missing queue closes its channel: each look uses a connection of its own.
    let consumers = || async {
        let (connection, channel) = heimdex_shared::topology::connect(&env.settings.amqp, "probe").await.ok()?;
        let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        let found = channel.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await.ok().map(|q| q.consumer_count());
        let _ = connection.close(200, "probed".into()).await;
        found.filter(|&n| n == 1)
    };
    // The consumer as the queue itself counts it, before the queue is deleted under it. The worker is
    // warm once basic.consume-ok arrives, but a quorum queue registers the consumer in its own log a
    // moment later: deleted inside that moment (28 ms after warm, in a CI run), RabbitMQ 3.10 sent the
    // worker no cancel, kept the consumer on its channel, and the queue declared again later delivered
    // to it a message the client never received (broker: 1 unacked; worker: nothing in flight).
    env.wait_for("the worker's consumer registered by the queue", TASK, consumers).await;
    env.channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    env.wait_for("the queue declared again with its consumer", TASK, consumers).await;
    let (_, job) = env.enqueue("after.mp4", TaskKind::Vision, false).await.unwrap();
    env.wait_job(job, "succeeded", TASK).await;
    let log = worker.log();
    let retries = log.matches("lost the broker").count();
    assert!(retries <= 3, "{retries} reconnections for one deleted queue:\n{}", &log[log.len().saturating_sub(2000)..]);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_whose_message_was_never_published_is_repaired() {
    let env = TestEnv::new().await;
    env.add_media("video/silent.mp4", "again.mp4");
    env.add_media("video/silent.mp4", "relayed.mp4");
    let queue = env.topology().queue(TaskKind::Vision);
    let (exchange, key) = (env.topology().exchange().to_string(), "vision");
    let unbind = || env.channel.queue_unbind(queue.as_str().into(), exchange.as_str().into(), key.into(), FieldTable::default());
    let bind = || {
        env.channel.queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
    };
    // The broker refuses both publishes (unroutable) after the jobs were committed.
    let producer = Producer::connect(&env.settings).await.unwrap();
    let vision = |name: &str| {
        let mut req = EnqueueRequest::all(name);
        req.kinds = vec![TaskKind::Vision];
        req
    };
    unbind().await.unwrap();
    let err = producer.enqueue(&vision("again.mp4")).await.unwrap_err();
    assert!(matches!(err, ProducerError::Outbox(_)), "{err}");
    assert!(producer.enqueue(&vision("relayed.mp4")).await.is_err());
    bind().await.unwrap();
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'queued'").fetch_one(&env.pool).await.unwrap();
    assert_eq!(queued, 2);
    assert_eq!(env.queue(&queue).await.0, 0, "no message for either job");

    // Enqueuing a queued video again publishes it again (the old producer said "already queued").
    let again = producer.enqueue(&vision("again.mp4")).await.unwrap().jobs[0].job_id;
    assert_eq!(env.queue(&queue).await.0, 1);
    // The other one is published by a worker's outbox relay, without any new enqueue.
    let worker = env.spawn_worker("vision", "relay", &[("HEIMDEX__WORKER__OUTBOX_RELAY_MS", "300")]);
    env.wait_job(again, "succeeded", TASK).await;
    let relayed: Uuid = sqlx::query_scalar("SELECT j.id FROM jobs j JOIN videos v ON v.id = j.video_id WHERE v.uri LIKE '%relayed.mp4'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    env.wait_job(relayed, "succeeded", TASK).await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&env.pool).await.unwrap();
    assert_eq!(left, 0, "the outbox is empty once everything is published");
    drop(worker);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_replay_resets_the_job_before_it_publishes() {
    let env = TestEnv::new().await;
    let worker = env.spawn_worker("vision", "replayer", &[]);
    env.wait_state(&worker, WorkerState::Warm, WARM).await;
    // A task that fails permanently within milliseconds (its file is missing), so the replayed run
    // ends before `dlq replay` goes on: the old CLI then overwrote `failed` with `queued` for good.
    let mut jobs_ = Vec::new();
    for i in 0..5 {
        let (video, job) = (Uuid::new_v4(), Uuid::new_v4());
        let task = TaskMessage::new(job, video, TaskKind::Vision, format!("gone{i}.mp4"), TaskOptions::default());
        publish_raw(&env, "vision", &task.to_body(), Some(job)).await;
        jobs_.push(job);
    }
    for &job in &jobs_ {
        env.wait_job(job, "failed", TASK).await;
    }
    let dlq = env.topology().dlq(TaskKind::Vision);
    env.wait_for("the dead letters", TASK, || async { (env.queue(&dlq).await.0 == 5).then_some(()) }).await;
    let (code, out, err) = env.cli(&["dlq", "replay"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("5 replayed"), "{out}");
    env.wait_for("the replayed dead letters", TASK, || async { (env.queue(&dlq).await.0 == 5).then_some(()) }).await;
    for &job in &jobs_ {
        let row = env.wait_job(job, "failed", TASK).await;
        assert!(row.last_error.unwrap_or_default().contains("not found"));
    }
    drop(worker);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_are_fenced_by_their_token() {
    let env = TestEnv::new().await;
    let msg = TaskMessage::new(Uuid::new_v4(), Uuid::new_v4(), TaskKind::Index, "x.wav".into(), TaskOptions::default());
    let Start::Run(old) = jobs::start_run(&env.pool, &msg, "w1", false, 5).await.unwrap() else { panic!("first run") };
    // A second copy of the message while the first run lives is a duplicate; a broker redelivery
    // (the first run's worker died) takes the job over and counts the death.
    assert_eq!(jobs::start_run(&env.pool, &msg, "w2", false, 5).await.unwrap(), Start::Duplicate);
    let Start::Run(newer) = jobs::start_run(&env.pool, &msg, "w2", true, 5).await.unwrap() else { panic!("redelivery") };
    assert_eq!((newer.attempt, newer.generation), (2, old.generation), "a redelivery is the same generation");
    // The stale run's failure is refused and does not touch the live run.
    assert!(!jobs::record_failure(&env.pool, &old, JobStatus::Retrying, "stale", "w1", &serde_json::json!({})).await.unwrap());
    assert!(FencedRun::new(env.pool.clone(), old).begin().await.unwrap().is_none(), "a stale run cannot write results");
    // --force starts a new generation: the running one is superseded.
    let mut tx = env.pool.begin().await.unwrap();
    let queued = jobs::queue_job(&mut tx, msg.video_id, TaskKind::Index, true).await.unwrap().expect("a forced enqueue");
    assert_eq!(queued.job_id, newer.job_id);
    tx.commit().await.unwrap();
    assert!(!FencedRun::new(env.pool.clone(), newer).holds().await.unwrap());
    // The old enqueue's message, delivered again or for the first time, is superseded.
    assert_eq!(jobs::start_run(&env.pool, &msg, "w1", true, 5).await.unwrap(), Start::Superseded);
    assert_eq!(jobs::start_run(&env.pool, &msg, "w1", false, 5).await.unwrap(), Start::Superseded);
    let forced_msg = TaskMessage::of_enqueue(&queued, msg.video_id, TaskKind::Index, msg.media_uri.clone(), TaskOptions::default());
    let Start::Run(forced) = jobs::start_run(&env.pool, &forced_msg, "w3", false, 5).await.unwrap() else { panic!("forced run") };
    assert_eq!(forced.attempt, 1, "a new generation starts its attempts afresh");
    assert_eq!(forced.generation, newer.generation + 1, "--force counts a new generation");
    let mut tx = FencedRun::new(env.pool.clone(), forced).begin().await.unwrap().expect("the forced run holds its job");
    jobs::finish_success(&mut tx, &forced, &serde_json::json!({}), &serde_json::json!({})).await.unwrap();
    tx.commit().await.unwrap();
    // A late failure of the superseded run cannot turn the success back into `retrying`.
    assert!(!jobs::record_failure(&env.pool, &newer, JobStatus::Retrying, "late", "w2", &serde_json::json!({})).await.unwrap());
    let row = env.job(forced.job_id).await.unwrap();
    assert_eq!((row.status, row.attempts), (JobStatus::Succeeded, 1), "{row:?}");
    // A redelivery of the forced message after the success is acked as already done.
    assert_eq!(jobs::start_run(&env.pool, &forced_msg, "w1", true, 5).await.unwrap(), Start::AlreadyDone);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn force_on_a_running_job_supersedes_the_old_run() {
    let env = TestEnv::new().await;
    env.add_long_video("long.mp4");
    let worker = env.spawn_worker("vision", "fenced", &[]);
    let status = env.wait_state(&worker, WorkerState::Warm, WARM).await;
    let (video, job) = env.enqueue("long.mp4", TaskKind::Vision, false).await.unwrap();
    env.wait_job(job, "running", TASK).await;
    let (_, forced) = env.enqueue("long.mp4", TaskKind::Vision, true).await.unwrap();
    assert_eq!(forced, job, "one job per (video, kind)");
    let row = env.wait_job(job, "succeeded", TASK).await;
    let frames = frames(&env, video).await;
    assert!(frames >= 100 && row.summary.unwrap()["frames"].as_i64() == Some(frames), "exactly one set of results: {frames} rows");
    let metrics = env
        .wait_for("the superseded run to stop", TASK, || async {
            let (_, body) = http_get(&status.health_addr, "/metrics").await;
            (body.contains(r#"outcome="superseded""#) && body.contains(r#"outcome="succeeded""#)).then_some(body)
        })
        .await;
    let counted = |outcome: &str| {
        metrics
            .lines()
            .filter(|l| l.contains(&format!(r#"outcome="{outcome}""#)))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert_eq!((counted("superseded"), counted("succeeded")), (1.0, 1.0), "{metrics}");
    assert!(worker.log().contains("a newer run took this job over"), "{}", worker.log());
    drop(worker);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_that_panics_takes_its_worker_out_of_service_and_nothing_is_dead_lettered() {
    let env = TestEnv::new().await;
    env.add_media("video/sample.mp4", "sample.mp4");
    let mut broken = env.spawn_worker("vision", "broken", &[("HEIMDEX__WORKER__FAILPOINT", "model_panic:yunet")]);
    env.wait_state(&broken, WorkerState::Warm, WARM).await;
    let (video, job) = env.enqueue("sample.mp4", TaskKind::Vision, false).await.unwrap();
    assert_eq!(broken.wait_exit(TASK).await, Some(1), "{}", broken.log());
    let log = broken.log();
    assert!(log.contains("model yunet panicked") && log.contains("exits so that a restart reloads its models"), "{log}");
    let row = env.job(job).await.unwrap();
    assert_eq!((row.status, row.attempts), (JobStatus::Queued, 0), "the attempt was given back: {row:?}");
    assert_eq!(env.queue(&env.topology().dlq(TaskKind::Vision)).await.0, 0, "nothing dead-lettered");
    assert_eq!(env.queue(&env.topology().queue(TaskKind::Vision)).await, (1, 0), "the message is back in the queue");
    let healthy = env.spawn_worker("vision", "healthy", &[]);
    let row = env.wait_job(job, "succeeded", TASK).await;
    assert_eq!(row.attempts, 1);
    heimdex_tests::assert_results(&env, video).await;
    drop(healthy);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_that_cannot_be_published_neither_crashes_nor_loops() {
    let env = TestEnv::new().await;
    env.add_media("video/silent.mp4", "boom.mp4");
    let worker = env.spawn_worker("vision", "unlucky", &[("HEIMDEX__WORKER__FAILPOINT", "panic")]);
    env.wait_state(&worker, WorkerState::Warm, WARM).await;
    let producer = Producer::connect(&env.settings).await.unwrap();
    // Without its retry queues (deleted after the worker and the producer declared them) every retry
    // copy is returned unroutable; the old worker put the message straight back and ran it again,
    // forever, without counting.
    for attempt in 1..env.settings.worker.max_attempts {
        let delay = heimdex_shared::topology::Topology::backoff_ms(&env.settings.worker, attempt);
        let name = env.topology().retry_queue(TaskKind::Vision, delay);
        env.channel.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    }
    let mut req = EnqueueRequest::all("boom.mp4");
    req.kinds = vec![TaskKind::Vision];
    let job = producer.enqueue(&req).await.unwrap().jobs[0].job_id;
    let row = env.wait_job(job, "dead", TASK).await;
    assert_eq!(row.attempts, 3, "{row:?}");
    let dlq = env.topology().dlq(TaskKind::Vision);
    env.wait_for("the dead letter", TASK, || async { (env.queue(&dlq).await.0 == 1).then_some(()) }).await;
    let letters = drain_dlq(&env, &dlq).await;
    assert!(letters[0].1.contains("gave up after 3 attempts"), "{letters:?}");
    let log = worker.log();
    assert_eq!(log.matches("could not publish the retry").count(), 2, "{}", &log[log.len().saturating_sub(5000)..]);
    assert_eq!(env.worker_status("unlucky").await.unwrap().state, WorkerState::Warm);
    drop(worker);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_time_bound_follows_the_media_duration() {
    let env = TestEnv::new().await;
    env.add_long_video("long.mp4");
    // A base bound of 1 s: a 100 s video gets 1 s + 100 × 0.5 s, and takes a few seconds. The old
    // fixed bound timed such a task out on every attempt, then dead-lettered it.
    let worker = env.spawn_worker(
        "vision",
        "patient",
        &[("HEIMDEX__WORKER__TASK_TIMEOUT_MS", "1000"), ("HEIMDEX__WORKER__TASK_MS_PER_MEDIA_SECOND", "500")],
    );
    env.wait_state(&worker, WorkerState::Warm, WARM).await;
    let (video, job) = env.enqueue("long.mp4", TaskKind::Vision, false).await.unwrap();
    let row = env.wait_job(job, "succeeded", TASK).await;
    assert_eq!(row.attempts, 1, "{row:?}");
    let total: f64 = row.stage_timings.as_object().unwrap().values().filter_map(serde_json::Value::as_f64).sum();
    assert!(total > 1000.0, "the task outlived the base bound ({total} ms of stages)");
    assert!(frames(&env, video).await >= 100);
    drop(worker);
    env.cleanup().await;
}
