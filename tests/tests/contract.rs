//! The task contract as other languages see it: the committed JSON Schema
//! (`deploy/contract/task.schema.json`) is the one the Rust types generate and says what the worker
//! accepts, and tasks published by `examples/python` (pika) and `examples/node` (amqplib) are processed
//! by a real worker, including one whose own `video_id` differs from the one Heimdex holds for its URI.
//!
//! The same holds for the job events' schema (`deploy/contract/event.schema.json`, from
//! `shared/src/events.rs`) and the API's OpenAPI document (`deploy/contract/openapi.json`, from
//! `producer/src/serve.rs`; `tests/tests/api_lists.rs` checks it against the server's answers).
//! Regenerate them after changing the types:
//! `HEIMDEX_WRITE_SCHEMA=1 cargo nextest run -p heimdex-tests --test contract committed_`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use heimdex_shared::contract::{self, SpeechTask, TaskKind, TaskMessage, TaskOptions};
use heimdex_shared::fleet::WorkerState;
use heimdex_tests::{TestEnv, assert_results};
use serde_json::Value;
use uuid::Uuid;

const WARM: Duration = Duration::from_secs(120);
const TASK: Duration = Duration::from_secs(240);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

#[test]
fn committed_schema_is_current() {
    assert_committed("deploy/contract/task.schema.json", &contract::json_schema());
}

#[test]
fn committed_event_schema_is_current() {
    assert_committed("deploy/contract/event.schema.json", &heimdex_shared::events::json_schema());
}

#[test]
fn committed_openapi_is_current() {
    let document = serde_json::to_value(heimdex_producer::serve::openapi()).expect("the document as JSON");
    assert_committed("deploy/contract/openapi.json", &document);
}

/// The committed copy of a generated schema is the generated one (rewritten with `HEIMDEX_WRITE_SCHEMA`).
fn assert_committed(file: &str, schema: &Value) {
    let path = repo().join(file);
    let generated = serde_json::to_string_pretty(schema).expect("schema as JSON") + "\n";
    if std::env::var_os("HEIMDEX_WRITE_SCHEMA").is_some() {
        std::fs::write(&path, &generated).expect("write the schema");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let first_difference = committed.lines().zip(generated.lines()).position(|(a, b)| a != b);
    assert!(
        committed == generated,
        "{} is out of date with the Rust types (first differing line: {:?}); regenerate it with\n  \
         HEIMDEX_WRITE_SCHEMA=1 cargo nextest run -p heimdex-tests --test contract committed_",
        path.display(),
        first_difference.map(|i| i + 1),
    );
}

/// Every string a schema allows through `const` or `enum`, anywhere below `schema`.
fn constants(schema: &Value, out: &mut BTreeSet<String>) {
    match schema {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("const", Value::String(s)) => {
                        out.insert(s.clone());
                    }
                    ("enum", Value::Array(values)) => out.extend(values.iter().filter_map(|v| v.as_str().map(String::from))),
                    _ => constants(value, out),
                }
            }
        }
        Value::Array(values) => values.iter().for_each(|v| constants(v, out)),
        _ => {}
    }
}

fn keys(object: &Value) -> BTreeSet<String> {
    object.as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default()
}

#[test]
fn schema_says_what_the_worker_accepts() {
    let schema = contract::json_schema();
    let options = TaskOptions { language: Some("en".into()), frame_rate: Some(2.0), task: Some(SpeechTask::Translate) };
    let mut full = TaskMessage::new(Uuid::new_v4(), Uuid::new_v4(), TaskKind::Vision, "/media/a.mp4".into(), options);
    full.external_id = Some("order-7".into());
    full.metadata = serde_json::json!({ "customer": "acme" }).as_object().cloned();
    let body = serde_json::to_value(&full).expect("message as JSON");

    // The same fields, and the required ones are exactly those a body cannot leave out.
    assert_eq!(keys(&schema["properties"]), keys(&body), "{schema:#}");
    let required: BTreeSet<String> =
        schema["required"].as_array().expect("required").iter().filter_map(|v| v.as_str().map(String::from)).collect();
    for field in keys(&body) {
        let mut without = body.clone();
        without.as_object_mut().expect("object").remove(&field);
        let accepted = TaskMessage::parse(&serde_json::to_vec(&without).expect("body")).is_ok();
        assert_eq!(!accepted, required.contains(&field), "{field}: accepted without it = {accepted}, schema required = {required:?}");
    }
    // No other field, at the top or in the options.
    assert_eq!(schema["additionalProperties"], Value::Bool(false), "{schema:#}");
    let options_schema = &schema["definitions"]["TaskOptions"];
    assert_eq!(options_schema["additionalProperties"], Value::Bool(false), "{schema:#}");
    assert_eq!(keys(&options_schema["properties"]), keys(&body["options"]));
    let mut extra = body.clone();
    extra["priority"] = 1.into();
    assert!(TaskMessage::parse(&serde_json::to_vec(&extra).expect("body")).is_err());

    // The version, the kinds, the frame rate's range and a non-blank URI, as the worker checks them.
    assert_eq!(schema["properties"]["v"]["const"], Value::from(contract::CONTRACT_VERSION), "{schema:#}");
    let mut kinds = BTreeSet::new();
    constants(&schema["definitions"]["TaskKind"], &mut kinds);
    assert_eq!(kinds, TaskKind::ALL.iter().map(|k| k.as_str().to_string()).collect::<BTreeSet<_>>(), "{schema:#}");
    let rate = &options_schema["properties"]["frame_rate"];
    assert_eq!((rate["exclusiveMinimum"].as_f64(), rate["maximum"].as_f64()), (Some(0.0), Some(60.0)), "{schema:#}");
    let with = |field: &str, value: Value| {
        let mut b = body.clone();
        if field == "frame_rate" || field == "task" {
            b["options"][field] = value;
        } else {
            b[field] = value;
        }
        TaskMessage::parse(&serde_json::to_vec(&b).expect("body")).is_ok()
    };
    assert_eq!([with("frame_rate", 0.0.into()), with("frame_rate", 60.0.into()), with("frame_rate", 60.5.into())], [false, true, false]);
    let mut tasks = BTreeSet::new();
    constants(&schema["definitions"]["SpeechTask"], &mut tasks);
    assert_eq!(tasks, ["transcribe", "translate"].map(String::from).into(), "{schema:#}");
    assert_eq!(
        [with("task", "transcribe".into()), with("task", "translate".into()), with("task", "summarise".into())],
        [true, true, false]
    );
    assert_eq!(schema["properties"]["media_uri"]["pattern"], Value::from(r"\S"), "{schema:#}");
    assert_eq!([with("media_uri", " \t".into()), with("media_uri", "x".into())], [false, true]);
    assert_eq!([with("v", 2.into()), with("kind", "audio".into())], [false, false]);
    assert_eq!(schema["x-heimdex-max-body-bytes"], Value::from(contract::MAX_MESSAGE_BYTES));

    // The caller's fields: optional, an id of 1 to 256 characters, an object of at most 8 KiB.
    let id = &schema["properties"]["external_id"];
    assert_eq!((id["minLength"].as_u64(), id["maxLength"].as_u64()), (Some(1), Some(contract::MAX_EXTERNAL_ID_CHARS as u64)), "{schema:#}");
    assert_eq!(schema["properties"]["metadata"]["x-heimdex-max-bytes"], Value::from(contract::MAX_METADATA_BYTES), "{schema:#}");
    assert_eq!(
        [with("external_id", "x".repeat(256).into()), with("external_id", "x".repeat(257).into()), with("external_id", "".into())],
        [true, false, false]
    );
    assert_eq!(
        [with("metadata", serde_json::json!({})), with("metadata", serde_json::json!([1])), with("metadata", "x".into())],
        [true, false, false]
    );
}

/// A body written before the caller's fields existed (the README's example) is still a valid task.
#[test]
fn messages_without_the_callers_fields_stay_valid() {
    let old = br#"{"v": 1, "job_id": "6f1c2b0e-1d3a-4c55-9a37-0d2f3f0a9b11", "video_id": "0b7d5c8e-5f61-4d0e-8f7e-2c9a4a1f3e22",
        "kind": "vision", "media_uri": "/srv/heimdex/media/talk.mp4", "options": { "frame_rate": 2.0 },
        "enqueued_at": "2026-12-01T19:22:23.123456+00:00"}"#;
    let parsed = TaskMessage::parse(old).expect("a version-1 body from before");
    assert!(parsed.external_id.is_none() && parsed.metadata.is_none(), "{parsed:?}");
    // And a message that does not use them is written without them, as an older worker reads it.
    let written = String::from_utf8(parsed.to_body()).expect("utf-8");
    assert!(!written.contains("external_id") && !written.contains("metadata"), "{written}");
}

/// An independent validator (Python's jsonschema, in .deps/venv) and the worker's parser give the same
/// verdict on valid and invalid bodies, so the committed schema is usable as it stands.
#[test]
fn python_jsonschema_and_the_worker_agree_on_bodies() {
    let python = repo().join(".deps/venv/bin/python");
    assert!(python.is_file(), "{} missing: run scripts/setup", python.display());
    let options = TaskOptions { language: Some("en".into()), frame_rate: Some(2.0), task: Some(SpeechTask::Translate) };
    let full =
        serde_json::to_value(TaskMessage::new(Uuid::new_v4(), Uuid::new_v4(), TaskKind::Index, "/m/a.wav".into(), options)).expect("json");
    let variant = |edit: &dyn Fn(&mut Value)| {
        let mut b = full.clone();
        edit(&mut b);
        b
    };
    let bodies = vec![
        full.clone(),
        variant(&|b| {
            b.as_object_mut().expect("object").remove("options");
        }),
        variant(&|b| b["options"] = serde_json::json!({})),
        variant(&|b| b["extra"] = true.into()),
        variant(&|b| b["options"]["priority"] = 1.into()),
        variant(&|b| b["v"] = 2.into()),
        variant(&|b| b["kind"] = "audio".into()),
        variant(&|b| b["media_uri"] = "   ".into()),
        variant(&|b| b["options"]["frame_rate"] = 0.into()),
        variant(&|b| b["options"]["frame_rate"] = 61.into()),
        variant(&|b| b["options"]["task"] = "transcribe".into()),
        variant(&|b| b["options"]["task"] = "summarise".into()),
        variant(&|b| b["options"] = Value::Null),
        variant(&|b| b["job_id"] = "not-a-uuid".into()),
        variant(&|b| {
            b.as_object_mut().expect("object").remove("enqueued_at");
        }),
        variant(&|b| b["external_id"] = "order-7".into()),
        variant(&|b| b["metadata"] = serde_json::json!({ "a": [1, { "b": null }] })),
        variant(&|b| b["external_id"] = "x".repeat(257).into()),
        variant(&|b| b["external_id"] = "".into()),
        variant(&|b| b["metadata"] = serde_json::json!(["a"])),
    ];
    let script = r#"
import json, sys, jsonschema
schema = json.load(open(sys.argv[1]))
validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())
print(json.dumps([validator.is_valid(body) for body in json.load(sys.stdin)]))
"#;
    let mut child = std::process::Command::new(&python)
        .args(["-c", script])
        .arg(repo().join("deploy/contract/task.schema.json"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run python");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(&serde_json::to_vec(&bodies).expect("bodies")).expect("write bodies");
    }
    let out = child.wait_with_output().expect("python output");
    assert!(out.status.success(), "python jsonschema failed");
    let python_says: Vec<bool> = serde_json::from_slice(&out.stdout).expect("verdicts");
    let worker_says: Vec<bool> = bodies.iter().map(|b| TaskMessage::parse(&serde_json::to_vec(b).expect("body")).is_ok()).collect();
    assert_eq!(
        worker_says,
        [
            true, true, true, false, false, false, false, false, false, false, true, false, false, false, false, true, true, false, false,
            false
        ]
    );
    assert_eq!(python_says, worker_says, "jsonschema vs TaskMessage::parse on {bodies:#?}");
}

/// Runs an example publisher; returns the message it printed.
async fn publish_with(env: &TestEnv, program: &Path, script: &Path, args: &[&str]) -> Value {
    let out = tokio::process::Command::new(program)
        .arg(script)
        .args(["--amqp-url", env.settings.amqp.urls[0].expose(), "--exchange", env.topology().exchange()])
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{} {} failed: {stderr}", program.display(), script.display());
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not the published message ({e}): {stdout}"))
}

fn id(message: &Value, field: &str) -> Uuid {
    Uuid::parse_str(message[field].as_str().unwrap_or_default()).unwrap_or_else(|e| panic!("{field}: {e}: {message}"))
}

/// The Node example runs when node is installed and `npm install` has been run in examples/node.
fn node_example() -> Result<(PathBuf, PathBuf), String> {
    let dir = repo().join("examples/node");
    if !dir.join("node_modules/amqplib").is_dir() {
        return Err("examples/node/node_modules/amqplib is missing (run `npm install` there)".into());
    }
    match std::process::Command::new("node").arg("--version").output() {
        Ok(out) if out.status.success() => Ok((PathBuf::from("node"), dir.join("publish_task.js"))),
        _ => Err("node is not installed".into()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tasks_published_from_python_and_node_are_processed_by_a_worker() {
    let python = repo().join(".deps/venv/bin/python");
    assert!(python.is_file(), "{} missing: run scripts/setup (it installs pika there)", python.display());
    let python_script = repo().join("examples/python/publish_task.py");
    let env = TestEnv::new().await;
    env.add_media("video/sample.mp4", "known.mp4");
    let fresh = env.add_media("video/silent.mp4", "from-python.mp4").canonicalize().expect("canonical path");
    let node = node_example();
    // Heimdex holds known.mp4 under its own video id (enqueued for index only: no index worker runs here).
    let (held_video, _) = env.enqueue("known.mp4", TaskKind::Index, false).await.expect("enqueue");
    let held_uri: String =
        sqlx::query_scalar("SELECT uri FROM videos WHERE id = $1").bind(held_video).fetch_one(&env.pool).await.expect("uri");
    let worker = env.spawn_worker("vision", "v1", &[]);
    env.wait_state(&worker, WorkerState::Warm, WARM).await;

    // 1. A task whose own video id is not the one Heimdex holds for its URI.
    let (foreign_video, foreign_job) = (Uuid::new_v4(), Uuid::new_v4());
    let (video_arg, job_arg) = (foreign_video.to_string(), foreign_job.to_string());
    let sent = publish_with(
        &env,
        &python,
        &python_script,
        &["--kind", "vision", "--media-uri", &held_uri, "--video-id", &video_arg, "--job-id", &job_arg],
    )
    .await;
    assert_eq!((id(&sent, "video_id"), id(&sent, "job_id")), (foreign_video, foreign_job), "{sent}");
    // 2. A task for a video Heimdex has never seen, with the ids the example makes up.
    let sent_fresh = publish_with(
        &env,
        &python,
        &python_script,
        &["--kind", "vision", "--media-uri", &fresh.display().to_string(), "--frame-rate", "2"],
    )
    .await;
    // 3. A task that names a video Heimdex holds by a path relative to the media root.
    let (relative_video, _) = {
        env.add_media("video/silent.mp4", "relative.mp4");
        env.enqueue("relative.mp4", TaskKind::Index, false).await.expect("enqueue")
    };
    let relative_job = Uuid::new_v4();
    let (other_video, relative_arg) = (Uuid::new_v4().to_string(), relative_job.to_string());
    publish_with(
        &env,
        &python,
        &python_script,
        &["--kind", "vision", "--media-uri", "relative.mp4", "--video-id", &other_video, "--job-id", &relative_arg],
    )
    .await;
    // 4. The same from Node, when it is there.
    let sent_node = match &node {
        Ok((node, script)) => {
            let uri = env.add_media("video/silent.mp4", "from-node.mp4").canonicalize().expect("canonical path");
            Some(publish_with(&env, node, script, &["--kind", "vision", "--media-uri", &uri.display().to_string()]).await)
        }
        Err(why) => {
            eprintln!("node publisher not run: {why}");
            None
        }
    };

    let row = env.wait_job(foreign_job, "succeeded", TASK).await;
    assert_eq!(row.video_id, held_video, "the results are filed under Heimdex's video id: {row:?}");
    assert_eq!(row.uri, held_uri);
    assert_results(&env, held_video).await;
    assert_eq!(env.count("SELECT count(*) FROM videos WHERE id = $1", foreign_video).await, 0, "no second video for one URI");
    assert_eq!(env.count("SELECT count(*) FROM frames WHERE video_id = $1", foreign_video).await, 0);

    let row = env.wait_job(relative_job, "succeeded", TASK).await;
    assert_eq!(row.video_id, relative_video, "a relative path names the video held for its canonical path: {row:?}");
    let videos: i64 = sqlx::query_scalar("SELECT count(*) FROM videos WHERE uri LIKE '%relative.mp4'").fetch_one(&env.pool).await.unwrap();
    assert_eq!(videos, 1, "no second video for one file");

    for sent in std::iter::once(&sent_fresh).chain(sent_node.as_ref()) {
        let row = env.wait_job(id(sent, "job_id"), "succeeded", TASK).await;
        assert_eq!(row.video_id, id(sent, "video_id"), "a new video takes the message's id: {row:?}");
        let frames = env.count("SELECT count(*) FROM frames WHERE video_id = $1", row.video_id).await;
        assert_eq!(row.summary.as_ref().and_then(|s| s["frames"].as_i64()), Some(frames), "{row:?}");
        // silent.mp4 is 4 s long: 1 fps by default, the Python task asked for 2 fps.
        let expected = if std::ptr::eq(sent, &sent_fresh) { 8 } else { 4 };
        assert!((frames - expected).abs() <= 1, "{frames} frames, expected about {expected}: {sent}");
    }
    assert_eq!(env.queue(&env.topology().dlq(TaskKind::Vision)).await.0, 0, "nothing dead-lettered");
    drop(worker);
    env.cleanup().await;
}
