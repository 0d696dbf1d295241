//! Remote media: off by default; when on, fenced by an allowlist, public addresses only, timeouts, a
//! size cap, and no secret of the URL in errors or logs. A small HTTP server in the test serves the
//! files (and a path that accepts and never answers).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use heimdex_shared::fleet::WorkerState;
use heimdex_tests::TestEnv;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves `/sample.mp4`, answers 404 elsewhere, never answers `/hang.mp4`; remembers the request heads.
async fn serve() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let video = std::fs::read(heimdex_tests::bundle_media("video/sample.mp4")).unwrap();
    let heads = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (video, heads) = (video.clone(), heads.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                heads.lock().unwrap().push(head.clone());
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                if path.starts_with("/hang") {
                    std::future::pending::<()>().await;
                }
                let (status, body) = if path.starts_with("/sample.mp4") { ("200 OK", video) } else { ("404 Not Found", Vec::new()) };
                let reply = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = socket.write_all(reply.as_bytes()).await;
                let _ = socket.write_all(&body).await;
            });
        }
    });
    (format!("http://{addr}"), seen)
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_media_is_off_by_default_and_fenced_when_on() {
    let env = TestEnv::new().await;
    let (base, seen) = serve().await;
    let sample = format!("{base}/sample.mp4");
    let refused = |(code, out, err): (i32, String, String), needle: &str| {
        assert_eq!(code, 2, "{out}{err}");
        assert!(err.contains(needle) && err.contains("nothing was enqueued"), "{err}");
        err
    };
    refused(env.cli(&["enqueue", &sample]).await, "http(s) media URIs are disabled");
    let on = [("HEIMDEX__MEDIA__ALLOW_HTTP", "true")];
    refused(env.cli_with(&on, &["enqueue", &sample]).await, "127.0.0.1, which is not a public address");
    let listed = [("HEIMDEX__MEDIA__ALLOW_HTTP", "true"), ("HEIMDEX__MEDIA__ALLOW_HOSTS", "127.0.0.1"), ("HEIMDEX__MEDIA__REMOTE_TIMEOUT_MS", "500")];
    let other = [("HEIMDEX__MEDIA__ALLOW_HTTP", "true"), ("HEIMDEX__MEDIA__ALLOW_HOSTS", "cdn.example")];
    refused(env.cli_with(&other, &["enqueue", &sample]).await, "host 127.0.0.1 is not in media.allow_hosts");
    // A server that accepts and never answers: the producer gives up after the read timeout.
    let started = Instant::now();
    refused(env.cli_with(&listed, &["enqueue", &format!("{base}/hang.mp4")]).await, "timed out");
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    let small = [listed[0], listed[1], ("HEIMDEX__MEDIA__MAX_REMOTE_BYTES", "1000")];
    refused(env.cli_with(&small, &["enqueue", &sample]).await, "larger than media.max_remote_bytes");
    // Credentials and signed queries are used, never shown.
    let secret = format!("{}/missing.mp4?sig=topsecret", base.replace("http://", "http://bob:hunter2@"));
    let err = refused(env.cli_with(&listed, &["enqueue", &secret]).await, "404");
    assert!(!err.contains("hunter2") && !err.contains("topsecret"), "{err}");
    assert!(seen.lock().unwrap().iter().any(|h| h.contains("Authorization: Basic") || h.contains("authorization: Basic")));

    // Allowed: downloaded, indexed from the download, the URL kept as the video's URI.
    let worker = env.spawn_worker("vision", "remote", &listed);
    env.wait_state(&worker, WorkerState::Warm, Duration::from_secs(120)).await;
    let signed = format!("{sample}?sig=topsecret");
    let (code, out, err) = env.cli_with(&listed, &["enqueue", &signed, "--kind", "vision", "--wait", "--timeout", "240"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (uri, frames, timings): (String, i64, serde_json::Value) = sqlx::query_as(
        "SELECT v.uri, (SELECT count(*) FROM frames f WHERE f.video_id = v.id), j.stage_timings FROM videos v JOIN jobs j ON j.video_id = v.id",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!((uri.as_str(), frames), (signed.as_str(), 25));
    assert!(timings["fetch"].as_f64().is_some(), "{timings}");
    assert!(!worker.log().contains("topsecret"), "{}", worker.log());
    drop(worker);
    env.cleanup().await;
}
