//! Outages and untrusted input: a broker blip, Redis down, signals while loading or draining, a
//! playlist that points outside the media root, a PostgreSQL restart, a database that stops answering.
//! Outages go through a TCP proxy the test controls, so that other tests are not disturbed.

use std::time::Duration;

use heimdex_shared::config::QueueType;
use heimdex_shared::contract::{TaskKind, TaskMessage, TaskOptions};
use heimdex_shared::error::Disposition;
use heimdex_shared::fleet::WorkerState;
use heimdex_tests::proxy::{self, TcpProxy};
use heimdex_tests::{TestEnv, http_get, publish_raw};
use uuid::Uuid;

const WARM: Duration = Duration::from_secs(180);
const TASK: Duration = Duration::from_secs(240);

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_outage_keeps_the_worker_warm_and_it_reconnects() {
    let env = TestEnv::new().await;
    env.add_long_video("long.mp4");
    env.add_media("video/silent.mp4", "after.mp4");
    let proxy = TcpProxy::start("127.0.0.1:5672").await;
    let via_proxy = proxy.route(env.settings.amqp.urls[0].expose());
    let worker = env.spawn_worker("vision", "blip", &[("HEIMDEX__AMQP__URL", &via_proxy)]);
    let status = env.wait_state(&worker, WorkerState::Warm, WARM).await;
    let (video, job) = env.enqueue("long.mp4", TaskKind::Vision, false).await.unwrap();
    env.wait_job(job, "running", TASK).await;

    proxy.cut();
    env.wait_state(&worker, WorkerState::Disconnected, TASK).await;
    assert_eq!(http_get(&status.health_addr, "/readyz").await, (503, "disconnected\n".to_string()));
    proxy.restore();
    env.wait_state(&worker, WorkerState::Warm, TASK).await;

    // The task in flight during the outage: committed, then acked as already done (or redone).
    let row = env.wait_job(job, "succeeded", TASK).await;
    let frames = env.count("SELECT count(*) FROM frames WHERE video_id = $1", video).await;
    assert_eq!(row.summary.unwrap()["frames"].as_i64(), Some(frames), "one set of results");
    // A job enqueued after the outage runs on the same, still warm, worker.
    let (_, after) = env.enqueue("after.mp4", TaskKind::Vision, false).await.unwrap();
    env.wait_job(after, "succeeded", TASK).await;
    let queue = env.topology().queue(TaskKind::Vision);
    env.wait_for("every message acked", TASK, || async { (env.queue(&queue).await == (0, 1)).then_some(()) }).await;
    let log = worker.log();
    assert_eq!(log.matches("models loaded").count(), 1, "the models were loaded once: {log}");
    assert!(log.contains("lost the broker: reconnecting"), "{log}");
    drop(worker);
    env.cleanup().await;
}

/// A broker that takes the connection but never answers a declaration (RabbitMQ out of file
/// handles does exactly that, silently): the worker gives up within `topology::DECLARE_TIMEOUT` and
/// exits with the reason, instead of sitting cold forever where no health check restarts it.
#[tokio::test(flavor = "multi_thread")]
async fn a_broker_that_never_answers_a_declaration_stops_the_start_with_the_reason() {
    let env = TestEnv::new().await;
    let proxy = TcpProxy::amqp("127.0.0.1:5672").await;
    proxy.hold_from(proxy::QUEUE_DECLARE);
    let via_proxy = proxy.route(env.settings.amqp.urls[0].expose());
    let mut worker = env.spawn_worker("vision", "unanswered", &[("HEIMDEX__AMQP__URL", &via_proxy)]);
    let limit = heimdex_shared::topology::DECLARE_TIMEOUT + Duration::from_secs(30);
    let code = tokio::time::timeout(limit, worker.child.wait()).await;
    let log = worker.log();
    let code = code.unwrap_or_else(|_| panic!("the worker was still starting after {limit:?}: {log}")).expect("wait").code();
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("did not answer the declarations of the queues of prefix"), "{log}");
    assert!(log.contains("File handles"), "the error points at the likely cause: {log}");
    assert!(!log.contains("guest:guest"), "the broker's password is not logged: {log}");
    assert!(!log.contains("models loaded"), "nothing is loaded for a worker that cannot consume: {log}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_redis_workers_work_status_shows_queues_and_jobs_and_state_returns_with_redis() {
    let env = TestEnv::new().await;
    env.add_media("video/silent.mp4", "a.mp4");
    let proxy = TcpProxy::start("127.0.0.1:6379").await;
    proxy.cut();
    let redis = proxy.route(env.settings.redis.url.expose());
    // A fixed health port, since without Redis nobody can look it up.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let health = format!("127.0.0.1:{port}");
    let worker = env.spawn_worker("vision", "no-redis", &[("HEIMDEX__REDIS__URL", &redis), ("HEIMDEX__WORKER__HEALTH_ADDR", &health)]);
    env.wait_for("the worker to be ready without redis", WARM, || async {
        let up = tokio::net::TcpStream::connect(&health).await.is_ok();
        (up && http_get(&health, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    let (_, job) = env.enqueue("a.mp4", TaskKind::Vision, false).await.unwrap();
    env.wait_job(job, "succeeded", TASK).await;

    let (code, stdout, stderr) = env.cli_with(&[("HEIMDEX__REDIS__URL", &redis)], &["status"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("live worker state is unavailable"), "{stdout}");
    assert!(stdout.contains(&env.topology().queue(TaskKind::Vision)) && stdout.contains("succeeded"), "{stdout}");

    proxy.restore();
    let status = env.wait_state(&worker, WorkerState::Warm, TASK).await;
    assert_eq!(status.tasks_done, 1, "{status:?}");
    assert!(worker.log().contains("redis is back"), "{}", worker.log());
    drop(worker);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_a_worker_that_is_still_warming_up() {
    let env = TestEnv::new().await;
    let mut worker = env.spawn_worker("index", "early", &[]);
    env.wait_state(&worker, WorkerState::Warming, WARM).await;
    worker.signal("TERM");
    assert_eq!(worker.wait_exit(Duration::from_secs(60)).await, Some(0), "{}", worker.log());
    let log = worker.log();
    assert!(log.contains("stopping before the worker was warm"), "{log}");
    // The log file is JSON lines (tests/tests/logs.rs): a state change to warming, none to warm.
    assert!(log.contains(r#""to":"warming""#), "{log}");
    assert!(!log.contains(r#""to":"warm""#), "it stopped instead of finishing its warm-up: {log}");
    assert!(env.worker_status("early").await.is_none(), "it left the fleet");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_sigterm_forces_the_exit_and_the_task_is_redone_elsewhere() {
    let env = TestEnv::new().await;
    env.add_long_video("long.mp4");
    let mut worker = env.spawn_worker("vision", "stuck", &[("HEIMDEX__WORKER__SHUTDOWN_TIMEOUT_MS", "600000")]);
    env.wait_state(&worker, WorkerState::Warm, WARM).await;
    let (_, job) = env.enqueue("long.mp4", TaskKind::Vision, false).await.unwrap();
    env.wait_job(job, "running", TASK).await;
    worker.signal("TERM");
    env.wait_state(&worker, WorkerState::Draining, TASK).await;
    worker.signal("TERM");
    assert_eq!(worker.wait_exit(Duration::from_secs(30)).await, Some(130), "{}", worker.log());
    assert_ne!(env.job(job).await.unwrap().status.as_str(), "succeeded", "the drain was cut short");
    let next = env.spawn_worker("vision", "next", &[]);
    env.wait_job(job, "succeeded", TASK).await;
    drop(next);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_playlist_cannot_reach_outside_the_media_root() {
    let env = TestEnv::new().await;
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.wav");
    std::fs::copy(heimdex_tests::bundle_media("speech/goforward.wav"), &secret).unwrap();
    let playlist = format!("#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:3,\nfile:{}\n#EXT-X-ENDLIST\n", secret.display());
    std::fs::write(env.media.path().join("p.m3u8"), playlist).unwrap();
    // The producer refuses it.
    let (code, _, err) = env.cli(&["enqueue", "p.m3u8", "--kind", "index"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not on whitelist") || err.contains("ffprobe cannot read"), "{err}");
    // A message from another service is refused by the worker, and nothing outside is transcribed.
    let worker = env.spawn_worker("index", "fenced", &[]);
    env.wait_state(&worker, WorkerState::Warm, WARM).await;
    let (video, job) = (Uuid::new_v4(), Uuid::new_v4());
    publish_raw(
        &env,
        "index",
        &TaskMessage::new(job, video, TaskKind::Index, "p.m3u8".into(), TaskOptions::default()).to_body(),
        Some(job),
    )
    .await;
    let row = env.wait_job(job, "failed", TASK).await;
    assert!(row.last_error.as_deref().unwrap_or("").contains("ffprobe cannot read"), "{row:?}");
    let segments: i64 = sqlx::query_scalar("SELECT count(*) FROM transcript_segments").fetch_one(&env.pool).await.unwrap();
    assert_eq!(segments, 0);
    drop(worker);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_restart_and_a_stalled_query_are_told_apart() {
    let env = TestEnv::new().await;
    // A server shutting down sends 57P01 to every session: that is "unavailable" (pause, no attempt
    // spent), not a failed task.
    let mut conn = env.pool.acquire().await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *conn).await.unwrap();
    let admin = sqlx::PgPool::connect(heimdex_tests::ADMIN_DB).await.unwrap();
    sqlx::query("SELECT pg_terminate_backend($1)").bind(pid).execute(&admin).await.unwrap();
    let err = sqlx::query("SELECT 1").execute(&mut *conn).await.unwrap_err();
    assert!(heimdex_shared::db::is_unavailable(&err), "{err:?}");
    drop(conn);
    // A query that hangs is cut by the statement timeout and is retryable.
    let mut settings = env.settings.database.clone();
    settings.statement_timeout_ms = 200;
    let pool = heimdex_shared::db::pool(&settings).unwrap();
    let started = std::time::Instant::now();
    let err = sqlx::query("SELECT pg_sleep(30)").execute(&pool).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert_eq!(heimdex_shared::db::disposition(&err), Disposition::Retryable, "{err:?}");
    pool.close().await;
    admin.close().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sixty_jobs_ride_out_two_broker_cuts_a_database_cut_and_a_redis_stop() {
    let mut env = TestEnv::new().await;
    // A broker cut hands tasks in flight to a redelivery, which counts as a death of their run.
    env.settings.worker.max_attempts = 6;
    let (broker, database, redis) =
        (TcpProxy::start("127.0.0.1:5672").await, TcpProxy::start("127.0.0.1:5432").await, TcpProxy::start("127.0.0.1:6379").await);
    let amqp_url = broker.route(env.settings.amqp.urls[0].expose());
    let db_url = database.route(env.settings.database.url.expose());
    let redis_url = redis.route(env.settings.redis.url.expose());
    let via = [
        ("HEIMDEX__AMQP__URL", amqp_url.as_str()),
        ("HEIMDEX__DATABASE__URL", db_url.as_str()),
        ("HEIMDEX__DATABASE__ACQUIRE_TIMEOUT_MS", "500"),
        ("HEIMDEX__REDIS__URL", redis_url.as_str()),
    ];
    let mut workers =
        vec![env.spawn_worker("vision", "v1", &via), env.spawn_worker("vision", "v2", &via), env.spawn_worker("index", "i1", &via)];
    for w in &workers {
        env.wait_state(w, WorkerState::Warm, WARM).await;
    }
    let load = heimdex_tests::enqueue_load(&env, 40, 20).await;
    let started = std::time::Instant::now();
    let done = || heimdex_tests::count_jobs_in(&env, &[heimdex_shared::jobs::JobStatus::Succeeded]);
    let mut faults = Vec::new();
    for (i, (name, proxy)) in [("broker", &broker), ("database", &database), ("redis", &redis), ("broker", &broker)].into_iter().enumerate()
    {
        // Each fault starts once a sixth more of the jobs are done.
        let target = (i + 1) * load.len() / 6;
        env.wait_for(&format!("{target} jobs done before the {name} fault"), TASK, || async { (done().await >= target).then_some(()) })
            .await;
        proxy.cut();
        if name == "broker" {
            for w in &workers {
                env.wait_state(w, WorkerState::Disconnected, TASK).await;
            }
        } else {
            // The outage lasts 2 s (its length, not a wait for anything).
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        proxy.restore();
        faults.push(name);
    }
    env.wait_for("every job done", Duration::from_secs(600), || async { (done().await == load.len()).then_some(()) }).await;
    let deaths = heimdex_tests::assert_load_succeeded(&env, &load).await;
    for w in &mut workers {
        assert!(w.child.try_wait().unwrap().is_none(), "{} exited: {}", w.id, w.log());
        assert_eq!(w.log().matches("models loaded").count(), 1, "{} loaded its models again", w.id);
    }
    assert_eq!(env.queue(&env.topology().dlq(TaskKind::Vision)).await.0 + env.queue(&env.topology().dlq(TaskKind::Index)).await.0, 0);
    eprintln!(
        "outage test: {} jobs through 3 workers in {:.0} s; faults {faults:?}; {deaths} deaths of runs; 0 lost, 0 duplicated, 1 model load per worker",
        load.len(),
        started.elapsed().as_secs_f64()
    );
    env.cleanup().await;
}

/// The broker does not answer the `basic.consume` that resumes consuming after a database outage (a
/// quorum queue without a leader does that; so, to lapin, does a method sent as its connection dies,
/// which once kept a worker paused for good when a broker cut came as it resumed). The worker gives
/// that channel up within `topology::REPLY_TIMEOUT`, consumes on a new one, and the job is done.
#[tokio::test(flavor = "multi_thread")]
async fn a_resume_the_broker_never_answers_costs_a_new_channel_not_the_worker() {
    let env = TestEnv::new().await;
    let (broker, database) = (TcpProxy::amqp("127.0.0.1:5672").await, TcpProxy::start("127.0.0.1:5432").await);
    let amqp_url = broker.route(env.settings.amqp.urls[0].expose());
    let db_url = database.route(env.settings.database.url.expose());
    let worker = env.spawn_worker(
        "vision",
        "unanswered",
        &[("HEIMDEX__AMQP__URL", &amqp_url), ("HEIMDEX__DATABASE__URL", &db_url), ("HEIMDEX__DATABASE__ACQUIRE_TIMEOUT_MS", "500")],
    );
    env.wait_state(&worker, WorkerState::Warm, WARM).await;
    // A task that finds the database gone pauses the worker.
    database.cut();
    env.add_media("video/silent.mp4", "v.mp4");
    let (video, job) = env.enqueue("v.mp4", TaskKind::Vision, false).await.unwrap();
    env.wait_state(&worker, WorkerState::Paused, TASK).await;
    broker.drop_next(proxy::BASIC_CONSUME);
    database.restore();
    let bound = heimdex_shared::topology::REPLY_TIMEOUT + Duration::from_secs(30);
    env.wait_state(&worker, WorkerState::Disconnected, bound).await;
    env.wait_state(&worker, WorkerState::Warm, TASK).await;
    let row = env.wait_job(job, "succeeded", TASK).await;
    let frames = env.count("SELECT count(*) FROM frames WHERE video_id = $1", video).await;
    assert_eq!(row.summary.unwrap()["frames"].as_i64(), Some(frames), "one set of results");
    assert!(worker.log().contains("did not answer"), "the log says why the channel was given up: {}", worker.log());
    drop(worker);
    env.cleanup().await;
}

/// Unacked deliveries of a queue, as the broker counts them.
fn unacked(queue: &str) -> u64 {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "--no-table-headers", "name", "messages_unacknowledged"])
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(char::is_whitespace))
        .find(|(name, _)| *name == queue)
        .and_then(|(_, n)| n.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_pause_the_tasks_still_running_count_against_the_prefetch() {
    after_a_pause_the_tasks_still_running_count(QueueType::Quorum).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_pause_the_tasks_still_running_count_against_the_channel_prefetch_of_classic_queues() {
    after_a_pause_the_tasks_still_running_count(QueueType::Classic).await;
}

/// Classic queues: one prefetch for the channel. Quorum queues refuse that, and the worker's
/// consumers split the concurrency (runtime/consume.rs): the resumed one takes what the tasks from
/// before leave free, and a second one the rest once they are done.
async fn after_a_pause_the_tasks_still_running_count(queue_type: QueueType) {
    let env = TestEnv::with_queue_type(queue_type).await;
    let database = TcpProxy::start("127.0.0.1:5432").await;
    let db_url = database.route(env.settings.database.url.expose());
    let worker = env.spawn_worker("vision", "prefetch", &[("HEIMDEX__DATABASE__URL", &db_url), ("HEIMDEX__WORKER__CONCURRENCY", "3")]);
    env.wait_state(&worker, WorkerState::Warm, WARM).await;
    let mut jobs = Vec::new();
    for i in 0..2 {
        env.add_long_video(&format!("long{i}.mp4"));
        jobs.push(env.enqueue(&format!("long{i}.mp4"), TaskKind::Vision, false).await.unwrap().1);
    }
    for &job in &jobs {
        env.wait_job(job, "running", TASK).await;
    }
    // The third task finds the database gone: the worker pauses while the two long ones run on.
    database.cut();
    for i in 0..4 {
        env.add_media("video/silent.mp4", &format!("short{i}.mp4"));
        jobs.push(env.enqueue(&format!("short{i}.mp4"), TaskKind::Vision, false).await.unwrap().1);
    }
    env.wait_state(&worker, WorkerState::Paused, TASK).await;
    database.restore();
    env.wait_state(&worker, WorkerState::Warm, TASK).await;

    // Resumed with two tasks still in flight: at most one more delivery may be outstanding.
    let queue = env.topology().queue(TaskKind::Vision);
    let (mut most, mut samples) = (0, 0);
    loop {
        most = most.max(unacked(&queue));
        samples += 1;
        let mut long_running = 0;
        for &job in &jobs[..2] {
            long_running += usize::from(env.job(job).await.is_some_and(|j| j.status.as_str() == "running"));
        }
        if long_running < 2 {
            break;
        }
    }
    assert!(most <= 3, "{most} deliveries unacked with a concurrency of 3 ({samples} samples)");
    for &job in &jobs {
        env.wait_job(job, "succeeded", TASK).await;
    }
    if queue_type == QueueType::Quorum {
        // The long tasks are done: a second consumer took up their share of the concurrency.
        env.wait_for("a second consumer", TASK, || async { (env.queue(&queue).await.1 == 2).then_some(()) }).await;
    }
    drop(worker);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_a_worker_that_is_reconnecting_or_paused() {
    let env = TestEnv::new().await;
    let (broker, database) = (TcpProxy::start("127.0.0.1:5672").await, TcpProxy::start("127.0.0.1:5432").await);
    let amqp_url = broker.route(env.settings.amqp.urls[0].expose());
    let db_url = database.route(env.settings.database.url.expose());

    // Reconnecting: the broker is gone and stays gone.
    let mut reconnecting = env.spawn_worker("vision", "reconnecting", &[("HEIMDEX__AMQP__URL", &amqp_url)]);
    env.wait_state(&reconnecting, WorkerState::Warm, WARM).await;
    broker.cut();
    env.wait_state(&reconnecting, WorkerState::Disconnected, TASK).await;
    reconnecting.signal("TERM");
    assert_eq!(reconnecting.wait_exit(Duration::from_secs(15)).await, Some(0), "{}", reconnecting.log());

    // Paused: the database is gone and stays gone; the task that found it gone goes back to the queue.
    let mut paused = env.spawn_worker("vision", "paused", &[("HEIMDEX__DATABASE__URL", &db_url)]);
    env.wait_state(&paused, WorkerState::Warm, WARM).await;
    database.cut();
    env.add_media("video/silent.mp4", "silent.mp4");
    let (_, job) = env.enqueue("silent.mp4", TaskKind::Vision, false).await.unwrap();
    env.wait_state(&paused, WorkerState::Paused, TASK).await;
    paused.signal("TERM");
    assert_eq!(paused.wait_exit(Duration::from_secs(15)).await, Some(0), "{}", paused.log());
    let queue = env.topology().queue(TaskKind::Vision);
    assert_eq!(env.queue(&queue).await, (1, 0), "the task waits in the queue for the next worker");
    assert_eq!(env.job(job).await.unwrap().attempts, 0, "its attempt was given back");
    env.cleanup().await;
}
