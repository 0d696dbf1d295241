//! Deleting: `heimdex delete`, `DELETE /v1/videos/{id}`, `heimdex dlq purge`, `heimdex sweep`
//! (`retention.days`), against the real database, broker, HTTP server and (for a forced delete of a
//! running job) a real worker. Also times the delete of a 10-minute video's rows.
//!
//! Rows are written straight into the test's database where no model is needed, at the sizes a real
//! 10-minute video gets: segments with 384-d MiniLM embeddings, frames at the vision sample rate (1 fps)
//! with 768-d SigLIP embeddings under the partial HNSW indexes `heimdex migrate` creates, faces,
//! scenes, index checkpoints and both jobs.

use std::time::{Duration, Instant};

use heimdex_shared::Settings;
use heimdex_shared::contract::{SpeechTask, TaskKind, TaskMessage, TaskOptions};
use heimdex_shared::delete::{self, DeleteError};
use heimdex_shared::fleet::WorkerState;
use heimdex_shared::jobs::{self, FencedRun, JobStatus, Start};
use heimdex_shared::topology;
use heimdex_tests::{TestEnv, http_get, http_with};
use heimdex_worker::Persist;
use heimdex_worker::index::checkpoint::{Checkpoints, WindowText};
use heimdex_worker::index::persist::{IndexOutput, Segment};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

const WARM: Duration = Duration::from_secs(120);
const TASK: Duration = Duration::from_secs(240);
const KEY: &str = "k3y-delete-0123456789abcdef";

/// Rows of one video, by table.
#[derive(Debug, PartialEq, Eq)]
struct Rows {
    videos: i64,
    segments: i64,
    frames: i64,
    faces: i64,
    scenes: i64,
    checkpoints: i64,
    jobs: i64,
}

async fn rows(pool: &PgPool, video: Uuid) -> Rows {
    let (videos, segments, frames, faces, scenes, checkpoints, jobs): (i64, i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM videos WHERE id = $1), (SELECT count(*) FROM transcript_segments WHERE video_id = $1),
                (SELECT count(*) FROM frames WHERE video_id = $1), (SELECT count(*) FROM faces WHERE video_id = $1),
                (SELECT count(*) FROM scenes WHERE video_id = $1), (SELECT count(*) FROM index_checkpoints WHERE video_id = $1),
                (SELECT count(*) FROM jobs WHERE video_id = $1)",
    )
    .bind(video)
    .fetch_one(pool)
    .await
    .expect("count rows");
    Rows { videos, segments, frames, faces, scenes, checkpoints, jobs }
}

const NONE: Rows = Rows { videos: 0, segments: 0, frames: 0, faces: 0, scenes: 0, checkpoints: 0, jobs: 0 };

/// What a 10-minute video leaves: 200 transcript segments (3 s each), 600 frames (1 fps), two faces on
/// each frame, 40 scenes, 20 index checkpoints (30 s windows of 10 segments), both jobs succeeded.
const TEN_MINUTES: Rows = Rows { videos: 1, segments: 200, frames: 600, faces: 1200, scenes: 40, checkpoints: 20, jobs: 2 };

/// Writes a video at `uri` with [`TEN_MINUTES`] of rows (random unit-free embeddings under the default
/// models' names, so that the partial HNSW indexes hold them). Returns the video id.
async fn insert_ten_minutes(pool: &PgPool, uri: &str) -> Uuid {
    let settings = Settings::default();
    let video = Uuid::new_v4();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO videos (id, uri, duration_s, width, height, fps, has_audio, has_video) VALUES ($1, $2, 600, 1280, 720, 25, true, true)")
        .bind(video)
        .bind(uri)
        .execute(&mut *tx)
        .await
        .unwrap();
    let (index_model, index_dim) = (settings.index.embed_model.as_str(), settings.index.embed_dim as i32);
    let (vision_model, vision_dim) = (settings.vision.embed_model.as_str(), settings.vision.embed_dim as i32);
    let statements: [(&str, Option<(&str, i32)>); 6] = [
        (
            "INSERT INTO transcript_segments (video_id, idx, start_s, end_s, text, language, confidence, embedding, embedding_model)
             SELECT $1, i, i * 3.0, i * 3.0 + 2.9, 'segment ' || i || ' of the talk about video indexing', 'en', 0.9, e.v, $2
             FROM generate_series(0, 199) i
             CROSS JOIN LATERAL (SELECT array_agg(random() + 0 * g)::real[]::vector AS v FROM generate_series(1, $3) g WHERE i >= 0) e",
            Some((index_model, index_dim)),
        ),
        (
            "INSERT INTO frames (video_id, idx, ts_s, scene_idx, embedding, embedding_model)
             SELECT $1, i, i, i / 15, e.v, $2 FROM generate_series(0, 599) i
             CROSS JOIN LATERAL (SELECT array_agg(random() + 0 * g)::real[]::vector AS v FROM generate_series(1, $3) g WHERE i >= 0) e",
            Some((vision_model, vision_dim)),
        ),
        (
            "INSERT INTO faces (video_id, frame_idx, face_idx, ts_s, x, y, w, h, landmarks, score)
             SELECT $1, i, f, i, 100 + f * 400, 120, 180, 220, ARRAY[1,2,3,4,5,6,7,8,9,10]::real[], 0.93
             FROM generate_series(0, 599) i, generate_series(0, 1) f",
            None,
        ),
        (
            "INSERT INTO scenes (video_id, idx, start_s, end_s, frame_count, embedding, embedding_model)
             SELECT $1, i, i * 15, i * 15 + 15, 15, e.v, $2 FROM generate_series(0, 39) i
             CROSS JOIN LATERAL (SELECT array_agg(random() + 0 * g)::real[]::vector AS v FROM generate_series(1, $3) g WHERE i >= 0) e",
            Some((vision_model, vision_dim)),
        ),
        (
            "INSERT INTO index_checkpoints (video_id, window_index, offset_s, duration_s, config, language, segments)
             SELECT $1, w, w * 30, 30, 'whisper-base', 50259,
                    (SELECT jsonb_agg(jsonb_build_object('start_s', w * 30 + s * 3, 'end_s', w * 30 + s * 3 + 2.9,
                                                         'text', 'segment text', 'confidence', 0.9))
                     FROM generate_series(0, 9) s)
             FROM generate_series(0, 19) w",
            None,
        ),
        (
            "INSERT INTO jobs (id, video_id, kind, status, attempts, queued_at, started_at, finished_at)
             SELECT gen_random_uuid(), $1, k, 'succeeded', 1, now(), now(), now() FROM unnest(ARRAY['index', 'vision']) k",
            None,
        ),
    ];
    for (sql, model) in statements {
        let mut query = sqlx::query(sql).bind(video);
        if let Some((name, dim)) = model {
            query = query.bind(name).bind(dim);
        }
        query.execute(&mut *tx).await.unwrap_or_else(|e| panic!("{e}: {sql}"));
    }
    tx.commit().await.unwrap();
    assert_eq!(rows(pool, video).await, TEN_MINUTES);
    video
}

/// A job that a worker runs now (as `start_run` leaves it), for a video at `uri`.
async fn running_job(pool: &PgPool, uri: &str, kind: TaskKind) -> (TaskMessage, jobs::Run) {
    let msg = TaskMessage::new(Uuid::new_v4(), Uuid::new_v4(), kind, uri.into(), TaskOptions::default());
    let Start::Run(run) = jobs::start_run(pool, &msg, "w1", false, 5).await.unwrap() else { panic!("a first run") };
    (msg, run)
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_removes_every_row_of_the_video_and_a_stale_message_does_not_bring_it_back() {
    let env = TestEnv::new().await;
    std::fs::write(env.media.path().join("talk.mp4"), b"not read: the rows are written directly").unwrap();
    let path = std::fs::canonicalize(env.media.path().join("talk.mp4")).unwrap().display().to_string();
    let video = insert_ten_minutes(&env.pool, &path).await;
    let other = insert_ten_minutes(&env.pool, "/elsewhere/other.mp4").await;
    // A message of an earlier enqueue still waits in a queue (or the outbox).
    let job: Uuid =
        sqlx::query_scalar("SELECT id FROM jobs WHERE video_id = $1 AND kind = 'vision'").bind(video).fetch_one(&env.pool).await.unwrap();
    let stale = TaskMessage::new(job, video, TaskKind::Vision, path.clone(), TaskOptions::default());
    sqlx::query("INSERT INTO outbox (job_id, body) VALUES ($1, $2)").bind(job).bind(stale.to_body()).execute(&env.pool).await.unwrap();

    // By its path as enqueued (relative to the media root), like `heimdex transcript`.
    let (code, stdout, stderr) = env.cli(&["delete", "talk.mp4"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("deleted video {video}"))
            && stdout.contains("200 segments, 600 frames, 1200 faces, 40 scenes, 20 checkpoints, 2 jobs"),
        "{stdout}"
    );
    assert_eq!(rows(&env.pool, video).await, NONE);
    assert_eq!(env.count("SELECT count(*) FROM outbox WHERE job_id = $1", job).await, 0, "its unpublished message went too");
    assert_eq!(rows(&env.pool, other).await, TEN_MINUTES, "another video is untouched");
    assert_eq!(env.count("SELECT count(*) FROM deleted_videos WHERE video_id = $1", video).await, 1, "a tombstone");

    // The stale message, delivered now, is acked as superseded and creates nothing.
    assert_eq!(jobs::start_run(&env.pool, &stale, "w1", true, 5).await.unwrap(), Start::Superseded);
    assert_eq!(jobs::start_run(&env.pool, &stale, "w1", false, 5).await.unwrap(), Start::Superseded);
    let recreated: i64 = sqlx::query_scalar("SELECT count(*) FROM videos WHERE uri = $1").bind(&path).fetch_one(&env.pool).await.unwrap();
    assert_eq!(recreated, 0, "a message from before the delete must not bring the video back");
    // A later enqueue of the same file is a new video.
    let fresh = TaskMessage::new(Uuid::new_v4(), Uuid::new_v4(), TaskKind::Vision, path.clone(), TaskOptions::default());
    assert!(matches!(jobs::start_run(&env.pool, &fresh, "w1", false, 5).await.unwrap(), Start::Run(_)));

    // Twice: nothing left to delete, said plainly (exit 2: nothing was written).
    let (code, _, stderr) = env.cli(&["delete", &video.to_string()]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no video"), "{stderr}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forced_delete_fences_the_running_run_out_and_a_committing_one_goes_first() {
    let env = TestEnv::new().await;
    // A run in progress (index: it stores checkpoints as it goes).
    let (_, run) = running_job(&env.pool, "/media/running.wav", TaskKind::Index).await;
    let fenced = FencedRun::new(env.pool.clone(), run);
    let checkpoints = Checkpoints::load(fenced.clone(), "cfg".into()).await.unwrap();
    let window = |index: usize| WindowText {
        index,
        offset_s: index as f64 * 30.0,
        duration_s: 30.0,
        segments: vec![Segment { start_s: 0.0, end_s: 2.0, text: "hello".into(), confidence: 0.9, embedding: vec![], words: vec![] }],
        language: 50259,
    };
    checkpoints.save(&window(0)).await.unwrap();
    assert_eq!(rows(&env.pool, run.video_id).await.checkpoints, 1);

    // Without force: refused, nothing deleted.
    match delete::delete_video(&env.pool, run.video_id, false).await {
        Err(DeleteError::Running { kinds, .. }) => assert_eq!(kinds, vec!["index".to_string()]),
        other => panic!("a running job must refuse the delete: {other:?}"),
    }
    assert_eq!(rows(&env.pool, run.video_id).await.jobs, 1);
    let (code, _, stderr) = env.cli(&["delete", &run.video_id.to_string()]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("running") && stderr.contains("--force") && stderr.contains("nothing was deleted"), "{stderr}");

    // Forced: the run is superseded first, and everything of it that comes later fails its fence.
    let deleted = delete::delete_video(&env.pool, run.video_id, true).await.unwrap();
    assert_eq!((deleted.jobs, deleted.checkpoints, deleted.superseded_runs), (1, 1, 1), "{deleted:?}");
    assert!(!fenced.holds().await.unwrap(), "the worker's poll sees the run is over");
    checkpoints.save(&window(1)).await.unwrap();
    assert!(fenced.begin().await.unwrap().is_none(), "the results transaction finds no job to write under");
    assert!(!jobs::record_failure(&env.pool, &run, JobStatus::Retrying, "late", "w1", &serde_json::json!({})).await.unwrap());
    assert_eq!(rows(&env.pool, run.video_id).await, NONE, "no write of the superseded run came back");

    // A results transaction that holds its job when the delete comes commits first; the delete then
    // removes what it wrote (the job succeeded, so no force is needed).
    let (_, run) = running_job(&env.pool, "/media/committing.wav", TaskKind::Index).await;
    let mut tx = FencedRun::new(env.pool.clone(), run).begin().await.unwrap().expect("the run holds its job");
    let output = IndexOutput {
        segments: (0..3)
            .map(|i| Segment {
                start_s: i as f64,
                end_s: i as f64 + 1.0,
                text: format!("s{i}"),
                confidence: 0.9,
                embedding: vec![],
                words: vec![],
            })
            .collect(),
        language: "en".into(),
        task: SpeechTask::Transcribe,
        spoken_language: None,
        audio_s: 3.0,
        embedding_model: "m".into(),
        windows: 1,
        resumed_windows: 0,
    };
    output.write(&mut tx, run.video_id).await.unwrap();
    jobs::finish_success(&mut tx, &run, &serde_json::json!({}), &serde_json::json!({})).await.unwrap();
    let pool = env.pool.clone();
    let deleting = tokio::spawn(async move { delete::delete_video(&pool, run.video_id, false).await });
    env.wait_for("the delete to wait for the results transaction's lock", TASK, || async {
        let waiting: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()")
                .fetch_one(&env.pool)
                .await
                .ok()?;
        (waiting > 0).then_some(())
    })
    .await;
    tx.commit().await.unwrap();
    let deleted = deleting.await.unwrap().expect("the delete goes on once the results are committed");
    assert_eq!((deleted.segments, deleted.jobs, deleted.superseded_runs), (3, 1, 0), "{deleted:?}");
    assert_eq!(rows(&env.pool, run.video_id).await, NONE);
    env.cleanup().await;
}

/// Tasks that ended with `outcome`, from a worker's `/metrics`.
fn counted(metrics: &str, outcome: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("heimdex_tasks_total") && l.contains(&format!(r#"outcome="{outcome}""#)))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forced_delete_stops_a_real_worker_and_nothing_it_wrote_remains() {
    let env = TestEnv::new().await;
    // 300 s of video: the vision task runs for tens of seconds on 2 cores.
    let dest = env.media.path().join("long.mp4");
    let status = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-stream_loop", "11", "-i"])
        .arg(heimdex_tests::bundle_media("video/sample.mp4"))
        .args(["-c", "copy"])
        .arg(&dest)
        .status()
        .expect("ffmpeg");
    assert!(status.success());
    let worker = env.spawn_worker("vision", "deleted-under", &[]);
    let status = env.wait_state(&worker, WorkerState::Warm, WARM).await;
    let (video, job) = env.enqueue("long.mp4", TaskKind::Vision, false).await.unwrap();
    env.wait_job(job, "running", TASK).await;
    let (code, _, stderr) = env.cli(&["delete", "long.mp4"]).await;
    assert_eq!(code, 2, "refused while running: {stderr}");
    assert_eq!(rows(&env.pool, video).await.jobs, 1, "nothing deleted");
    let (code, stdout, stderr) = env.cli(&["delete", "long.mp4", "--force"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("1 running job(s) stopped"), "{stdout}");
    let metrics = env
        .wait_for("the worker to stop the deleted video's task", TASK, || async {
            let (_, body) = http_get(&status.health_addr, "/metrics").await;
            (counted(&body, "superseded") == 1.0).then_some(body)
        })
        .await;
    assert_eq!(counted(&metrics, "succeeded"), 0.0, "the deleted task must not succeed: {metrics}");
    assert!(worker.log().contains("a newer run took this job over"), "{}", worker.log());
    assert_eq!(rows(&env.pool, video).await, NONE, "the worker wrote nothing back");
    let videos: i64 = sqlx::query_scalar("SELECT count(*) FROM videos").fetch_one(&env.pool).await.unwrap();
    assert_eq!(videos, 0, "and did not create the video again");
    // The worker goes on with the next video.
    env.add_media("video/sample.mp4", "sample.mp4");
    let (next, job) = env.enqueue("sample.mp4", TaskKind::Vision, false).await.unwrap();
    env.wait_job(job, "succeeded", TASK).await;
    assert_eq!(rows(&env.pool, next).await.frames, 25);
    drop(worker);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_deletes_only_with_a_key_and_answers_each_case() {
    let env = TestEnv::new().await;
    let video = insert_ten_minutes(&env.pool, "/media/api.mp4").await;
    let path = format!("/v1/videos/{video}");
    // Without keys the server refuses every delete.
    {
        let (_server, addr) = env.serve().await;
        let (code, body) = http_with(&addr, "DELETE", &path, &[], None).await;
        assert_eq!(code, 403, "{body}");
        assert!(body.contains("API key"), "{body}");
        assert_eq!(rows(&env.pool, video).await, TEN_MINUTES);
    }
    let (_server, addr) = env.serve_with(&[("HEIMDEX__SERVE__API_KEYS", KEY)], "127.0.0.1:0").await;
    let auth = format!("Bearer {KEY}");
    let with_key = [("Authorization", auth.as_str())];
    let (code, body) = http_with(&addr, "DELETE", &path, &[], None).await;
    assert_eq!(code, 401, "{body}");
    for (target, status) in [
        ("/v1/videos/not-a-uuid".to_string(), 400),
        (format!("/v1/videos/{}", Uuid::new_v4()), 404),
        (format!("{path}?force=maybe"), 400),
        (format!("{path}?other=1"), 400),
    ] {
        let (code, body) = http_with(&addr, "DELETE", &target, &with_key, None).await;
        assert_eq!(code, status, "{target}: {body}");
        assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string(), "{body}");
    }
    assert_eq!(rows(&env.pool, video).await, TEN_MINUTES, "no refused request deleted anything");
    let (_, run) = running_job(&env.pool, "/media/api-running.mp4", TaskKind::Vision).await;
    let (code, body) = http_with(&addr, "DELETE", &format!("/v1/videos/{}", run.video_id), &with_key, None).await;
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("running") && body.contains("force"), "{body}");
    let (code, body) = http_with(&addr, "DELETE", &format!("/v1/videos/{}?force=true", run.video_id), &with_key, None).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["superseded_runs"], 1, "{body}");
    let (code, body) = http_with(&addr, "DELETE", &path, &with_key, None).await;
    assert_eq!(code, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["video_id"], video.to_string(), "{body}");
    assert_eq!(
        (answer["segments"].as_i64(), answer["frames"].as_i64(), answer["faces"].as_i64()),
        (Some(200), Some(600), Some(1200)),
        "{body}"
    );
    assert_eq!(rows(&env.pool, video).await, NONE);
    let (code, _) = http_with(&addr, "DELETE", &path, &with_key, None).await;
    assert_eq!(code, 404, "gone");
    env.cleanup().await;
}

/// A dead letter of `kind` in its DLQ, for a job that ended `days_ago`.
async fn dead_letter(env: &TestEnv, kind: TaskKind, uri: &str, days_ago: i32) -> Uuid {
    let (msg, run) = running_job(&env.pool, uri, kind).await;
    assert!(jobs::record_failure(&env.pool, &run, JobStatus::Dead, "gave up", "w1", &serde_json::json!({})).await.unwrap());
    sqlx::query("UPDATE jobs SET finished_at = now() - make_interval(days => $2) WHERE id = $1")
        .bind(run.job_id)
        .bind(days_ago)
        .execute(&env.pool)
        .await
        .unwrap();
    let msg = TaskMessage { job_id: run.job_id, ..msg };
    let props = topology::task_properties(&msg, 3);
    topology::publish_confirmed(&env.channel, "", &env.topology().dlq(kind), &msg.to_body(), props).await.expect("publish");
    run.job_id
}

async fn dlq_ids(env: &TestEnv, kind: TaskKind) -> Vec<String> {
    let (code, stdout, stderr) = env.cli(&["dlq", "list", "--kind", kind.as_str()]).await;
    assert_eq!(code, 0, "{stderr}");
    let mut ids: Vec<String> =
        stdout.lines().filter_map(|l| l.split_whitespace().nth(2).map(str::to_string)).filter(|w| w.len() == 36).collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_purge_drops_letters_older_than_asked_and_keeps_the_rest() {
    let env = TestEnv::new().await;
    let old = dead_letter(&env, TaskKind::Vision, "/media/old.mp4", 10).await;
    let young = dead_letter(&env, TaskKind::Vision, "/media/young.mp4", 0).await;
    let index = dead_letter(&env, TaskKind::Index, "/media/old.wav", 10).await;
    let mut both = vec![old.to_string(), young.to_string()];
    both.sort();
    env.wait_for("the letters to be in their queues", TASK, || async { (dlq_ids(&env, TaskKind::Vision).await == both).then_some(()) })
        .await;

    let (code, _, stderr) = env.cli(&["dlq", "purge", "--older-than", "3w"]).await;
    assert_ne!(code, 0, "an age it cannot read is refused");
    assert!(stderr.contains("3w"), "{stderr}");

    let (code, stdout, stderr) = env.cli(&["dlq", "purge", "--kind", "vision", "--older-than", "7d"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(&format!("job {old}  purged")) && stdout.contains("1 purged, 1 left"), "{stdout}");
    assert_eq!(dlq_ids(&env, TaskKind::Vision).await, vec![young.to_string()], "the young letter is back in its queue");
    assert_eq!(dlq_ids(&env, TaskKind::Index).await, vec![index.to_string()], "--kind vision leaves index alone");
    assert_eq!(env.job(old).await.unwrap().status, JobStatus::Dead, "the job keeps its end and reason");

    let (code, stdout, stderr) = env.cli(&["dlq", "purge"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("2 purged, 0 left"), "{stdout}");
    assert!(dlq_ids(&env, TaskKind::Vision).await.is_empty() && dlq_ids(&env, TaskKind::Index).await.is_empty());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_retention_sweep_deletes_what_ended_before_the_period_and_nothing_else() {
    let env = TestEnv::new().await;
    let expired = insert_ten_minutes(&env.pool, "/media/expired.mp4").await;
    let recent = insert_ten_minutes(&env.pool, "/media/recent.mp4").await;
    let failed_long_ago = insert_ten_minutes(&env.pool, "/media/failed.mp4").await;
    let half = insert_ten_minutes(&env.pool, "/media/half.mp4").await;
    let (_, running) = running_job(&env.pool, "/media/running.mp4", TaskKind::Vision).await;
    let (_, orphan) = running_job(&env.pool, "/media/orphan.mp4", TaskKind::Vision).await;
    sqlx::query("DELETE FROM jobs WHERE id = $1").bind(orphan.job_id).execute(&env.pool).await.unwrap();
    let age = |days: i32, video: Uuid, extra: &'static str| {
        let pool = env.pool.clone();
        async move {
            sqlx::query(&format!(
                "WITH v AS (UPDATE videos SET created_at = now() - make_interval(days => $2) WHERE id = $1)
                 UPDATE jobs SET queued_at = now() - make_interval(days => $2), finished_at = now() - make_interval(days => $2) {extra}
                 WHERE video_id = $1"
            ))
            .bind(video)
            .bind(days)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    age(100, expired, "").await;
    age(100, recent, "").await;
    sqlx::query("UPDATE jobs SET finished_at = now() - interval '1 day' WHERE video_id = $1")
        .bind(recent)
        .execute(&env.pool)
        .await
        .unwrap();
    age(100, failed_long_ago, ", status = 'failed', last_error = 'corrupt'").await;
    age(100, half, "").await;
    sqlx::query("UPDATE jobs SET status = 'queued', finished_at = NULL WHERE video_id = $1 AND kind = 'index'")
        .bind(half)
        .execute(&env.pool)
        .await
        .unwrap();
    age(100, running.video_id, ", status = 'running'").await;
    age(100, orphan.video_id, "").await;

    let (code, stdout, stderr) = env.cli(&["sweep"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("nothing to sweep"), "retention is off by default: {stdout}");
    assert_eq!(rows(&env.pool, expired).await, TEN_MINUTES);

    let (code, stdout, stderr) = env.cli_with(&[("HEIMDEX__RETENTION__DAYS", "30")], &["sweep"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("3 video(s) older than 30 days deleted"), "{stdout}");
    for gone in [expired, failed_long_ago, orphan.video_id] {
        assert_eq!(rows(&env.pool, gone).await, NONE, "{gone} expired:\n{stdout}");
    }
    assert_eq!(rows(&env.pool, recent).await, TEN_MINUTES, "a job ended a day ago");
    assert_eq!(rows(&env.pool, half).await, TEN_MINUTES, "a job still queued");
    assert_eq!(rows(&env.pool, running.video_id).await.jobs, 1, "a job running");
    // A second sweep finds nothing more.
    let (code, stdout, _) = env.cli(&["sweep", "--days", "30"]).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("0 video(s)"), "{stdout}");
    env.cleanup().await;
}

/// The figure for the README: the delete of a 10-minute video's rows (median of 5), among other
/// videos' rows, under the HNSW indexes.
#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_ten_minute_videos_rows_takes_milliseconds() {
    let env = TestEnv::new().await;
    let mut others = Vec::new();
    for i in 0..3 {
        others.push(insert_ten_minutes(&env.pool, &format!("/media/other-{i}.mp4")).await);
    }
    let mut took = Vec::new();
    for i in 0..5 {
        let video = insert_ten_minutes(&env.pool, &format!("/media/measured-{i}.mp4")).await;
        let started = Instant::now();
        let deleted = delete::delete_video(&env.pool, video, false).await.unwrap();
        took.push(started.elapsed());
        assert_eq!(
            (deleted.segments, deleted.frames, deleted.faces, deleted.scenes, deleted.checkpoints, deleted.jobs),
            (200, 600, 1200, 40, 20, 2)
        );
        assert_eq!(rows(&env.pool, video).await, NONE);
    }
    for other in others {
        assert_eq!(rows(&env.pool, other).await, TEN_MINUTES);
    }
    took.sort();
    let median = took[took.len() / 2];
    eprintln!("delete of a 10-minute video's rows (2,063 rows): median {median:?} of {took:?}");
    assert!(median < Duration::from_secs(5), "a delete that takes {median:?} is broken: {took:?}");
    env.cleanup().await;
}
