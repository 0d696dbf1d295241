//! The `heimdex` CLI: refusing bad input before anything is written, `--wait` exit codes, dead-letter
//! listing and replay, and the compose file.

use std::time::Duration;

use heimdex_shared::contract::TaskKind;
use heimdex_shared::fleet::WorkerState;
use heimdex_tests::TestEnv;

const WARM: Duration = Duration::from_secs(120);

async fn rows(env: &TestEnv) -> (i64, i64) {
    let videos: i64 = sqlx::query_scalar("SELECT count(*) FROM videos").fetch_one(&env.pool).await.unwrap();
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&env.pool).await.unwrap();
    (videos, jobs)
}

#[tokio::test(flavor = "multi_thread")]
async fn enqueue_refuses_bad_input_and_writes_nothing() {
    let env = TestEnv::new().await;
    env.add_media("video/corrupt.mp4", "corrupt.mp4");
    env.add_media("video/silent.mp4", "good.mp4");
    std::fs::write(env.media.path().join("empty.mp4"), b"").unwrap();
    let outside = tempfile::NamedTempFile::new().unwrap();
    std::fs::copy(heimdex_tests::bundle_media("video/silent.mp4"), outside.path()).unwrap();
    for (input, reason) in [
        ("missing.mp4", "not found"),
        ("corrupt.mp4", "ffprobe cannot read"),
        (outside.path().to_str().unwrap(), "outside the media root"),
        ("../../etc/passwd", "outside the media root"),
        ("empty.mp4", "is empty"),
    ] {
        // A good input beside a bad one: still nothing is enqueued.
        let (code, _, err) = env.cli(&["enqueue", "good.mp4", input]).await;
        assert_eq!(code, 2, "{input}: {err}");
        assert!(err.contains(reason) && err.contains("nothing was enqueued"), "{input}: {err}");
    }
    assert_eq!(rows(&env).await, (0, 0));
    for kind in TaskKind::ALL {
        assert_eq!(env.queue(&env.topology().queue(kind)).await.0, 0);
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn enqueue_wait_reports_outcomes_and_dlq_replay_reprocesses() {
    let env = TestEnv::new().await;
    env.add_media("video/silent.mp4", "silent.mp4");
    let worker = env.spawn_worker("vision", "cli-v", &[]);
    let index = env.spawn_worker("index", "cli-i", &[]);
    env.wait_state(&worker, WorkerState::Warm, WARM).await;
    env.wait_state(&index, WorkerState::Warm, WARM).await;

    // silent.mp4 has no audio: vision succeeds, index fails permanently, so --wait exits 1.
    let (code, out, err) = env.cli(&["enqueue", "silent.mp4", "--wait", "--timeout", "240"]).await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.lines().any(|l| l.contains("vision") && l.contains("succeeded")), "{out}");
    assert!(out.lines().any(|l| l.contains("index") && l.contains("failed")), "{out}");
    assert!(out.contains("no audio"), "{out}");
    let (code, out, _) = env.cli(&["enqueue", "silent.mp4", "--kind", "vision"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("already succeeded"), "{out}");

    // The job row is written before the message moves to the DLQ.
    let dlq = env.topology().dlq(TaskKind::Index);
    env.wait_for("the dead letter", WARM, || async { (env.queue(&dlq).await.0 == 1).then_some(()) }).await;
    let (code, out, _) = env.cli(&["dlq", "list"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("index") && out.contains("no audio") && out.contains("1 dead letter"), "{out}");
    // Listing does not consume.
    env.wait_for("the listed letter back in its queue", WARM, || async { (env.queue(&dlq).await.0 == 1).then_some(()) }).await;

    // Replay: the job is queued again and fails again, for the same reason, back in the DLQ.
    let (code, out, _) = env.cli(&["dlq", "replay", "--kind", "index"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("1 replayed"), "{out}");
    let job: uuid::Uuid = sqlx::query_scalar("SELECT id FROM jobs WHERE kind = 'index'").fetch_one(&env.pool).await.unwrap();
    let row = env.wait_job(job, "failed", WARM).await;
    assert_eq!(row.attempts, 1);
    env.wait_for("the replayed letter back in the DLQ", WARM, || async { (env.queue(&dlq).await.0 == 1).then_some(()) }).await;

    let (code, out, _) = env.cli(&["status", "--job", &job.to_string()]).await;
    assert_eq!(code, 0);
    assert!(out.contains("status failed") && out.contains("probe"), "{out}");
    drop((worker, index));
    env.cleanup().await;
}

#[test]
fn compose_file_is_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("docker-compose")
        .args(["-f", "deploy/docker-compose.yml", "config"])
        .current_dir(&root)
        .output()
        .expect("docker-compose is installed (scripts/setup)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for service in ["rabbitmq:", "postgres:", "redis:", "worker-index:", "worker-vision:"] {
        assert!(stdout.contains(service), "{service} missing:\n{stdout}");
    }
    assert!(stdout.contains("/readyz"), "healthchecks on /readyz:\n{stdout}");
}
