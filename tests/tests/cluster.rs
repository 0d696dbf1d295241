//! Past one broker (issue 27): quorum queues on a real three-node RabbitMQ cluster on loopback
//! (tests/src/cluster.rs), a node lost mid-run, nothing lost.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use heimdex_shared::contract::TaskKind;
use heimdex_shared::fleet::WorkerState;
use heimdex_shared::jobs::JobStatus;
use heimdex_shared::topology;
use heimdex_tests::cluster::Cluster;
use heimdex_tests::{LoadJob, TestEnv};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

const WARM: Duration = Duration::from_secs(180);
const TASK: Duration = Duration::from_secs(240);
const JOBS: usize = 60;

/// Ready messages in `queue`, asked of whichever node of the cluster answers.
async fn ready(env: &TestEnv, queue: &str) -> u32 {
    let (connection, channel) = topology::connect(&env.settings.amqp, "heimdex-tests-look").await.expect("a node answers");
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let q = channel.queue_declare(queue.into(), passive, FieldTable::default()).await.expect("queue exists");
    let _ = connection.close(200, "".into()).await;
    q.message_count()
}

/// `n` vision jobs, each of a copy of the bundle's 25 s `sample.mp4` (25 frames, faces in two
/// scenes): about a second of work each on this machine, so that the run lasts long enough to lose
/// a node in the middle of it.
async fn enqueue_videos(env: &TestEnv, n: usize) -> Vec<LoadJob> {
    let producer = heimdex_producer::Producer::connect(&env.settings).await.expect("producer");
    let mut load = Vec::new();
    for i in 0..n {
        let name = format!("s{i:02}.mp4");
        env.add_media("video/sample.mp4", &name);
        let mut req = heimdex_producer::EnqueueRequest::all(name);
        req.kinds = vec![TaskKind::Vision];
        let e = producer.enqueue(&req).await.expect("enqueue");
        load.push(LoadJob { kind: TaskKind::Vision, video: e.video_id, job: e.jobs[0].job_id, reference: None });
    }
    load
}

#[tokio::test(flavor = "multi_thread")]
async fn sixty_jobs_ride_out_the_loss_of_the_node_that_leads_their_queue() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(Duration::from_secs(120))).await.expect("cluster");
    let mut env = TestEnv::on_brokers(&cluster.urls_from(0)).await;
    // The lost node hands the deliveries in flight on it to a redelivery, which counts as a death.
    env.settings.worker.max_attempts = 6;
    let queue = env.topology().queue(TaskKind::Vision);
    let (leader, online) = cluster.leader(0, &queue).expect("the work queue is a quorum queue with a leader");
    assert_eq!(online.matches("@localhost").count(), 3, "replicated on the three nodes: {online}");
    let follower = (leader + 1) % 3;
    // q1 prefers the leader's node and loses its connection with it; q2 prefers a follower's and
    // only sees the queue's leader move.
    let workers = [
        env.spawn_worker("vision", "q1", &[("HEIMDEX__AMQP__URLS", &cluster.urls_from(leader))]),
        env.spawn_worker("vision", "q2", &[("HEIMDEX__AMQP__URLS", &cluster.urls_from(follower))]),
    ];
    for w in &workers {
        env.wait_state(w, WorkerState::Warm, WARM).await;
    }
    let started = Instant::now();
    let load = enqueue_videos(&env, JOBS).await;
    let done = || heimdex_tests::count_jobs_in(&env, &[JobStatus::Succeeded]);
    env.wait_for(&format!("{} jobs done before the node is lost", JOBS / 3), TASK, || async { (done().await >= JOBS / 3).then_some(()) })
        .await;

    let done_at_loss = done().await;
    let lost_at = Utc::now();
    let lost_node = cluster.nodes[leader].name.clone();
    tokio::task::block_in_place(|| cluster.ctl_ok(leader, &["stop_app"]));
    let (new_leader, _) = env
        .wait_for("a new leader of the work queue", TASK, || async {
            tokio::task::block_in_place(|| cluster.leader(follower, &queue)).filter(|(l, _)| *l != leader)
        })
        .await;
    env.wait_for("every job done", TASK, || async { (done().await == JOBS).then_some(()) }).await;
    let took = started.elapsed();

    // Nothing lost, nothing done twice, nothing dead-lettered.
    let deaths = heimdex_tests::assert_load_succeeded(&env, &load).await;
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&env.pool).await.unwrap();
    assert_eq!(jobs as usize, JOBS, "one job per video");
    let duplicated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT j.id FROM jobs j JOIN frames f ON f.video_id = j.video_id
          GROUP BY j.id HAVING count(*) <> max((j.summary->>'frames')::bigint)) d",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(duplicated, 0, "a job whose frames are not its one result set");
    let lost = JOBS - heimdex_tests::count_jobs_in(&env, &[JobStatus::Succeeded]).await;
    assert_eq!(ready(&env, &env.topology().dlq(TaskKind::Vision)).await, 0, "nothing dead-lettered");
    assert_eq!(ready(&env, &queue).await, 0, "nothing left behind");

    // The workers rode it out warm: one model load each, and q1 reconnected to another node.
    let mut loads = Vec::new();
    for w in &workers {
        let log = w.log();
        assert_eq!(env.worker_status(&w.id).await.map(|s| s.state), Some(WorkerState::Warm), "{} is warm: {log}", w.id);
        loads.push(log.matches("models loaded").count());
        assert_eq!(loads.last(), Some(&1), "{} loaded its models again: {log}", w.id);
    }
    assert!(workers[0].log().contains("lost the broker: reconnecting"), "q1 lost its node: {}", workers[0].log());
    let q2_reconnected = workers[1].log().contains("lost the broker: reconnecting");

    // The pause: the longest wait for the next finished job after the loss (finish times in the
    // database), against the usual gap between two finished jobs before it.
    let finished: Vec<DateTime<Utc>> = sqlx::query_scalar("SELECT finished_at FROM jobs WHERE status = 'succeeded' ORDER BY finished_at")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    let (before, after): (Vec<DateTime<Utc>>, Vec<DateTime<Utc>>) = finished.iter().partition(|t| **t < lost_at);
    let mut gaps_before: Vec<f64> = before.windows(2).map(|w| (w[1] - w[0]).as_seconds_f64()).collect();
    gaps_before.sort_by(f64::total_cmp);
    let usual = gaps_before.get(gaps_before.len() / 2).copied().unwrap_or(0.0);
    let mut last = lost_at;
    let mut pause = 0.0_f64;
    for t in after {
        pause = pause.max((t - last).as_seconds_f64());
        last = t;
    }

    // The node comes back and rejoins: the queue is on three nodes again.
    tokio::task::block_in_place(|| cluster.ctl_ok(leader, &["start_app"]));
    env.wait_for("the lost node back among the queue's members", TASK, || async {
        let (_, online) = tokio::task::block_in_place(|| cluster.leader(follower, &queue))?;
        online.contains(&lost_node).then_some(())
    })
    .await;

    eprintln!("| load | node lost | pause | lost | duplicated | model loads |");
    eprintln!("|---|---|---|---|---|---|");
    eprintln!(
        "| {JOBS} vision jobs, 2 workers, {:.0} s | {lost_node} (leader; {done_at_loss} done; new leader {}) | {pause:.1} s (usual gap {usual:.1} s) | {lost} | {duplicated} | {loads:?} |",
        took.as_secs_f64(),
        cluster.nodes[new_leader].name
    );
    eprintln!(
        "deaths of runs: {deaths} (deliveries in flight on the lost node, redelivered); q1 reconnected to another node, \
         q2 (on a follower) {}; the node rejoined",
        if q2_reconnected { "reconnected too" } else { "kept its connection and consumer" }
    );
    drop(workers);
    env.cleanup().await;
    drop(cluster);
}

/// (type, arguments) of every queue of `prefix` on the local broker, by name.
fn local_queues(prefix: &str) -> Vec<(String, String, String)> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "--no-table-headers", "name", "type", "arguments"])
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(&format!("{prefix}.")))
        .filter_map(|l| {
            let mut f = l.splitn(3, '\t');
            Some((f.next()?.to_string(), f.next()?.to_string(), f.next().unwrap_or_default().to_string()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn work_retry_and_dead_letter_queues_are_quorum_and_query_queues_classic() {
    let env = TestEnv::new().await;
    let queues = local_queues(&env.settings.amqp.prefix);
    let topology = env.topology();
    let kind = TaskKind::Vision;
    let of = |name: &str| queues.iter().find(|q| q.0 == name).unwrap_or_else(|| panic!("{name} declared: {queues:?}")).clone();
    let work = of(&topology.queue(kind));
    assert_eq!(work.1, "quorum", "{work:?}");
    for arg in ["x-delivery-limit", "100", "x-dead-letter-strategy", "at-least-once", "reject-publish"] {
        assert!(work.2.contains(arg), "{arg} on the work queue: {work:?}");
    }
    assert_eq!(of(&topology.dlq(kind)).1, "quorum");
    let retry = of(&topology.retry_queue(kind, heimdex_shared::topology::Topology::backoff_ms(&env.settings.worker, 1)));
    assert!(retry.1 == "quorum" && retry.2.contains("x-message-ttl") && retry.2.contains("at-least-once"), "{retry:?}");
    assert_eq!(of(&topology.query_queue(kind)).1, "classic", "a transient queue cannot be a quorum queue");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_finds_queues_of_the_other_type_stops_at_start_and_names_them() {
    let env = TestEnv::with_queue_type(heimdex_shared::config::QueueType::Classic).await;
    let mut worker = env.spawn_worker("vision", "other-type", &[("HEIMDEX__AMQP__QUEUE_TYPE", "quorum")]);
    let code = worker.wait_exit(Duration::from_secs(60)).await;
    let log = worker.log();
    assert_ne!(code, Some(0), "{log}");
    assert!(log.contains("exists as a classic queue but amqp.queue_type is quorum"), "{log}");
    assert!(log.contains(&env.settings.amqp.prefix) && log.contains("Moving an existing classic deployment over"), "{log}");
    assert!(!log.contains("models loaded"), "it stopped before loading models: {log}");
    // The classic queues are as they were: a classic worker still runs on them.
    let classic = env.spawn_worker("vision", "classic", &[]);
    env.wait_state(&classic, WorkerState::Warm, WARM).await;
    drop(classic);
    env.cleanup().await;
}
