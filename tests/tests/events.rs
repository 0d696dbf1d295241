//! Job events and the caller's ids: every move of a job into `succeeded`, `failed` or `dead` writes
//! exactly one event in the transaction that moves it (none for a rollback, none for a write that
//! leaves the state as it was), tells `LISTEN heimdex_jobs` at commit, and reaches the
//! `{prefix}.events` exchange through the relay with the caller's `external_id` and `metadata`, which
//! the API, the CLI and the Python example give and get back.

use std::time::{Duration, Instant};

use futures::StreamExt;
use heimdex_shared::contract::{Metadata, TaskKind, TaskMessage, TaskOptions};
use heimdex_shared::events::{self, JobEvent, NOTIFY_CHANNEL};
use heimdex_shared::fleet::WorkerState;
use heimdex_shared::jobs::{self, FencedRun, JobStatus, Start};
use heimdex_shared::outbox;
use heimdex_tests::{TestEnv, http, publish_raw};
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use sqlx::postgres::PgListener;
use uuid::Uuid;

const WARM: Duration = Duration::from_secs(120);
const TASK: Duration = Duration::from_secs(200);

/// A delivery from the events exchange: routing key, `message_id`, the body as JSON and as an event.
struct Received {
    routing_key: String,
    message_id: Option<String>,
    body: Value,
    event: JobEvent,
}

/// A private queue bound to the events exchange with `pattern`, consumed without acks.
async fn subscribe(env: &TestEnv, pattern: &str) -> lapin::Consumer {
    let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
    let queue = env.channel.queue_declare("".into(), options, FieldTable::default()).await.expect("declare");
    let exchange = env.topology().events_exchange();
    env.channel
        .queue_bind(
            queue.name().as_str().into(),
            exchange.as_str().into(),
            pattern.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let consume = BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() };
    let tag = format!("events-{}", Uuid::new_v4().simple());
    env.channel.basic_consume(queue.name().as_str().into(), tag.as_str().into(), consume, FieldTable::default()).await.expect("consume")
}

/// The next event on `consumer`, within `timeout` and the test's deadline.
async fn next_event(env: &TestEnv, consumer: &mut lapin::Consumer, timeout: Duration, what: &str) -> Received {
    let until = (tokio::time::Instant::now() + timeout).min(env.deadline);
    let delivery = match tokio::time::timeout_at(until, consumer.next()).await {
        Ok(Some(Ok(d))) => d,
        Ok(other) => panic!("the events consumer ended ({other:?}) waiting for {what}"),
        Err(_) => panic!("no event within {timeout:?} waiting for {what}\n{}", env.report().await),
    };
    let body: Value = serde_json::from_slice(&delivery.data).expect("an event is JSON");
    let event: JobEvent = serde_json::from_value(body.clone()).unwrap_or_else(|e| panic!("not a JobEvent ({e}): {body}"));
    Received {
        routing_key: delivery.routing_key.as_str().to_string(),
        message_id: delivery.properties.message_id().as_ref().map(|m| m.as_str().to_string()),
        body,
        event,
    }
}

/// A subscriber that takes events in any order: those of other jobs wait for their turn.
struct Events {
    consumer: lapin::Consumer,
    early: Vec<Received>,
}

impl Events {
    /// The event of `job`, whether it came already or comes within `timeout`.
    async fn of(&mut self, env: &TestEnv, job: Uuid, timeout: Duration) -> Received {
        if let Some(at) = self.early.iter().position(|r| r.event.job_id == job) {
            return self.early.remove(at);
        }
        loop {
            let received = next_event(env, &mut self.consumer, timeout, &format!("the event of job {job}")).await;
            if received.event.job_id == job {
                return received;
            }
            self.early.push(received);
        }
    }
}

fn object(value: Value) -> Metadata {
    value.as_object().expect("a JSON object").clone()
}

fn message(kind: TaskKind, uri: &str, external_id: Option<&str>, metadata: Option<Value>) -> TaskMessage {
    let mut msg = TaskMessage::new(Uuid::new_v4(), Uuid::new_v4(), kind, uri.into(), TaskOptions::default());
    msg.external_id = external_id.map(String::from);
    msg.metadata = metadata.map(object);
    msg
}

async fn run(env: &TestEnv, msg: &TaskMessage, redelivered: bool, max_attempts: u32) -> jobs::Run {
    match jobs::start_run(&env.pool, msg, "w", redelivered, max_attempts).await.expect("start_run") {
        Start::Run(run) => run,
        other => panic!("expected a run of {}, got {other:?}", msg.media_uri),
    }
}

async fn succeed(env: &TestEnv, run: &jobs::Run, summary: &Value, commit: bool) {
    let mut tx = FencedRun::new(env.pool.clone(), *run).begin().await.expect("begin").expect("the run holds its job");
    jobs::finish_success(&mut tx, run, &json!({ "persist": 1 }), summary).await.expect("finish");
    if commit {
        tx.commit().await.expect("commit");
    } else {
        tx.rollback().await.expect("rollback");
    }
}

/// The (job, status) of every event waiting in the outbox, oldest first.
async fn outbox_events(env: &TestEnv) -> Vec<(Uuid, String)> {
    sqlx::query_as("SELECT job_id, body->>'status' FROM event_outbox ORDER BY seq").fetch_all(&env.pool).await.expect("event_outbox")
}

fn schema_fields() -> Vec<String> {
    let mut fields: Vec<String> = events::json_schema()["properties"].as_object().expect("properties").keys().cloned().collect();
    fields.sort();
    fields
}

/// Every path that ends a job, driven through the library against the real database, and the
/// relay publishing what they wrote to the real broker.
#[tokio::test(flavor = "multi_thread")]
async fn every_final_state_writes_one_event_in_its_transaction() {
    let env = TestEnv::new().await;
    let mut consumer = subscribe(&env, "#").await;
    let mut listener = PgListener::connect_with(&env.pool).await.expect("listener");
    listener.listen(NOTIFY_CHANNEL).await.expect("listen");
    let mut expected: Vec<(Uuid, &str)> = Vec::new();

    // 1. A foreign message with the caller's fields: a retry ends nothing, a permanent failure does;
    //    writing the same final state again is no transition.
    let a = message(TaskKind::Index, "a.wav", Some("caller-a"), Some(json!({ "order": 1, "tags": ["x"] })));
    let first = run(&env, &a, false, 5).await;
    assert!(jobs::record_failure(&env.pool, &first, JobStatus::Retrying, "timed out", "w", &json!({})).await.unwrap());
    assert_eq!(outbox_events(&env).await, [], "retrying is not a final state");
    let second = run(&env, &a, false, 5).await;
    assert!(jobs::record_failure(&env.pool, &second, JobStatus::Failed, "a.wav has no audio track", "w", &json!({})).await.unwrap());
    expected.push((first.job_id, "failed"));
    sqlx::query("UPDATE jobs SET status = 'failed', last_error = 'again' WHERE id = $1")
        .bind(first.job_id)
        .execute(&env.pool)
        .await
        .unwrap();
    assert_eq!(outbox_events(&env).await, [(first.job_id, "failed".to_string())]);

    // 2. A newer enqueue of that job (another external id): a rolled-back success writes nothing, a
    //    committed one writes its event with the summary and the latest enqueue's caller fields.
    let mut newer = a.clone();
    newer.enqueued_at += chrono::TimeDelta::seconds(1);
    newer.external_id = Some("caller-a2".into());
    newer.metadata = None;
    let third = run(&env, &newer, false, 5).await;
    assert_eq!(third.job_id, first.job_id);
    succeed(&env, &third, &json!({ "segments": 2 }), false).await;
    assert_eq!(outbox_events(&env).await.len(), 1, "a rolled-back success sends nothing");
    succeed(&env, &third, &json!({ "segments": 2 }), true).await;
    expected.push((first.job_id, "succeeded"));

    // 3. A job whose worker died on it until it ran out of attempts: `dead` from start_run.
    let b = message(TaskKind::Vision, "b.mp4", Some("caller-b"), None);
    let died = run(&env, &b, false, 1).await;
    let verdict = jobs::start_run(&env.pool, &b, "w", true, 1).await.unwrap();
    assert!(matches!(&verdict, Start::DeadLetter { reason, .. } if reason.contains("the worker died 1 times")), "{verdict:?}");
    expected.push((died.job_id, "dead"));

    // 4. Out of attempts after retryable failures: `dead` from record_failure.
    let e = message(TaskKind::Vision, "e.mp4", None, None);
    let last = run(&env, &e, false, 5).await;
    assert!(jobs::record_failure(&env.pool, &last, JobStatus::Dead, "gave up after 3 attempts: x", "w", &json!({})).await.unwrap());
    expected.push((last.job_id, "dead"));

    // 5. Jobs queued by the producer's path: a refused message fails one, the task outbox fails
    //    another whose stored message is not a task.
    let mut tx = env.pool.begin().await.unwrap();
    let video: Uuid = sqlx::query_scalar("INSERT INTO videos (id, uri) VALUES ($1, 'c.mp4') RETURNING id")
        .bind(Uuid::new_v4())
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let refused = jobs::queue_job(&mut tx, video, TaskKind::Vision, false).await.unwrap().expect("queued");
    jobs::set_caller_fields(&mut tx, refused.job_id, Some("caller-c"), Some(&object(json!({ "n": 3 })))).await.unwrap();
    let broken = jobs::queue_job(&mut tx, video, TaskKind::Index, false).await.unwrap().expect("queued");
    tx.commit().await.unwrap();
    assert!(jobs::refuse_message(&env.pool, refused.job_id, "malformed message: unknown field", "w").await.unwrap());
    expected.push((refused.job_id, "failed"));
    sqlx::query("INSERT INTO outbox (job_id, body, created_at) VALUES ($1, $2, now() - interval '1 hour')")
        .bind(broken.job_id)
        .bind(b"{\"v\":1}".to_vec())
        .execute(&env.pool)
        .await
        .unwrap();
    outbox::relay(&env.pool, &env.channel, &env.topology(), Duration::ZERO).await.unwrap();
    expected.push((broken.job_id, "failed"));

    let stored = outbox_events(&env).await;
    let wanted: Vec<(Uuid, String)> = expected.iter().map(|(j, s)| (*j, (*s).to_string())).collect();
    assert_eq!(stored, wanted, "one event per transition into a final state, in commit order");

    // LISTEN heard each commit once, in order, and nothing of the rollback.
    for (job, status) in &expected {
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        let note = tokio::time::timeout_at(until, listener.recv()).await.expect("a notification in time").expect("notification");
        let payload: Value = serde_json::from_str(note.payload()).expect("JSON payload");
        assert_eq!((payload["job_id"].as_str(), payload["status"].as_str()), (Some(job.to_string().as_str()), Some(*status)), "{payload}");
    }

    // The relay publishes them all, each once, to `{kind}.{status}`, and forgets what it published.
    let published = events::relay(&env.pool, &env.channel, &env.topology()).await.expect("relay");
    assert_eq!(published, expected.len());
    assert_eq!(outbox_events(&env).await, []);
    let mut ids = std::collections::BTreeSet::new();
    for (job, status) in &expected {
        let got = next_event(&env, &mut consumer, Duration::from_secs(10), &format!("{status} of {job}")).await;
        let row = env.job(*job).await.expect("job");
        let event = &got.event;
        assert_eq!((event.job_id, event.status.as_str()), (*job, *status), "{}", got.body);
        assert_eq!(got.routing_key, format!("{}.{status}", row.kind));
        assert_eq!(got.message_id, Some(event.event_id.to_string()));
        assert!(ids.insert(event.event_id), "event ids are unique");
        // The row is the job now: job a failed after 2 attempts, then started a new series.
        assert_eq!((event.video_id, event.kind.as_str()), (row.video_id, row.kind.as_str()));
        // The refused job and the one the relay failed never started: no attempt.
        let attempted = if [refused.job_id, broken.job_id].contains(job) { event.attempts == 0 } else { event.attempts >= 1 };
        assert!(attempted && (*status != "succeeded" || event.attempts == row.attempts), "{}", got.body);
        if (*job, *status) == (first.job_id, "failed") {
            // The row has moved on to the newer enqueue; the event kept the fields of its own time.
            assert_eq!(event.external_id.as_deref(), Some("caller-a"), "{}", got.body);
            assert_eq!(event.metadata, Some(object(json!({ "order": 1, "tags": ["x"] }))), "{}", got.body);
        } else {
            assert_eq!(event.external_id, row.external_id, "{}", got.body);
            assert_eq!(event.metadata.clone().map(Value::Object), row.metadata, "{}", got.body);
            assert_eq!(event.summary, row.summary);
        }
        let mut fields: Vec<String> = got.body.as_object().expect("object").keys().cloned().collect();
        fields.sort();
        assert_eq!(fields, schema_fields(), "the body has exactly the schema's fields");
        if *status == "succeeded" {
            assert_eq!((event.reason.as_deref(), event.summary.clone()), (None, Some(json!({ "segments": 2 }))));
            assert_eq!(event.external_id.as_deref(), Some("caller-a2"), "the latest enqueue's caller fields");
            assert_eq!(event.metadata, None);
        } else {
            assert!(event.reason.as_deref().is_some_and(|r| !r.is_empty()), "{}", got.body);
        }
    }
    env.cleanup().await;
}

/// A real worker relays the events of jobs enqueued through the HTTP API, the CLI, a foreign
/// message and the Python example, each with the caller's fields; the API and the CLI return and
/// find them. Then the latency from a commit to the event at a subscriber, over many jobs.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_publishes_the_events_of_jobs_as_they_end() {
    let env = TestEnv::new().await;
    for name in ["api.mp4", "cli.mp4", "python.mp4"] {
        env.add_media("video/silent.mp4", name);
    }
    let mut events = Events { consumer: subscribe(&env, "#").await, early: Vec::new() };
    let worker = env.spawn_worker("vision", "events", &[]);
    let (_serve, addr) = env.serve().await;

    // The API refuses caller fields out of bounds, and writes nothing then.
    let long = "x".repeat(257);
    for (body, error) in [
        (json!({ "uri": "api.mp4", "external_id": long }), "external_id has 257 characters"),
        (json!({ "uri": "api.mp4", "external_id": "" }), "external_id has 0 characters"),
        (json!({ "uri": "api.mp4", "metadata": { "blob": "x".repeat(9000) } }), "metadata is 9011 bytes"),
        (json!({ "uri": "api.mp4", "metadata": [1, 2] }), "metadata"),
    ] {
        let (code, answer) = http(&addr, "POST", "/v1/videos", Some(&body.to_string())).await;
        assert!(code == 400 && answer.contains(error), "{code} {answer}");
    }
    assert_eq!(sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs").fetch_one(&env.pool).await.unwrap(), 0);
    let (code, answer) = http(&addr, "GET", &format!("/v1/jobs?external_id={long}"), None).await;
    assert!(code == 400 && answer.contains("257 characters"), "{code} {answer}");

    // Through the API, with the caller's fields.
    let metadata = json!({ "customer": "acme", "priority": 3, "tags": ["keynote"] });
    let body = json!({ "uri": "api.mp4", "kinds": ["vision"], "external_id": "order-42", "metadata": metadata });
    let (code, answer) = http(&addr, "POST", "/v1/videos", Some(&body.to_string())).await;
    assert_eq!(code, 202, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    let api_job = Uuid::parse_str(answer["jobs"][0]["job_id"].as_str().unwrap()).unwrap();
    // A foreign message with its own fields, for media that does not exist: a `failed` event.
    let missing = message(TaskKind::Vision, "missing.mp4", Some("gone-1"), Some(json!({ "why": "test" })));
    publish_raw(&env, "vision", &missing.to_body(), Some(missing.job_id)).await;

    env.wait_state(&worker, WorkerState::Warm, WARM).await;
    let got = events.of(&env, api_job, TASK).await;
    let frames = env.count("SELECT count(*) FROM frames WHERE video_id = $1", got.event.video_id).await;
    assert_eq!((got.routing_key.as_str(), got.event.status), ("vision.succeeded", JobStatus::Succeeded), "{}", got.body);
    assert!(frames > 0 && got.event.summary.as_ref().and_then(|s| s["frames"].as_i64()) == Some(frames), "{}", got.body);
    assert_eq!(got.event.external_id.as_deref(), Some("order-42"));
    assert_eq!(got.event.metadata.clone().map(Value::Object), Some(metadata.clone()));
    assert_eq!(got.event.reason, None);

    let (code, answer) = http(&addr, "GET", &format!("/v1/jobs/{api_job}"), None).await;
    let row: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!((code, &row["external_id"], &row["metadata"]), (200, &json!("order-42"), &metadata), "{answer}");
    let (code, answer) = http(&addr, "GET", "/v1/jobs?external_id=order-42", None).await;
    let found: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(code, 200, "{answer}");
    let ids: Vec<&str> = found["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [api_job.to_string()]);
    assert_eq!(found["jobs"][0]["metadata"], metadata);
    let (code, answer) = http(&addr, "GET", "/v1/jobs?external_id=nobody", None).await;
    assert_eq!((code, serde_json::from_str::<Value>(&answer).unwrap()), (200, json!({ "jobs": [] })));

    let failed = events.of(&env, missing.job_id, TASK).await;
    assert_eq!((failed.routing_key.as_str(), failed.event.external_id.as_deref()), ("vision.failed", Some("gone-1")), "{}", failed.body);
    assert!(failed.event.reason.as_deref().is_some_and(|r| r.contains("not found")), "{}", failed.body);
    assert_eq!(failed.event.metadata, Some(object(json!({ "why": "test" }))));

    // Through the CLI: refused fields exit 2; `--wait` still follows the job; status finds it.
    let (code, _, err) = env.cli(&["enqueue", "cli.mp4", "--kind", "vision", "--metadata", "[1]"]).await;
    assert!(code == 2 && err.contains("not a JSON object"), "{code} {err}");
    let args = ["enqueue", "cli.mp4", "--kind", "vision", "--external-id", "cli-7", "--metadata", r#"{"batch": 9}"#, "--wait"];
    let (code, out, err) = env.cli(&args).await;
    assert!(code == 0 && out.contains("external id: cli-7"), "{code}\n{out}\n{err}");
    let (code, out, _) = env.cli(&["status", "--external-id", "cli-7", "--json"]).await;
    let rows: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!((code, &rows[0]["status"], &rows[0]["metadata"]), (0, &json!("succeeded"), &json!({ "batch": 9 })), "{out}");
    let cli_job = Uuid::parse_str(rows[0]["id"].as_str().unwrap()).unwrap();
    let got = events.of(&env, cli_job, TASK).await;
    assert_eq!((got.event.external_id.as_deref(), got.event.status), (Some("cli-7"), JobStatus::Succeeded));

    // The Python example publishes with its fields and waits for its event.
    let python = repo().join(".deps/venv/bin/python");
    let out = tokio::process::Command::new(&python)
        .arg(repo().join("examples/python/publish_task.py"))
        .args(["--amqp-url", env.settings.amqp.urls[0].expose(), "--exchange", env.topology().exchange()])
        .args(["--kind", "vision", "--media-uri", "python.mp4", "--external-id", "py-1", "--metadata", r#"{"from": "python"}"#])
        .args(["--wait", "--timeout", "120"])
        .output()
        .await
        .expect("run the python example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert_eq!(lines.len(), 2, "the message, then its event: {stdout}");
    assert_eq!(
        (&lines[1]["status"], &lines[1]["external_id"], &lines[1]["metadata"]),
        (&json!("succeeded"), &json!("py-1"), &json!({ "from": "python" }))
    );
    let py_job = Uuid::parse_str(lines[1]["job_id"].as_str().unwrap()).unwrap();
    let frames = env.count("SELECT count(*) FROM frames WHERE video_id = (SELECT video_id FROM jobs WHERE id = $1)", py_job).await;
    assert_eq!(lines[1]["summary"]["frames"].as_i64(), Some(frames), "{stdout}");

    // Latency from the commit that ends a job to the event at a subscriber, the worker's relay woken
    // by the notification (its sweep runs only every worker.outbox_relay_ms = 15 s).
    const JOBS: usize = 40;
    let mut latencies = Vec::with_capacity(JOBS);
    for i in 0..JOBS {
        let msg = message(TaskKind::Index, &format!("latency-{i}.wav"), Some("bench"), None);
        let started = run(&env, &msg, false, 5).await;
        succeed(&env, &started, &json!({ "segments": 0 }), true).await;
        let committed = Instant::now();
        events.of(&env, started.job_id, Duration::from_secs(30)).await;
        latencies.push(committed.elapsed());
    }
    latencies.sort();
    let (median, p90, max) = (latencies[JOBS / 2], latencies[JOBS * 9 / 10], latencies[JOBS - 1]);
    eprintln!("event latency after commit over {JOBS} jobs: median {median:?}, p90 {p90:?}, max {max:?}");
    assert!(median < Duration::from_millis(500), "median {median:?}: the relay is not woken by the notification");
    drop(worker);
    env.cleanup().await;
}

fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}
