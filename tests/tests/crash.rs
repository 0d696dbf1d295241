//! Crash test: 60 jobs (index and vision) through 3 workers while workers are SIGKILLed at random
//! and restarted (as a restart policy would), with a poison message and a video that kills every
//! worker that touches it in the stream. Every good job must end `succeeded` with exactly one result
//! set; the poison message and the killer video must end in the DLQ with their reasons.

use std::time::{Duration, Instant};

use heimdex_producer::{EnqueueRequest, Producer};
use heimdex_shared::contract::{TaskKind, TaskMessage, TaskOptions};
use heimdex_shared::fleet::WorkerState;
use heimdex_shared::jobs::JobStatus;
use heimdex_tests::{TestEnv, WorkerProcess, drain_dlq, publish_raw};
use uuid::Uuid;

const RANDOM_KILLS: usize = 8;

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
    // Its own deadline, under the 600 s that .config/nextest.toml gives this test.
    let mut env = TestEnv::with_budget(Duration::from_secs(560)).await;
    env.settings.worker.max_attempts = 6;
    env.add_media("video/silent.mp4", "killer.mp4");
    let failpoint = [("HEIMDEX__WORKER__FAILPOINT", "crash_on:killer")];
    let spawn = |kind: &'static str, n: usize| env.spawn_worker(kind, &format!("{kind}-{n}"), &failpoint);
    let mut slots = vec![
        Slot { kind: "vision", worker: spawn("vision", 0), restarts: 0 },
        Slot { kind: "vision", worker: spawn("vision", 1), restarts: 0 },
        Slot { kind: "index", worker: spawn("index", 2), restarts: 0 },
    ];
    let test_started = Instant::now();
    for slot in &slots {
        env.wait_state(&slot.worker, WorkerState::Warm, Duration::from_secs(180)).await;
    }
    let warm_s = test_started.elapsed().as_secs_f64();

    let load = heimdex_tests::enqueue_load(&env, 40, 20).await;
    let mut req = EnqueueRequest::all("killer.mp4");
    req.kinds = vec![TaskKind::Vision];
    let killer = Producer::connect(&env.settings).await.unwrap().enqueue(&req).await.unwrap().jobs[0].job_id;
    let mut poison =
        serde_json::to_value(TaskMessage::new(Uuid::new_v4(), Uuid::new_v4(), TaskKind::Vision, "v00.mp4".into(), TaskOptions::default()))
            .unwrap();
    poison["p".repeat(200_000)] = 1.into();
    let poison_id = Uuid::new_v4();
    publish_raw(&env, "vision", &serde_json::to_vec(&poison).unwrap(), Some(poison_id)).await;
    let enqueue_s = test_started.elapsed().as_secs_f64() - warm_s;

    let dlq = env.topology().dlq(TaskKind::Vision);
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
        // Done when every job ended and both letters are in: a worker killed between marking the
        // killer dead and dead-lettering it leaves that to whichever worker (restarted here) gets it
        // next. At least two: a worker killed between publishing a letter and acking its message
        // publishes it again (dead-lettering is at least once), which the checks below name.
        let done = heimdex_tests::count_jobs_in(&env, &[JobStatus::Succeeded, JobStatus::Failed, JobStatus::Dead]).await;
        let letters = env.queue(&dlq).await.0;
        if done == load.len() + 1 && letters >= 2 {
            break;
        }
        if tokio::time::Instant::now() >= env.deadline {
            panic!(
                "only {done} of {} jobs ended and {letters} of 2 dead letters in after {:?}; {kills} kills\n{}",
                load.len() + 1,
                started.elapsed(),
                env.report().await
            );
        }
        if kills < RANDOM_KILLS && Instant::now() >= next_kill {
            let slot = &mut slots[pick(3)];
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

    let deaths = heimdex_tests::assert_load_succeeded(&env, &load).await;
    // The killer video is dead after max_attempts deaths; it and the poison message are in the DLQ.
    let row = env.job(killer).await.unwrap();
    assert_eq!(row.status, JobStatus::Dead, "{row:?}");
    assert!(row.last_error.as_deref().unwrap_or("").contains("the worker died 6 times"), "{row:?}");
    let letters = drain_dlq(&env, &dlq).await;
    let (killer_id, poison_id) = (killer.to_string(), poison_id.to_string());
    for (id, reason) in &letters {
        match id.as_deref() {
            Some(id) if id == killer_id => assert!(reason.contains("the worker died"), "{letters:?}"),
            Some(id) if id == poison_id => assert!(reason.contains("over the contract's limit"), "{letters:?}"),
            _ => panic!("a letter of neither the killer nor the poison message: {letters:?}"),
        }
    }
    let copies = |wanted: &str| letters.iter().filter(|(id, _)| id.as_deref() == Some(wanted)).count();
    assert!(copies(&killer_id) >= 1 && copies(&poison_id) >= 1, "{letters:?}");
    assert_eq!(env.queue(&env.topology().dlq(TaskKind::Index)).await.0, 0);
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&env.pool).await.unwrap();
    assert_eq!(jobs as usize, load.len() + 1, "no job lost, none made up");
    let restarts: usize = slots.iter().map(|s| s.restarts).sum();
    eprintln!(
        "crash test: 3 workers warm in {warm_s:.0} s, {} jobs + killer + poison enqueued in {enqueue_s:.0} s, all ended in {:.0} s; \
         {kills} random SIGKILLs ({index_kills} of worker-index), {restarts} restarts in all, {deaths} deaths of good jobs' runs, \
         {} dead letters; 0 jobs lost, 0 results duplicated",
        load.len(),
        elapsed.as_secs_f64(),
        letters.len()
    );
    env.cleanup().await;
}
