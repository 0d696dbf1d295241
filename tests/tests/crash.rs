//! Crash test: 60 jobs (index and vision) through 3 workers while workers are SIGKILLed at random
//! and restarted (as a restart policy would), with a poison message and a video that kills every
//! worker that touches it in the stream. Every good job must end `succeeded` with exactly one result
//! set; the poison message and the killer video must end in the DLQ with their reasons.

use std::time::{Duration, Instant};

use heimdex_producer::{EnqueueRequest, Producer};
use heimdex_shared::contract::{TaskKind, TaskMessage, TaskOptions};
use heimdex_shared::fleet::WorkerState;
use heimdex_shared::jobs::JobStatus;
use heimdex_tests::{TestEnv, WorkerProcess, drain_dlq, publish_raw, words_found};
use uuid::Uuid;

const VISION_JOBS: usize = 40;
const INDEX_JOBS: usize = 20;
const RANDOM_KILLS: usize = 8;
const DEADLINE: Duration = Duration::from_secs(600);

/// A random number below `n` (no seed to manage: every run kills differently, and says so).
fn pick(n: usize) -> usize {
    (Uuid::new_v4().as_u128() % n as u128) as usize
}

struct Slot {
    kind: &'static str,
    worker: WorkerProcess,
    restarts: usize,
}

#[tokio::test(flavor = "multi_thread")]
async fn sixty_jobs_survive_random_sigkills_a_poison_message_and_a_killer_video() {
    let mut env = TestEnv::new().await;
    env.settings.worker.max_attempts = 6;
    let clips = heimdex_tests::speech_clips();
    let mut expected_words = Vec::new();
    for i in 0..VISION_JOBS {
        env.add_media("video/silent.mp4", &format!("v{i:02}.mp4"));
    }
    for i in 0..INDEX_JOBS {
        let (file, reference) = &clips[i % clips.len()];
        env.add_media(&format!("speech/{file}"), &format!("a{i:02}.wav"));
        expected_words.push(reference.clone());
    }
    env.add_media("video/silent.mp4", "killer.mp4");

    let failpoint = [("HEIMDEX__WORKER__FAILPOINT", "crash_on:killer")];
    let spawn = |kind: &'static str, n: usize| env.spawn_worker(kind, &format!("{kind}-{n}"), &failpoint);
    let mut slots = vec![
        Slot { kind: "vision", worker: spawn("vision", 0), restarts: 0 },
        Slot { kind: "vision", worker: spawn("vision", 1), restarts: 0 },
        Slot { kind: "index", worker: spawn("index", 2), restarts: 0 },
    ];
    for slot in &slots {
        env.wait_state(&slot.worker, WorkerState::Warm, Duration::from_secs(180)).await;
    }

    let producer = Producer::connect(&env.settings).await.unwrap();
    let mut good = Vec::new();
    let enqueue = |name: String, kind: TaskKind| {
        let producer = &producer;
        async move {
            let mut req = EnqueueRequest::all(name);
            req.kinds = vec![kind];
            let e = producer.enqueue(&req).await.unwrap();
            (e.video_id, e.jobs[0].job_id)
        }
    };
    for i in 0..VISION_JOBS.max(INDEX_JOBS) {
        if i < VISION_JOBS {
            good.push((TaskKind::Vision, enqueue(format!("v{i:02}.mp4"), TaskKind::Vision).await, i));
        }
        if i < INDEX_JOBS {
            good.push((TaskKind::Index, enqueue(format!("a{i:02}.wav"), TaskKind::Index).await, i));
        }
        if i == 10 {
            let (_, killer) = enqueue("killer.mp4".into(), TaskKind::Vision).await;
            good.push((TaskKind::Vision, (Uuid::nil(), killer), usize::MAX));
        }
        if i == 20 {
            let mut poison = serde_json::to_value(TaskMessage::new(Uuid::new_v4(), Uuid::new_v4(), TaskKind::Vision, "v00.mp4".into(), TaskOptions::default())).unwrap();
            poison["p".repeat(200_000)] = 1.into();
            publish_raw(&env, "vision", &serde_json::to_vec(&poison).unwrap(), Some(Uuid::new_v4())).await;
        }
    }
    let killer = good.iter().find(|g| g.2 == usize::MAX).map(|g| (g.1).1).unwrap();
    good.retain(|g| g.2 != usize::MAX);

    // Chaos: a random worker is SIGKILLed every 2–4 s (the index worker at most twice, since it takes
    // seconds to warm up again); any worker that died (the killer video) is restarted at once.
    let started = Instant::now();
    let (mut kills, mut index_kills, mut next_kill) = (0, 0, Instant::now() + Duration::from_secs(2));
    let mut spawned = slots.len();
    loop {
        for slot in &mut slots {
            if slot.worker.child.try_wait().unwrap().is_some() {
                slot.worker = spawn(slot.kind, spawned);
                spawned += 1;
                slot.restarts += 1;
            }
        }
        let done = heimdex_tests::count_jobs_in(&env, &[JobStatus::Succeeded, JobStatus::Failed, JobStatus::Dead]).await;
        if done == good.len() + 1 {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "only {done} of {} jobs ended after {DEADLINE:?}", good.len() + 1);
        if kills < RANDOM_KILLS && Instant::now() >= next_kill {
            let victim = pick(slots.len());
            let slot = &mut slots[victim];
            if slot.kind != "index" || index_kills < 2 {
                slot.worker.signal("KILL");
                let _ = slot.worker.wait_exit(Duration::from_secs(10)).await;
                kills += 1;
                index_kills += usize::from(slot.kind == "index");
            }
            next_kill = Instant::now() + Duration::from_millis(2_000 + pick(2_000) as u64);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();

    // Every good job succeeded, with exactly one result set.
    let mut deaths = 0;
    for (kind, (video, job), i) in &good {
        let row = env.job(*job).await.unwrap();
        assert_eq!(row.status, JobStatus::Succeeded, "{kind} job {i}: {row:?}");
        deaths += row.deaths;
        let summary = row.summary.clone().unwrap();
        match kind {
            TaskKind::Vision => {
                let frames = env.count("SELECT count(*) FROM frames WHERE video_id = $1", *video).await;
                assert!(frames > 0 && summary["frames"].as_i64() == Some(frames), "vision {i}: {frames} rows, {summary}");
            }
            TaskKind::Index => {
                let texts: Vec<String> = sqlx::query_scalar("SELECT text FROM transcript_segments WHERE video_id = $1 ORDER BY idx")
                    .bind(video)
                    .fetch_all(&env.pool)
                    .await
                    .unwrap();
                assert_eq!(summary["segments"].as_u64(), Some(texts.len() as u64), "index {i}: {summary}");
                let found = words_found(&expected_words[*i], &texts.join(" "));
                // Digits ("10" for "ten") make up the rest; word accuracy is the index tests' business.
                assert!(found >= 0.6, "index {i}: {:.0} % of the reference's words: {texts:?}", found * 100.0);
            }
        }
    }
    // The killer video is dead after max_attempts deaths; it and the poison message are in the DLQ.
    let row = env.job(killer).await.unwrap();
    assert_eq!(row.status, JobStatus::Dead, "{row:?}");
    assert!(row.last_error.as_deref().unwrap_or("").contains("the worker died 6 times"), "{row:?}");
    let dlq = env.topology().dlq(TaskKind::Vision);
    heimdex_tests::wait_for("both dead letters", Duration::from_secs(60), || async { (env.queue(&dlq).await.0 == 2).then_some(()) }).await;
    let letters = drain_dlq(&env, &dlq).await;
    assert!(letters.iter().any(|(id, r)| id.as_deref() == Some(&killer.to_string()) && r.contains("the worker died")), "{letters:?}");
    assert!(letters.iter().any(|(_, r)| r.contains("over the contract's limit")), "{letters:?}");
    assert_eq!(env.queue(&env.topology().dlq(TaskKind::Index)).await.0, 0);
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&env.pool).await.unwrap();
    assert_eq!(jobs as usize, good.len() + 1, "no job lost, none made up");
    let restarts: usize = slots.iter().map(|s| s.restarts).sum();
    eprintln!(
        "crash test: {} jobs + killer + poison through 3 workers in {:.0} s; {kills} random SIGKILLs ({index_kills} of worker-index), \
         {restarts} restarts in all, {deaths} deaths of good jobs' runs; 0 jobs lost, 0 duplicated",
        good.len(),
        elapsed.as_secs_f64()
    );
    env.cleanup().await;
}
