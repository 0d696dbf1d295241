//! The fleet end to end: enqueue → both workers → rows; competing consumers; no consuming before warm.

use std::time::Duration;

use heimdex_producer::{EnqueueRequest, Producer};
use heimdex_shared::contract::TaskKind;
use heimdex_shared::fleet::WorkerState;
use heimdex_tests::{TestEnv, http_get};

const WARM: Duration = Duration::from_secs(120);
const TASK: Duration = Duration::from_secs(240);

#[tokio::test(flavor = "multi_thread")]
async fn enqueued_video_is_processed_by_both_workers() {
    let env = TestEnv::new().await;
    env.add_media("video/sample.mp4", "sample.mp4");
    let vision = env.spawn_worker("vision", "v1", &[]);
    let index = env.spawn_worker("index", "i1", &[]);
    env.wait_state(&vision, WorkerState::Warm, WARM).await;
    env.wait_state(&index, WorkerState::Warm, WARM).await;

    let producer = Producer::connect(&env.settings).await.unwrap();
    let enqueued = producer.enqueue(&EnqueueRequest::all("sample.mp4")).await.unwrap();
    assert_eq!(enqueued.jobs.len(), 2);
    for job in &enqueued.jobs {
        let row = env.wait_job(job.job_id, "succeeded", TASK).await;
        assert_eq!(row.attempts, 1, "{row:?}");
        assert!(row.stage_timings.get("persist").is_some(), "stage timings recorded: {}", row.stage_timings);
    }
    heimdex_tests::assert_results(&env, enqueued.video_id).await;
    for kind in TaskKind::ALL {
        assert_eq!(env.queue(&env.topology().queue(kind)).await.0, 0, "{kind} queue drained");
        assert_eq!(env.queue(&env.topology().dlq(kind)).await.0, 0, "{kind} dlq empty");
    }
    // Enqueuing again does not duplicate work; --force does.
    let again = producer.enqueue(&EnqueueRequest::all("sample.mp4")).await.unwrap();
    assert!(again.jobs.iter().all(|j| !j.published && j.status == heimdex_shared::jobs::JobStatus::Succeeded), "{again:?}");
    let mut forced = EnqueueRequest::all("sample.mp4");
    forced.force = true;
    forced.kinds = vec![TaskKind::Vision];
    let forced = producer.enqueue(&forced).await.unwrap();
    assert!(forced.jobs[0].published);
    env.wait_job(forced.jobs[0].job_id, "succeeded", TASK).await;
    heimdex_tests::assert_results(&env, enqueued.video_id).await;
    drop((vision, index));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn competing_consumers_share_work_and_status_shows_warm_up_progress() {
    let env = TestEnv::new().await;
    let names: Vec<String> = (0..6).map(|i| format!("clip{i}.mp4")).collect();
    for n in &names {
        env.add_media("video/silent.mp4", n);
    }
    let release = env.media.path().join(".release-w2");
    let w1 = env.spawn_worker("vision", "w1", &[]);
    let held = format!("hold_warmup:{}", release.display());
    let w2 = env.spawn_worker("vision", "w2", &[("HEIMDEX__WORKER__FAILPOINT", &held)]);
    env.wait_state(&w1, WorkerState::Warm, WARM).await;
    env.wait_state(&w2, WorkerState::Warming, WARM).await;

    let (code, out, err) = env.cli(&["status"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("vision: warm 1/2"), "{out}");
    assert!(out.lines().any(|l| l.contains("w2") && l.contains("warming")), "{out}");
    assert!(out.lines().any(|l| l.contains("w1") && l.contains("warm ")), "{out}");

    std::fs::write(&release, b"go").unwrap();
    env.wait_state(&w2, WorkerState::Warm, WARM).await;
    let (_, out, _) = env.cli(&["status"]).await;
    assert!(out.contains("vision: warm 2/2"), "{out}");

    let producer = Producer::connect(&env.settings).await.unwrap();
    let mut jobs = Vec::new();
    for n in &names {
        let mut req = EnqueueRequest::all(n.as_str());
        req.kinds = vec![TaskKind::Vision];
        jobs.push(producer.enqueue(&req).await.unwrap().jobs[0].job_id);
    }
    let mut by_worker = std::collections::BTreeMap::<String, usize>::new();
    for job in jobs {
        let row = env.wait_job(job, "succeeded", TASK).await;
        assert_eq!(row.attempts, 1, "each video processed exactly once: {row:?}");
        *by_worker.entry(row.worker_id.unwrap_or_default()).or_default() += 1;
    }
    assert_eq!(by_worker.len(), 2, "both workers took work: {by_worker:?}");
    let done: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'succeeded'").fetch_one(&env.pool).await.unwrap();
    assert_eq!(done, 6);
    drop((w1, w2));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_takes_no_message_before_it_is_warm() {
    let env = TestEnv::new().await;
    env.add_media("video/silent.mp4", "early.mp4");
    let release = env.media.path().join(".release");
    let held = format!("hold_warmup:{}", release.display());
    let worker = env.spawn_worker("vision", "early", &[("HEIMDEX__WORKER__FAILPOINT", &held)]);
    let status = env.wait_state(&worker, WorkerState::Warming, WARM).await;
    let (code, body) = http_get(&status.health_addr, "/readyz").await;
    assert_eq!((code, body.trim()), (503, "warming"));

    let producer = Producer::connect(&env.settings).await.unwrap();
    let mut req = EnqueueRequest::all("early.mp4");
    req.kinds = vec![TaskKind::Vision];
    let job = producer.enqueue(&req).await.unwrap().jobs[0].job_id;
    let queue = env.topology().queue(TaskKind::Vision);
    // The message waits in the queue, with nobody consuming, while the worker warms.
    assert_eq!(env.queue(&queue).await, (1, 0));
    assert_eq!(env.job(job).await.unwrap().status.as_str(), "queued");
    assert_eq!(env.worker_status("early").await.unwrap().state, WorkerState::Warming);

    std::fs::write(&release, b"go").unwrap();
    env.wait_state(&worker, WorkerState::Warm, WARM).await;
    let (code, body) = http_get(&status.health_addr, "/readyz").await;
    assert_eq!((code, body.trim()), (200, "warm"));
    env.wait_job(job, "succeeded", TASK).await;
    // The job row commits before the ack; the counter moves after it.
    let metrics = env
        .wait_for("the task counted in /metrics", TASK, || async {
            let (code, metrics) = http_get(&status.health_addr, "/metrics").await;
            (code == 200 && metrics.contains("heimdex_tasks_total{kind=\"vision\",outcome=\"succeeded\"} 1")).then_some(metrics)
        })
        .await;
    assert!(metrics.contains("heimdex_worker_state{state=\"warm\"} 1"), "{metrics}");
    assert!(metrics.contains("heimdex_inference_batch_size_count"), "{metrics}");
    env.wait_for("queue to drain", TASK, || async { (env.queue(&queue).await == (0, 1)).then_some(()) }).await;
    drop(worker);
    env.cleanup().await;
}
