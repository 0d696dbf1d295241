//! `heimdex serve` as a stranger meets it: API keys, the Host check, limits in size, time and
//! concurrency, `force` only with a key, no secret, path or internal error in any answer, and a broker
//! or database that accepts connections and never answers (503 in time, other requests unaffected).
//! No worker or model is needed: rows are written straight into the test's database.

use std::time::{Duration, Instant};

use heimdex_tests::{TestEnv, http, http_get, http_raw, http_with};
use serde_json::Value;
use uuid::Uuid;

const KEY: &str = "k3y-one-0123456789abcdefXYZ";
const KEY2: &str = "k3y-two-fedcba9876543210QRS";
const NO_JOB: &str = "/v1/jobs/8f0e7c57-2f4b-4d7e-9a55-1b2a3c4d5e6f";

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn keys() -> String {
    format!("{KEY},{KEY2}")
}

/// A listener that accepts every connection and never says a word: a broker or database that hangs.
async fn black_hole() -> (tokio::task::JoinHandle<()>, u16) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (task, port)
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_key_the_server_listens_on_loopback_only() {
    let env = TestEnv::new().await;
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let serve = tokio::process::Command::new(heimdex_tests::binary("heimdex"))
            .envs(env.env())
            .args(["serve", "--addr", addr])
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(20), serve).await;
        let out = out.unwrap_or_else(|_| panic!("heimdex serve --addr {addr} without a key kept running")).unwrap();
        let (code, stdout, stderr) =
            (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(code, 2, "{addr}: {stdout} {stderr}");
        assert!(!stdout.contains("listening"), "{addr}: {stdout}");
        assert!(stderr.contains("serve.api_keys"), "{addr}: the refusal names the setting: {stderr}");
    }
    // With a key it binds every interface (and is reached here through loopback only).
    let (_server, addr) = env.serve_with(&[("HEIMDEX__SERVE__API_KEYS", &keys())], "0.0.0.0:0").await;
    let port = addr.rsplit_once(':').unwrap().1;
    let (code, body) = http_get(&format!("127.0.0.1:{port}"), "/healthz").await;
    assert_eq!(code, 200, "{body}");
    // A key too short to be one is refused before anything listens.
    let (code, _, stderr) = env.cli_with(&[("HEIMDEX__SERVE__API_KEYS", "short")], &["serve", "--addr", "127.0.0.1:0"]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(!stderr.contains("short"), "the refused key is not echoed: {stderr}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_keys_set_everything_but_healthz_needs_one() {
    let env = TestEnv::new().await;
    let (_server, addr) = env.serve_with(&[("HEIMDEX__SERVE__API_KEYS", &keys())], "127.0.0.1:0").await;
    let (code, body) = http_get(&addr, "/healthz").await;
    assert_eq!((code, body.as_str()), (200, "ok"));

    let bearer = |k: &str| format!("Bearer {k}");
    let refused: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("/v1/status", vec![]),
        (NO_JOB, vec![]),
        ("/", vec![]),
        ("/v1/no-such-route", vec![]),
        (NO_JOB, vec![("Authorization", bearer("wrong"))]),
        (NO_JOB, vec![("Authorization", bearer(&KEY[..KEY.len() - 1]))]),
        (NO_JOB, vec![("Authorization", bearer(&format!("{KEY}x")))]),
        (NO_JOB, vec![("Authorization", bearer(&KEY.to_uppercase()))]),
        (NO_JOB, vec![("Authorization", bearer(""))]),
        (NO_JOB, vec![("Authorization", KEY.to_string())]),
        (NO_JOB, vec![("Authorization", format!("Basic {KEY}"))]),
        (NO_JOB, vec![("Authorization", format!("Bearer {KEY},{KEY2}"))]),
        (NO_JOB, vec![("X-Api-Key", KEY.to_string())]),
        (NO_JOB, vec![("Authorization", bearer("wrong")), ("Authorization", bearer(KEY))]),
    ];
    let mut bodies = Vec::new();
    for (path, headers) in &refused {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let (code, body) = http_with(&addr, "GET", path, &headers, None).await;
        assert_eq!(code, 401, "{path} {headers:?}: {body}");
        bodies.push(body);
    }
    // A key in the query string is no key (it would end up in logs and browser history).
    for query in [format!("?api_key={KEY}"), format!("?access_token={KEY}"), format!("?key={KEY}&token={KEY}")] {
        let (code, body) = http_get(&addr, &format!("{NO_JOB}{query}")).await;
        assert_eq!(code, 401, "{query}: {body}");
        bodies.push(body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "one answer for every refusal: {bodies:?}");
    assert!(!bodies[0].contains(KEY) && !bodies[0].contains("k3y"), "{}", bodies[0]);
    let (_, head, _) = http_raw(&addr, &format!("GET {NO_JOB} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")).await;
    assert!(head.to_lowercase().contains("www-authenticate: bearer"), "{head}");

    // Either key, and the scheme in any case.
    for auth in [format!("Bearer {KEY}"), format!("bearer {KEY2}"), format!("BEARER   {KEY}")] {
        let (code, body) = http_with(&addr, "GET", NO_JOB, &[("Authorization", &auth)], None).await;
        assert_eq!(code, 404, "{auth}: {body}");
    }
    let (code, page) = http_with(&addr, "GET", "/", &[("Authorization", &format!("Bearer {KEY}"))], None).await;
    assert_eq!(code, 200, "{page}");

    // The keys reach no log, even at debug.
    let log = env.serve_log();
    assert!(!log.contains(KEY) && !log.contains(KEY2), "a key in the server's log:\n{log}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn only_allowed_host_names_reach_the_api() {
    let env = TestEnv::new().await;
    let (_server, addr) = env.serve().await;
    let port = addr.rsplit_once(':').unwrap().1;
    let request = |host: Option<&str>, target: &str| match host {
        Some(host) => format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        None => format!("GET {target} HTTP/1.1\r\nConnection: close\r\n\r\n"),
    };
    for host in [
        format!("localhost:{port}"),
        "localhost".into(),
        "LocalHost".into(),
        format!("127.0.0.1:{port}"),
        "[::1]".into(),
        format!("[::1]:{port}"),
        "localhost.".into(),
    ] {
        let (code, _, body) = http_raw(&addr, &request(Some(&host), NO_JOB)).await;
        assert_eq!(code, 404, "Host: {host}: {body}");
    }
    let refused = [
        request(Some("evil.example"), NO_JOB),
        request(Some(&format!("evil.example:{port}")), NO_JOB),
        request(Some("localhost.evil.example"), NO_JOB),
        request(Some("127.0.0.1.nip.io"), NO_JOB),
        request(Some("[::2]"), NO_JOB),
        request(Some("0.0.0.0"), NO_JOB),
        request(Some(&format!("evil.example:{port}")), "/"),
        request(Some(&format!("evil.example:{port}")), "/v1/status"),
        request(None, NO_JOB),
        format!("GET {NO_JOB} HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\nConnection: close\r\n\r\n"),
        format!("GET http://evil.example{NO_JOB} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
        format!("GET {NO_JOB} HTTP/1.0\r\n\r\n"),
    ];
    for raw in &refused {
        let (code, _, body) = http_raw(&addr, raw).await;
        assert!(code == 400 || code == 403 || code == 421, "{raw:?}: {code} {body}");
        assert!(!body.contains("no job"), "{raw:?} reached the API: {body}");
    }
    // The health check answers whatever the name (orchestrators probe by IP).
    let (code, _, body) = http_raw(&addr, &request(Some("10.1.2.3:8080"), "/healthz")).await;
    assert_eq!(code, 200, "{body}");

    // Named hosts replace the loopback names.
    let (_named, addr) = env.serve_with(&[("HEIMDEX__SERVE__ALLOWED_HOSTS", "heimdex.internal,api.example")], "127.0.0.1:0").await;
    let (code, _, body) = http_raw(&addr, &request(Some("heimdex.internal:8080"), NO_JOB)).await;
    assert_eq!(code, 404, "{body}");
    let (code, _, body) = http_raw(&addr, &request(Some("localhost"), NO_JOB)).await;
    assert_eq!(code, 403, "{body}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn force_needs_a_key_or_the_switch() {
    let env = TestEnv::new().await;
    env.add_media("video/silent.mp4", "clip.mp4");
    let force = Some(r#"{"uri": "clip.mp4", "kinds": ["vision"], "force": true}"#);
    let (_server, addr) = env.serve().await;
    let (code, body) = http(&addr, "POST", "/v1/videos", force).await;
    assert_eq!(code, 403, "{body}");
    assert!(json(&body)["error"].as_str().unwrap().contains("force"), "{body}");
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&env.pool).await.unwrap();
    assert_eq!(jobs, 0, "a refused force writes nothing");
    let (code, body) = http(&addr, "POST", "/v1/videos", Some(r#"{"uri": "clip.mp4", "kinds": ["vision"]}"#)).await;
    assert_eq!(code, 202, "without force it is enqueued: {body}");

    let (_switch, addr) = env.serve_with(&[("HEIMDEX__SERVE__ALLOW_FORCE", "true")], "127.0.0.1:0").await;
    let (code, body) = http(&addr, "POST", "/v1/videos", force).await;
    assert_eq!(code, 202, "{body}");
    let (_keyed, addr) = env.serve_with(&[("HEIMDEX__SERVE__API_KEYS", KEY)], "127.0.0.1:0").await;
    let (code, body) = http_with(&addr, "POST", "/v1/videos", &[("Authorization", &format!("Bearer {KEY}"))], force).await;
    assert_eq!(code, 202, "{body}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_headers_and_requests_are_bounded() {
    let env = TestEnv::new().await;
    let (_server, addr) =
        env.serve_with(&[("HEIMDEX__SERVE__HEADER_TIMEOUT_MS", "1000"), ("HEIMDEX__SERVE__MAX_BODY_BYTES", "4096")], "127.0.0.1:0").await;
    let big = format!(r#"{{"uri": "{}"}}"#, "a".repeat(8000));
    let (code, body) = http(&addr, "POST", "/v1/videos", Some(&big)).await;
    assert_eq!(code, 413, "{body}");

    // Headers that never end: the connection is closed after the header timeout.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = Instant::now();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(format!("GET /v1/status HTTP/1.1\r\nHost: {addr}\r\nX-Slow: ").as_bytes()).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "a request whose headers never end held its connection for 10 s");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900), "closed after {waited:?}");
    println!("headers that never end: closed after {waited:?} (header timeout 1 s)");
    env.cleanup().await;
}

/// A video whose URL holds a user, a password and a signed query, with a succeeded index job, a
/// failed vision job whose error names the URL, a transcript and embedded frames.
async fn secret_video(env: &TestEnv, uri: &str) -> (Uuid, Uuid) {
    let (video, job) = (Uuid::new_v4(), Uuid::new_v4());
    let pool = &env.pool;
    sqlx::query("INSERT INTO videos (id, uri) VALUES ($1, $2)").bind(video).bind(uri).execute(pool).await.unwrap();
    sqlx::query("INSERT INTO jobs (id, video_id, kind, status, finished_at) VALUES ($1, $2, 'index', 'succeeded', now())")
        .bind(job)
        .bind(video)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO jobs (id, video_id, kind, status, last_error, finished_at) VALUES ($1, $2, 'vision', 'dead', $3, now())")
        .bind(Uuid::new_v4())
        .bind(video)
        .bind(format!("ffprobe cannot read {uri}: 403 Forbidden"))
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO transcript_segments (video_id, idx, start_s, end_s, text, language) VALUES ($1, 0, 0, 2, 'hello there', 'en')",
    )
    .bind(video)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO scenes (video_id, idx, start_s, end_s, frame_count) VALUES ($1, 0, 0, 2, 2)")
        .bind(video)
        .execute(pool)
        .await
        .unwrap();
    let dim = env.settings.vision.embed_dim;
    let vector =
        |head: &[f32]| format!("[{}]", (0..dim).map(|i| head.get(i).copied().unwrap_or(0.0).to_string()).collect::<Vec<_>>().join(","));
    for (idx, v) in [(0, vector(&[1.0])), (1, vector(&[0.9, 0.1]))] {
        sqlx::query(
            "INSERT INTO frames (video_id, idx, ts_s, scene_idx, embedding, embedding_model) VALUES ($1, $2, $2, 0, $3::vector, $4)",
        )
        .bind(video)
        .bind(idx)
        .bind(v)
        .bind(&env.settings.vision.embed_model)
        .execute(pool)
        .await
        .unwrap();
    }
    (video, job)
}

#[tokio::test(flavor = "multi_thread")]
async fn no_answer_carries_a_url_secret() {
    let env = TestEnv::new().await;
    let uri = "https://bob:hunter2@cdn.example/v/a.mp4?sig=s3cr3t&exp=1";
    let shown = heimdex_shared::remote::redact(uri);
    let (video, job) = secret_video(&env, uri).await;
    let (_server, addr) = env.serve().await;
    let encoded = "https%3A%2F%2Fbob%3Ahunter2%40cdn.example%2Fv%2Fa.mp4%3Fsig%3Ds3cr3t%26exp%3D1";
    let paths = [
        format!("/v1/jobs/{job}"),
        format!("/v1/videos/{video}/transcript?format=json"),
        format!("/v1/search?similar_to={video}@0&limit=5"),
        "/v1/status".to_string(),
        // The caller's own URL is not echoed in an error either.
        format!("/v1/search?q=x&video={encoded}x"),
        format!("/v1/search?similar_to={encoded}"),
        format!("/v1/videos/{encoded}/transcript"),
        format!("/v1/jobs/{encoded}"),
    ];
    let mut shown_in = 0;
    for path in &paths {
        let (code, body) = http_get(&addr, path).await;
        assert!(code != 0 && code != 500, "{path}: {code} {body}");
        assert!(!body.contains("hunter2") && !body.contains("s3cr3t") && !body.contains("bob"), "{path} shows a secret: {body}");
        shown_in += usize::from(body.contains(&shown));
    }
    assert_eq!(shown_in, 4, "the redacted URL stands in every listing ({shown})");
    let (code, body) = http(&addr, "POST", "/v1/videos", Some(&format!(r#"{{"uri": "{uri}"}}"#))).await;
    assert!(code >= 400 && !body.contains("hunter2") && !body.contains("s3cr3t"), "{code} {body}");
    let (code, body) = http(&addr, "POST", "/v1/videos", Some(&format!(r#"{{"uri": 7, "language": "{uri}"}}"#))).await;
    assert!(code == 400 && !body.contains("hunter2") && !body.contains("s3cr3t"), "{code} {body}");

    // The CLI's transcript JSON too.
    let (code, out, err) = env.cli(&["transcript", &video.to_string(), "--format", "json"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("hunter2") && !out.contains("s3cr3t") && out.contains(&shown), "{out}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_reveal_no_path_no_existence_and_no_database_detail() {
    let env = TestEnv::new().await;
    std::fs::write(env.media.path().join("notes.mp4"), "not a video at all").unwrap();
    let root = env.media.path().canonicalize().unwrap().display().to_string();
    let (_server, addr) = env.serve().await;
    let enqueue = |uri: &str| format!(r#"{{"uri": "{uri}"}}"#);
    let mut answers = Vec::new();
    for uri in [
        "/etc/passwd",
        "/etc/no-such-file-4f1c",
        "../../../../etc/passwd",
        "../../../../etc/no-such-file-4f1c",
        "missing.mp4",
        "/proc/self/environ",
        &format!("{root}/../../etc/hostname"),
    ] {
        let (code, body) = http(&addr, "POST", "/v1/videos", Some(&enqueue(uri))).await;
        assert_eq!(code, 422, "{uri}: {body}");
        assert!(!body.contains(&root) && !body.contains("/tmp") && !body.contains(env.media.path().to_str().unwrap()), "{uri}: {body}");
        answers.push(body);
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "one answer for outside and missing: {answers:#?}");
    let (code, body) = http(&addr, "POST", "/v1/videos", Some(&enqueue("notes.mp4"))).await;
    assert_eq!(code, 422, "{body}");
    assert!(!body.contains(&root) && !body.contains("/tmp/"), "{body}");

    // A database that refuses us: 503 with a reason, no driver chain.
    let (_broken, addr) = env
        .serve_with(&[("HEIMDEX__DATABASE__URL", "postgres://postgres:pw-x9@127.0.0.1:5432/heimdex_no_such_db_4f1c")], "127.0.0.1:0")
        .await;
    for path in [
        NO_JOB,
        "/v1/search?similar_to=8f0e7c57-2f4b-4d7e-9a55-1b2a3c4d5e6f@1",
        "/v1/videos/8f0e7c57-2f4b-4d7e-9a55-1b2a3c4d5e6f/transcript",
        "/v1/status",
    ] {
        let (code, body) = http_get(&addr, path).await;
        assert_eq!(code, 503, "{path}: {body}");
        let error = json(&body)["error"].as_str().unwrap().to_string();
        assert!(!error.is_empty(), "{path}: a reason");
        for leak in ["heimdex_no_such_db", "does not exist", "pw-x9", "5432", "error returned", "3D000"] {
            assert!(!body.contains(leak), "{path} leaks {leak:?}: {body}");
        }
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_or_database_that_never_answers_gets_503_in_time_and_blocks_nobody() {
    let env = TestEnv::new().await;
    let (_hole, port) = black_hole().await;
    let broker = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    // Each connect gives up after 1.5 s: four at once all answer then, none waits for another's connect.
    let limits = [
        ("HEIMDEX__AMQP__URL", broker.as_str()),
        ("HEIMDEX__SERVE__CONNECT_TIMEOUT_MS", "1500"),
        ("HEIMDEX__SERVE__REQUEST_TIMEOUT_MS", "4000"),
    ];
    let (_server, addr) = env.serve_with(&limits, "127.0.0.1:0").await;
    let started = Instant::now();
    let hung: Vec<_> = (0..4)
        .map(|i| {
            let addr = addr.clone();
            tokio::spawn(async move {
                let r = if i % 2 == 0 {
                    http_get(&addr, "/v1/status").await
                } else {
                    http(&addr, "POST", "/v1/videos", Some(r#"{"uri": "x.mp4"}"#)).await
                };
                (r, started.elapsed())
            })
        })
        .collect();
    // While those wait on the broker, a request that needs only the database answers at once.
    let (code, body) = tokio::time::timeout(Duration::from_secs(2), http_get(&addr, NO_JOB))
        .await
        .expect("a database request waited on a hung broker connect");
    assert_eq!(code, 404, "{body}");
    let database_only = started.elapsed();
    for h in hung {
        let ((code, body), took) = tokio::time::timeout(Duration::from_secs(30), h).await.expect("a request hung on the broker").unwrap();
        assert!(code == 503 || code == 422, "{code} {body}");
        if code == 503 {
            assert!(!body.contains(&port.to_string()) && !body.contains("guest"), "{body}");
        }
        assert!(took < Duration::from_millis(2900), "answered after {took:?}: connects waited on each other");
        println!("black-hole broker: {code} after {took:?}");
    }
    println!("black-hole broker: a database-only request answered after {database_only:?}");
    // Not ready (the probe a load balancer or Kubernetes uses), within the connect timeout, naming nothing.
    let (code, body) = tokio::time::timeout(Duration::from_secs(5), http_get(&addr, "/readyz")).await.expect("readyz hung");
    assert_eq!((code, body.as_str()), (503, "not ready"));

    // A database that never answers: 503 within the pool's acquire timeout; health stays up.
    let db = format!("postgres://postgres@127.0.0.1:{port}/heimdex");
    let (_server, addr) =
        env.serve_with(&[("HEIMDEX__DATABASE__URL", db.as_str()), ("HEIMDEX__SERVE__REQUEST_TIMEOUT_MS", "4000")], "127.0.0.1:0").await;
    let started = Instant::now();
    let (code, body) = tokio::time::timeout(Duration::from_secs(15), http_get(&addr, NO_JOB)).await.expect("hung on the database");
    assert_eq!(code, 503, "{body}");
    println!("black-hole database: 503 after {:?}", started.elapsed());
    let (code, _) = tokio::time::timeout(Duration::from_secs(2), http_get(&addr, "/healthz")).await.expect("health hung");
    assert_eq!(code, 200);
    let (code, body) = tokio::time::timeout(Duration::from_secs(15), http_get(&addr, "/readyz")).await.expect("readyz hung");
    assert_eq!((code, body.as_str()), (503, "not ready"));
    // With both answering, ready, by any Host name and without a key (a kubelet probes the pod's address).
    let (_server, addr) = env.serve().await;
    let (code, _, body) = http_raw(&addr, "GET /readyz HTTP/1.1\r\nHost: 10.1.2.3:8000\r\nConnection: close\r\n\r\n").await;
    assert_eq!((code, body.as_str()), (200, "ready"));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_beyond_the_concurrency_limit_queue() {
    let env = TestEnv::new().await;
    let (_hole, port) = black_hole().await;
    let broker = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let settings = [
        ("HEIMDEX__AMQP__URL", broker.as_str()),
        ("HEIMDEX__SERVE__MAX_CONCURRENT_REQUESTS", "1"),
        ("HEIMDEX__SERVE__CONNECT_TIMEOUT_MS", "1500"),
        ("HEIMDEX__SERVE__REQUEST_TIMEOUT_MS", "20000"),
    ];
    let (_server, addr) = env.serve_with(&settings, "127.0.0.1:0").await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let addr = addr.clone();
            tokio::spawn(async move { (http_get(&addr, "/v1/status").await, started.elapsed()) })
        })
        .collect();
    // The health check does not queue behind them.
    let (code, _) = tokio::time::timeout(Duration::from_secs(1), http_get(&addr, "/healthz")).await.expect("health queued");
    assert_eq!(code, 200);
    let mut took = Vec::new();
    for t in tasks {
        let ((code, body), after) = tokio::time::timeout(Duration::from_secs(40), t).await.expect("a queued request hung").unwrap();
        assert_eq!(code, 503, "{body}");
        took.push(after);
    }
    took.sort();
    println!("three requests through one slot, 1.5 s each: answered after {took:?}");
    assert!(took[2] >= Duration::from_millis(4400), "one at a time: {took:?}");
    assert!(took[2] < Duration::from_secs(15), "{took:?}");
    env.cleanup().await;
}
