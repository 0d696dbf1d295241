//! Remote media: off by default; when on, fenced by an allowlist, public addresses only (in every
//! spelling of an address), timeouts and an overall deadline, a size cap, no redirects, no proxy
//! from the environment, and no secret of the URL in errors or logs. Enqueue only checks a URL and
//! answers at once; the worker downloads it, at most `worker.concurrency` at a time.
//!
//! A small HTTP server in the test plays every kind of server: a real file, one that never answers,
//! one that drips forever, one that sends without end, one that lies about its length, one that
//! redirects to an address nobody allowed. Loopback is a refused address, so the tests that must
//! reach it list `127.0.0.1` (or `::1`) in `media.allow_hosts`, as an operator lists an internal CDN.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use heimdex_shared::config::MediaSettings;
use heimdex_shared::error::Disposition;
use heimdex_shared::fleet::WorkerState;
use heimdex_shared::media::MediaError;
use heimdex_shared::remote;
use heimdex_tests::TestEnv;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the test server saw.
#[derive(Default)]
struct Seen {
    heads: Mutex<Vec<String>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// Serves, on `bind`:
/// `/sample.mp4` (the bundle's video), `/hang…` (accepts, never answers), `/slow/…` (answers 404
/// after 1 s, counting requests in flight), `/drip` (a byte every 50 ms, forever), `/endless` (zeros
/// without end, no length), `/huge` (claims 1 TB, then stalls), `/lie` (claims 100 bytes, sends
/// 1 MB), `/redirect?to=URL` (302 to URL), anything else 404.
async fn serve(bind: &str) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let video = Arc::new(std::fs::read(heimdex_tests::bundle_media("video/sample.mp4")).unwrap());
    let state = seen.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(answer(socket, video.clone(), state.clone()));
        }
    });
    (addr, seen)
}

async fn answer(mut socket: TcpStream, video: Arc<Vec<u8>>, seen: Arc<Seen>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    seen.heads.lock().unwrap().push(head.clone());
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    let reply =
        |status: &str, extra: &str, len: usize| format!("HTTP/1.1 {status}\r\n{extra}Content-Length: {len}\r\nConnection: close\r\n\r\n");
    if path.starts_with("/hang") {
        std::future::pending::<()>().await;
    } else if path.starts_with("/sample.mp4") {
        let _ = socket.write_all(reply("200 OK", "", video.len()).as_bytes()).await;
        let _ = socket.write_all(&video).await;
    } else if path.starts_with("/slow/") {
        let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        seen.max_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(1)).await;
        seen.in_flight.fetch_sub(1, Ordering::SeqCst);
        let _ = socket.write_all(reply("404 Not Found", "", 0).as_bytes()).await;
    } else if path.starts_with("/drip") || path.starts_with("/endless") {
        let (chunk, every): (&[u8], _) =
            if path.starts_with("/drip") { (b"x", Duration::from_millis(50)) } else { (&[0u8; 16384], Duration::ZERO) };
        let _ = socket.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n").await;
        while socket.write_all(chunk).await.is_ok() {
            tokio::time::sleep(every).await;
        }
    } else if path.starts_with("/huge") {
        let _ = socket.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n").await;
        std::future::pending::<()>().await;
    } else if path.starts_with("/lie") {
        let _ = socket.write_all(reply("200 OK", "", 100).as_bytes()).await;
        let _ = socket.write_all(&vec![7u8; 1 << 20]).await;
    } else if let Some(to) = path.strip_prefix("/redirect?to=") {
        let _ = socket.write_all(reply("302 Found", &format!("Location: {to}\r\n"), 0).as_bytes()).await;
    } else {
        let _ = socket.write_all(reply("404 Not Found", "", 0).as_bytes()).await;
    }
}

fn settings(allow_hosts: &[&str]) -> MediaSettings {
    MediaSettings { allow_http: true, allow_hosts: allow_hosts.iter().map(ToString::to_string).collect(), ..MediaSettings::default() }
}

fn assert_refused(result: Result<impl std::fmt::Debug, MediaError>, needle: &str, what: &str) {
    let err = result.expect_err(what);
    assert!(matches!(err, MediaError::RemoteRefused { .. }), "{what}: {err}");
    assert_eq!(err.disposition(), Disposition::Permanent, "{what}: {err}");
    assert!(err.to_string().contains(needle), "{what}: {err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_spelling_of_a_refused_address_is_refused_for_good() {
    let (addr, seen) = serve("127.0.0.1:0").await;
    let port = addr.port();
    let open = settings(&[]);
    let urls = [
        format!("http://0:{port}/a.mp4"),
        format!("http://0.0.0.0:{port}/a.mp4"),
        format!("http://2130706433:{port}/a.mp4"),
        format!("http://0177.0.0.1:{port}/a.mp4"),
        format!("http://0x7f.1:{port}/a.mp4"),
        format!("http://127.1:{port}/a.mp4"),
        format!("http://[::ffff:127.0.0.1]:{port}/a.mp4"),
        format!("http://[::1]:{port}/a.mp4"),
        format!("http://[::127.0.0.1]:{port}/a.mp4"),
        format!("http://[64:ff9b::7f00:1]:{port}/a.mp4"),
        format!("http://[2002:7f00:1::1]:{port}/a.mp4"),
        format!("http://localhost:{port}/a.mp4"),
        "http://198.18.0.1/a.mp4".into(),
        "http://240.0.0.1/a.mp4".into(),
        "http://192.0.0.8/a.mp4".into(),
        "http://169.254.169.254/latest/meta-data/".into(),
        "http://[2001:db8::1]/a.mp4".into(),
        "https://[fd00::1]/a.mp4".into(),
    ];
    for url in &urls {
        assert_refused(remote::check(url, &open).await, "not a public address", url);
        assert_refused(remote::fetch(url, &open).await, "not a public address", url);
    }
    for url in ["http://[::1/a.mp4", "http://300.1.1.1/a.mp4", "http://exa mple.com/a.mp4"] {
        assert_refused(remote::check(url, &open).await, "not a URL", url);
    }
    // A listed host that is not the URL's host does not let it through.
    assert_refused(
        remote::check(&format!("http://2130706433:{port}/a.mp4"), &settings(&["localhost"])).await,
        "not in media.allow_hosts",
        "listed",
    );
    assert!(seen.heads.lock().unwrap().is_empty(), "nothing reached the server");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ipv6_literal_is_checked_and_fetched() {
    let (addr, _) = serve("[::1]:0").await;
    let video = std::fs::read(heimdex_tests::bundle_media("video/sample.mp4")).unwrap();
    let url = format!("http://[::1]:{}/sample.mp4", addr.port());
    for listed in ["::1", "[::1]"] {
        let checked = remote::check(&url, &settings(&[listed])).await.expect(listed);
        assert_eq!((checked.url.as_str(), checked.address), (url.as_str(), addr));
        let path = remote::fetch(&url, &settings(&[listed])).await.expect(listed);
        assert_eq!(std::fs::read(&path).unwrap(), video);
    }
    // A public literal passes the check (nothing is sent: checking does not connect).
    let public = "http://[2606:4700::1111]/a.mp4";
    assert_eq!(remote::check(public, &settings(&[])).await.unwrap().url, public);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_download_has_an_overall_deadline_and_a_size_cap() {
    let (addr, _) = serve("127.0.0.1:0").await;
    let base = format!("http://{addr}");
    let mut limits = settings(&["127.0.0.1"]);
    limits.remote_timeout_ms = 1_000;
    limits.remote_deadline_ms = 2_000;
    limits.max_remote_bytes = 100_000;
    let unavailable = |result: Result<tempfile::TempPath, MediaError>, needle: &str| {
        let err = result.unwrap_err();
        assert!(matches!(err, MediaError::RemoteUnavailable { .. }), "{err}");
        assert_eq!(err.disposition(), Disposition::Retryable, "{err}");
        assert!(err.to_string().contains(needle), "{err}");
    };
    let too_large = |result: Result<tempfile::TempPath, MediaError>| {
        let err = result.unwrap_err();
        assert!(matches!(err, MediaError::RemoteTooLarge { limit: 100_000, .. }), "{err}");
        assert_eq!(err.disposition(), Disposition::Permanent, "{err}");
    };

    // A byte every 50 ms never trips the read timeout; the deadline stops it.
    let started = Instant::now();
    let drip =
        tokio::time::timeout(Duration::from_secs(30), remote::fetch(&format!("{base}/drip"), &limits)).await.expect("a drip is cut off");
    unavailable(drip, "media.remote_deadline_ms");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    // Silence: the read timeout.
    let hang = tokio::time::timeout(Duration::from_secs(30), remote::fetch(&format!("{base}/hang.mp4"), &limits))
        .await
        .expect("silence is cut off");
    unavailable(hang, "timed out");

    // No length and no end: cut at the cap. A length above the cap: refused before the body.
    too_large(
        tokio::time::timeout(Duration::from_secs(30), remote::fetch(&format!("{base}/endless"), &limits)).await.expect("cut at the cap"),
    );
    let started = Instant::now();
    too_large(remote::fetch(&format!("{base}/huge"), &limits).await);
    assert!(started.elapsed() < Duration::from_millis(900), "refused on the header: {:?}", started.elapsed());
    // A length that lies low: no more than it claimed is kept.
    let path = remote::fetch(&format!("{base}/lie"), &limits).await.expect("the first 100 bytes");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 100);
}

#[tokio::test(flavor = "multi_thread")]
async fn redirects_are_not_followed() {
    let (addr, seen) = serve("127.0.0.1:0").await;
    let (inner, inner_seen) = serve("127.0.0.1:0").await;
    let url = format!("http://{addr}/redirect?to=http://localhost:{}/sample.mp4", inner.port());
    assert_refused(remote::fetch(&url, &settings(&["127.0.0.1"])).await, "302", "redirect");
    assert_eq!(seen.heads.lock().unwrap().len(), 1);
    assert!(inner_seen.heads.lock().unwrap().is_empty(), "the redirect was not followed");
}

/// Accepts connections and counts them; answers nothing (a proxy from the environment would be sent
/// the request here).
async fn proxy() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    (addr, count)
}

async fn jobs_of(env: &TestEnv, uri: &str) -> Vec<uuid::Uuid> {
    sqlx::query_scalar("SELECT j.id FROM jobs j JOIN videos v ON v.id = j.video_id WHERE v.uri = $1")
        .bind(uri)
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_media_is_off_by_default_checked_at_enqueue_and_downloaded_by_the_worker() {
    let env = TestEnv::new().await;
    let (addr, seen) = serve("127.0.0.1:0").await;
    let base = format!("http://{addr}");
    let sample = format!("{base}/sample.mp4");
    let refused = |(code, out, err): (i32, String, String), needle: &str| {
        assert_eq!(code, 2, "{out}{err}");
        assert!(err.contains(needle) && err.contains("nothing was enqueued"), "{err}");
        err
    };
    refused(env.cli(&["enqueue", &sample]).await, "http(s) media URIs are disabled");
    let on = [("HEIMDEX__MEDIA__ALLOW_HTTP", "true")];
    refused(env.cli_with(&on, &["enqueue", &sample]).await, "is not a public address");
    refused(env.cli_with(&on, &["enqueue", &sample.replace("127.0.0.1", "2130706433")]).await, "not a public address");
    refused(env.cli_with(&on, &["enqueue", &sample.replace("127.0.0.1", "[::ffff:127.0.0.1]")]).await, "not a public address");
    let other = [("HEIMDEX__MEDIA__ALLOW_HTTP", "true"), ("HEIMDEX__MEDIA__ALLOW_HOSTS", "cdn.example")];
    refused(env.cli_with(&other, &["enqueue", &sample]).await, "host 127.0.0.1 is not in media.allow_hosts");

    // Enqueue checks and answers at once: nothing is downloaded, not even from a server that would
    // take a second to answer each request. The canonical URL identifies the video.
    let listed = [("HEIMDEX__MEDIA__ALLOW_HTTP", "true"), ("HEIMDEX__MEDIA__ALLOW_HOSTS", "127.0.0.1")];
    let slow: Vec<String> = (1..=4).map(|i| format!("{base}/slow/{i}.mp4")).collect();
    let secret = format!("{}/sample.mp4?sig=topsecret", base.replace("http://", "http://bob:hunter2@"));
    let spelled = format!("{}/talks/../sample.mp4?sig=topsecret#t=3", base.replace("http://", "HTTP://bob:hunter2@"));
    let started = Instant::now();
    let mut args = vec!["enqueue", "--kind", "vision"];
    args.extend(slow.iter().map(String::as_str));
    args.push(&spelled);
    let (code, out, err) = env.cli_with(&listed, &args).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(started.elapsed() < Duration::from_secs(4), "enqueue answered in {:?}", started.elapsed());
    assert!(seen.heads.lock().unwrap().is_empty(), "enqueue downloaded: {:?}", seen.heads.lock().unwrap());
    assert!(!out.contains("hunter2") && !out.contains("topsecret") && !err.contains("hunter2"), "{out}{err}");
    let (hash, size, probed): (Option<String>, Option<i64>, Option<bool>) =
        sqlx::query_as("SELECT content_hash, size_bytes, has_video FROM videos WHERE uri = $1")
            .bind(&secret)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!((hash, size, probed), (None, None, None), "a remote video is its canonical URL until a worker reads it");

    // The worker downloads, at most worker.concurrency at once, directly (HTTP_PROXY is ignored:
    // a proxy would resolve the name again), with the URL's credentials, and keeps the URL secret.
    let (proxy, proxied) = proxy().await;
    let proxy = format!("http://{proxy}");
    let worker_env = [
        listed[0],
        listed[1],
        ("HEIMDEX__WORKER__CONCURRENCY", "2"),
        ("HTTP_PROXY", proxy.as_str()),
        ("http_proxy", proxy.as_str()),
        ("HTTPS_PROXY", proxy.as_str()),
        ("ALL_PROXY", proxy.as_str()),
    ];
    let worker = env.spawn_worker("vision", "remote", &worker_env);
    env.wait_state(&worker, WorkerState::Warm, Duration::from_secs(120)).await;
    for url in &slow {
        let job = jobs_of(&env, url).await[0];
        let row = env.wait_job(job, "failed", Duration::from_secs(120)).await;
        assert!(row.last_error.as_deref().is_some_and(|e| e.contains("404")), "{:?}", row.last_error);
    }
    let job = jobs_of(&env, &secret).await[0];
    let row = env.wait_job(job, "succeeded", Duration::from_secs(240)).await;
    assert_eq!(row.attempts, 1);
    assert!(row.stage_timings["fetch"].as_f64().is_some(), "{}", row.stage_timings);
    assert_eq!(seen.max_in_flight.load(Ordering::SeqCst), 2, "downloads at once = worker.concurrency");
    assert_eq!(proxied.load(Ordering::SeqCst), 0, "the proxy from the environment was not used");
    let heads = seen.heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 5, "each URL downloaded once: {heads:?}");
    assert!(heads.iter().any(|h| h.to_ascii_lowercase().contains("authorization: basic")), "{heads:?}");
    let frames: i64 = sqlx::query_scalar("SELECT count(*) FROM frames f JOIN videos v ON v.id = f.video_id WHERE v.uri = $1")
        .bind(&secret)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(frames, 25);
    let log = worker.log();
    assert!(!log.contains("topsecret") && !log.contains("hunter2"), "{log}");
    env.wait_for("nothing in flight", Duration::from_secs(10), || async { (seen.in_flight.load(Ordering::SeqCst) == 0).then_some(()) })
        .await;
    drop(worker);
    env.cleanup().await;
}
