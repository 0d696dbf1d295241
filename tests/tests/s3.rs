//! Media in object storage, against a real S3-compatible server: moto's (from PyPI, in
//! .deps/venv), started by each test on a free loopback port, with a bucket, objects and IAM users
//! made through its own APIs (`tests/python/s3_store.py`, boto3), and then checking every request's
//! SigV4 signature and permissions as AWS does. Enqueue checks an `s3://` URI's syntax and reads
//! nothing; both worker kinds read the object with the configured credentials and index it; the
//! store's refusals (no such key or bucket, access denied, unknown key id, bad signature) are
//! permanent with a clear reason, and its outages retryable. The endpoint is on loopback, which
//! http(s) media would refuse: an operator's endpoint is not held to public addresses.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use heimdex_shared::config::{MediaSettings, S3Settings, Secret};
use heimdex_shared::error::Disposition;
use heimdex_shared::fleet::WorkerState;
use heimdex_shared::media::MediaError;
use heimdex_shared::s3;
use heimdex_tests::TestEnv;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

const BUCKET: &str = "media";
/// A key that needs percent-encoding, so that the path sent, the path signed and the path the server
/// checks must agree.
const KEY: &str = "talks/2024/a talk+1.mp4";

/// A running moto server (killed when dropped) and the access keys it made.
struct Store {
    _child: Child,
    endpoint: String,
    reader: (String, String),
    stranger: (String, String),
}

/// Starts the store with `objects` (key, file) in [`BUCKET`]; waits at most 60 s for it to be ready.
async fn store(objects: &[(&str, &Path)]) -> Store {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".deps/venv/bin/python");
    assert!(python.is_file(), "{} missing: run scripts/setup (it installs moto into .deps/venv)", python.display());
    let mut cmd = Command::new(python);
    cmd.arg(root.join("tests/python/s3_store.py")).arg(BUCKET);
    for (key, file) in objects {
        cmd.arg(format!("{key}={}", file.display()));
    }
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).spawn().expect("start moto");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = match tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await {
        Ok(Ok(Some(line))) => line,
        other => {
            let mut err = String::new();
            let _ = child.kill().await;
            let _ = child.stderr.take().unwrap().read_to_string(&mut err).await;
            panic!("the S3 store did not start within 60 s ({other:?}): {err}");
        }
    };
    let info: serde_json::Value = serde_json::from_str(&line).expect("the store's JSON line");
    let pair = |v: &serde_json::Value| (v[0].as_str().unwrap().to_string(), v[1].as_str().unwrap().to_string());
    Store {
        endpoint: info["endpoint"].as_str().unwrap().to_string(),
        reader: pair(&info["reader"]),
        stranger: pair(&info["stranger"]),
        _child: child,
    }
}

fn settings(endpoint: &str, (id, secret): &(String, String)) -> S3Settings {
    S3Settings {
        endpoint: endpoint.to_string(),
        access_key_id: Secret::new(id.as_str()),
        secret_access_key: Secret::new(secret.as_str()),
        ..S3Settings::default()
    }
}

fn sample() -> PathBuf {
    heimdex_tests::bundle_media("video/sample.mp4")
}

#[track_caller]
fn assert_err(result: Result<tempfile::TempPath, MediaError>, disposition: Disposition, needles: &[&str], secret: &str) -> String {
    let err = result.expect_err(needles[0]);
    let text = err.to_string();
    assert_eq!(err.disposition(), disposition, "{text}");
    assert!(needles.iter().all(|n| text.contains(n)), "{needles:?} in {text}");
    assert!(!text.contains(secret), "the secret is not in {text}");
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn the_store_s_refusals_are_permanent_and_its_outages_retryable() {
    let empty = tempfile::NamedTempFile::new().unwrap();
    let store = store(&[(KEY, &sample()), ("empty.mp4", empty.path())]).await;
    let media = MediaSettings::default();
    let reader = settings(&store.endpoint, &store.reader);
    let secret = store.reader.1.clone();
    let uri = format!("s3://{BUCKET}/{KEY}");

    // The reader's signed GET: the object's bytes, in a temporary file.
    let path = s3::fetch(&uri, &reader, &media).await.expect("the reader reads the object");
    assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(sample()).unwrap());
    drop(path);

    let permanent = Disposition::Permanent;
    assert_err(
        s3::fetch("s3://media/talks/missing.mp4", &reader, &media).await,
        permanent,
        &["no object with this key", "404 NoSuchKey"],
        &secret,
    );
    assert_err(
        s3::fetch("s3://no-such-bucket/a.mp4", &reader, &media).await,
        permanent,
        &["no bucket no-such-bucket", "404 NoSuchBucket"],
        &secret,
    );
    let stranger = settings(&store.endpoint, &store.stranger);
    assert_err(s3::fetch(&uri, &stranger, &media).await, permanent, &["access denied", "403 AccessDenied"], &store.stranger.1);
    let wrong = settings(&store.endpoint, &(store.reader.0.clone(), "not-the-secret-0123456789".into()));
    let text = assert_err(
        s3::fetch(&uri, &wrong, &media).await,
        permanent,
        &["s3.secret_access_key", "403 SignatureDoesNotMatch"],
        "not-the-secret-0123456789",
    );
    assert!(!text.contains(&store.reader.0), "the store's message (which echoes the key id) is not shown: {text}");
    let unknown = settings(&store.endpoint, &("AKIAUNKNOWN000000000".into(), secret.clone()));
    assert_err(s3::fetch(&uri, &unknown, &media).await, permanent, &["does not know s3.access_key_id", "403 InvalidAccessKeyId"], &secret);
    let anonymous = S3Settings { endpoint: store.endpoint.clone(), ..S3Settings::default() };
    assert_err(s3::fetch(&uri, &anonymous, &media).await, permanent, &["403"], &secret);
    let err = s3::fetch("s3://media/empty.mp4", &reader, &media).await.unwrap_err();
    assert!(matches!(err, MediaError::Empty(_)), "{err}");
    let capped = MediaSettings { max_remote_bytes: 100_000, ..MediaSettings::default() };
    let err = s3::fetch(&uri, &reader, &capped).await.unwrap_err();
    assert!(matches!(err, MediaError::RemoteTooLarge { limit: 100_000, .. }), "{err}");

    // Outages: a store that answers 503 SlowDown, one that accepts and never answers, and nothing
    // listening at all are retried.
    let busy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let busy_addr = busy.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = busy.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let body = "<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
                let head = format!("HTTP/1.1 503 Service Unavailable\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = socket.write_all(format!("{head}{body}").as_bytes()).await;
                std::future::pending::<()>().await;
            });
        }
    });
    let retryable = Disposition::Retryable;
    let at = |addr: String| settings(&format!("http://{addr}"), &store.reader);
    assert_err(s3::fetch(&uri, &at(busy_addr.to_string()), &media).await, retryable, &["503 SlowDown"], &secret);
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let quick = MediaSettings { remote_timeout_ms: 500, remote_deadline_ms: 1_000, ..MediaSettings::default() };
    let started = Instant::now();
    assert_err(s3::fetch(&uri, &at(silent.local_addr().unwrap().to_string()), &quick).await, retryable, &["unavailable"], &secret);
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    assert_err(s3::fetch(&uri, &at(closed.to_string()), &media).await, retryable, &["cannot connect"], &secret);
}

async fn jobs_of(env: &TestEnv, uri: &str) -> Vec<(uuid::Uuid, String, uuid::Uuid)> {
    sqlx::query_as("SELECT j.id, j.kind, v.id FROM jobs j JOIN videos v ON v.id = j.video_id WHERE v.uri = $1 ORDER BY j.kind")
        .bind(uri)
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn both_kinds_index_a_video_from_a_bucket() {
    let env = TestEnv::new().await;
    let store = store(&[(KEY, &sample())]).await;
    let uri = format!("s3://{BUCKET}/{KEY}");
    let (key_id, secret) = (store.reader.0.as_str(), store.reader.1.as_str());

    // Off until an endpoint is configured; then enqueue checks only the syntax and reads nothing (the
    // producer has no credentials here: the store would refuse it).
    let (code, _, err) = env.cli(&["enqueue", &uri]).await;
    assert!(code == 2 && err.contains("s3.endpoint is not set") && err.contains("nothing was enqueued"), "{err}");
    let producer = [("HEIMDEX__S3__ENDPOINT", store.endpoint.as_str())];
    for (bad, needle) in [("s3://Media/a.mp4", "not a bucket name"), ("s3://media/a/../b.mp4", ". or .."), ("s3://media", "no key")] {
        let (code, _, err) = env.cli_with(&producer, &["enqueue", bad]).await;
        assert!(code == 2 && err.contains(needle), "{bad}: {err}");
    }
    let (code, out, err) = env.cli_with(&producer, &["enqueue", &uri, "s3://media/talks/missing.mp4", "--kind", "all"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (missing_vision, missing_kind, _) = jobs_of(&env, "s3://media/talks/missing.mp4").await.pop().unwrap();
    assert_eq!(missing_kind, "vision");

    // Both kinds read the object with the operator's credentials.
    let worker_env = [
        ("HEIMDEX__S3__ENDPOINT", store.endpoint.as_str()),
        ("HEIMDEX__S3__ACCESS_KEY_ID", key_id),
        ("HEIMDEX__S3__SECRET_ACCESS_KEY", secret),
        ("HEIMDEX__S3__PATH_STYLE", "true"),
    ];
    let vision = env.spawn_worker("vision", "s3-vision", &worker_env);
    let index = env.spawn_worker("index", "s3-index", &worker_env);
    env.wait_state(&vision, WorkerState::Warm, Duration::from_secs(120)).await;
    env.wait_state(&index, WorkerState::Warm, Duration::from_secs(120)).await;
    let jobs = jobs_of(&env, &uri).await;
    assert_eq!(jobs.iter().map(|j| j.1.as_str()).collect::<Vec<_>>(), ["index", "vision"]);
    for (job, kind, _) in &jobs {
        let row = env.wait_job(*job, "succeeded", Duration::from_secs(240)).await;
        assert_eq!(row.attempts, 1, "{kind}");
        assert!(row.stage_timings["fetch"].as_f64().is_some(), "{kind}: {}", row.stage_timings);
    }
    heimdex_tests::assert_results(&env, jobs[0].2).await;
    let (has_video, duration): (Option<bool>, Option<f64>) =
        sqlx::query_as("SELECT has_video, duration_s FROM videos WHERE id = $1").bind(jobs[0].2).fetch_one(&env.pool).await.unwrap();
    assert!(has_video == Some(true) && duration.is_some_and(|d| d > 20.0), "the worker recorded its probe: {has_video:?} {duration:?}");

    // A missing key fails at once (one attempt, no retry), with the store's reason.
    let row = env.wait_job(missing_vision, "failed", Duration::from_secs(60)).await;
    assert_eq!(row.attempts, 1);
    let reason = row.last_error.unwrap_or_default();
    assert!(reason.contains("s3://media/talks/missing.mp4") && reason.contains("404 NoSuchKey"), "{reason}");
    for log in [vision.log(), index.log()] {
        assert!(!log.contains(secret), "the secret key is never logged");
    }
    drop((vision, index));
    env.cleanup().await;
}
