//! The model downloader against a local HTTP server: fresh download, resume from a partial file via
//! an HTTP Range request, a checksum mismatch refused (nothing installed); and against hostile or
//! broken servers: a complete or oversized `.part` is checked, not re-requested (a real server
//! answers a Range past the end with 416); no file grows past its pinned size, whatever
//! `Content-Length` says or when there is none; a silent server and a slow drip are cut off.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use heimdex_models::download::{DownloadError, Limits, Pin, fetch};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone)]
struct Server {
    body: Arc<Vec<u8>>,
    /// Range headers the server received, to prove the client resumed.
    ranges: Arc<Mutex<Vec<Option<String>>>>,
}

/// Serves the body as a real server does: 206 for a range inside it, 416 for one past its end.
async fn serve_file(State(s): State<Server>, headers: HeaderMap) -> impl IntoResponse {
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_string);
    s.ranges.lock().unwrap().push(range.clone());
    let start = range.as_deref().and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
    let len = s.body.len();
    match start {
        Some(start) if start < len => {
            (StatusCode::PARTIAL_CONTENT, [(header::CONTENT_RANGE, format!("bytes {start}-{}/{len}", len - 1))], s.body[start..].to_vec())
        }
        Some(_) => (StatusCode::RANGE_NOT_SATISFIABLE, [(header::CONTENT_RANGE, format!("bytes */{len}"))], Vec::new()),
        None => (StatusCode::OK, [(header::CONTENT_RANGE, String::new())], s.body.to_vec()),
    }
}

async fn start() -> (String, Server) {
    let body: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let server = Server { body: Arc::new(body), ranges: Arc::default() };
    let app = Router::new().route("/model.onnx", get(serve_file)).with_state(server.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/model.onnx", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, server)
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn pin(body: &[u8]) -> (String, u64) {
    (sha(body), body.len() as u64)
}

async fn get_file(url: &str, dest: &std::path::Path, body: &[u8]) -> Result<String, DownloadError> {
    let (sha256, size) = pin(body);
    fetch(url, dest, Pin { sha256: &sha256, size }, Limits::default()).await
}

#[tokio::test]
async fn fresh_download_is_verified_and_installed() {
    let (url, server) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m/model.onnx");
    let got = get_file(&url, &dest, &server.body).await.unwrap();
    assert_eq!(got, sha(&server.body));
    assert_eq!(std::fs::read(&dest).unwrap(), *server.body);
    assert_eq!(*server.ranges.lock().unwrap(), vec![None]);
    assert!(!dir.path().join("m/model.onnx.part").exists());
}

#[tokio::test]
async fn an_interrupted_download_resumes_with_a_range_request() {
    let (url, server) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("model.onnx");
    std::fs::write(dir.path().join("model.onnx.part"), &server.body[..123_456]).unwrap();
    get_file(&url, &dest, &server.body).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), *server.body);
    assert_eq!(*server.ranges.lock().unwrap(), vec![Some("bytes=123456-".to_string())]);
}

#[tokio::test]
async fn a_checksum_mismatch_is_refused_and_nothing_is_installed() {
    let (url, server) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("model.onnx");
    let wrong = "ab".repeat(32);
    let err = fetch(&url, &dest, Pin { sha256: &wrong, size: server.body.len() as u64 }, Limits::default()).await.unwrap_err();
    assert!(matches!(err, DownloadError::Checksum { .. }), "{err}");
    assert!(err.to_string().contains("sha256 mismatch"));
    assert!(!dest.exists() && !dir.path().join("model.onnx.part").exists());
}

#[tokio::test]
async fn a_complete_part_is_checked_and_installed_without_a_request() {
    let (url, server) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("model.onnx");
    std::fs::write(dir.path().join("model.onnx.part"), &*server.body).unwrap();
    let got = get_file(&url, &dest, &server.body).await.expect("a whole .part is the file, not a 416");
    assert_eq!(got, sha(&server.body));
    assert_eq!(std::fs::read(&dest).unwrap(), *server.body);
    assert!(server.ranges.lock().unwrap().is_empty(), "nothing was asked of the server: {:?}", server.ranges.lock().unwrap());
}

#[tokio::test]
async fn an_oversized_or_wrong_part_is_discarded_and_the_file_fetched_whole() {
    let (url, server) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("model.onnx");
    let mut oversized = server.body.to_vec();
    oversized.extend_from_slice(b"trailing bytes of a bad earlier run");
    std::fs::write(dir.path().join("model.onnx.part"), &oversized).unwrap();
    get_file(&url, &dest, &server.body).await.expect("an oversized .part is checked, then replaced");
    assert_eq!(std::fs::read(&dest).unwrap(), *server.body);
    assert_eq!(*server.ranges.lock().unwrap(), vec![None], "one request, from the start");

    // A longer .part that is not the file, from a server that sends more than the pin: refused, discarded.
    let dest = dir.path().join("again.onnx");
    std::fs::write(dir.path().join("again.onnx.part"), &server.body[..1000]).unwrap();
    let err = get_file(&url, &dest, &server.body[..500]).await.unwrap_err();
    assert!(matches!(err, DownloadError::TooLarge { size: 500 }), "{err}");
    assert!(!dir.path().join("again.onnx.part").exists(), "a .part that cannot be the file is discarded");

    // A server that answers 416 (it lacks the bytes the .part asks for): the .part is discarded, so
    // the next run starts over instead of failing the same way forever.
    std::fs::write(dir.path().join("again.onnx.part"), &*server.body).unwrap();
    let (sha256, size) = (sha(b"a longer file"), server.body.len() as u64 + 1);
    let err = fetch(&url, &dest, Pin { sha256: &sha256, size }, Limits::default()).await.unwrap_err();
    assert!(matches!(err, DownloadError::Status(StatusCode::RANGE_NOT_SATISFIABLE)), "{err}");
    assert!(!dir.path().join("again.onnx.part").exists());
}

/// A raw HTTP server: answers every request with `head`, then writes `chunk` every `every` until the
/// client hangs up (or forever); counts the bytes it managed to send.
async fn raw_server(head: &'static str, chunk: &'static [u8], every: Duration) -> (String, Arc<Mutex<u64>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/model.onnx", listener.local_addr().unwrap());
    let sent = Arc::new(Mutex::new(0u64));
    let counter = sent.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                loop {
                    if socket.write_all(chunk).await.is_err() {
                        return;
                    }
                    *counter.lock().unwrap() += chunk.len() as u64;
                    tokio::time::sleep(every).await;
                }
            });
        }
    });
    (url, sent)
}

const ENDLESS: &str = "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n";
static ZEROS: [u8; 16 * 1024] = [0; 16 * 1024];

#[tokio::test]
async fn no_file_grows_past_its_pinned_size() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("model.onnx");
    let sha256 = "ab".repeat(32);
    // No Content-Length, an endless body: cut at the pinned size.
    let (url, sent) = raw_server(ENDLESS, &ZEROS, Duration::ZERO).await;
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(60), fetch(&url, &dest, Pin { sha256: &sha256, size: 100_000 }, Limits::default()))
        .await
        .expect("an endless body is cut off at the pinned size")
        .unwrap_err();
    assert!(matches!(err, DownloadError::TooLarge { size: 100_000 }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    assert!(!dest.exists() && !dir.path().join("model.onnx.part").exists());
    assert!(*sent.lock().unwrap() < 50_000_000, "the client stopped reading");

    // A Content-Length above the pin is refused before the body.
    let head = "HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n";
    let (url, _) = raw_server(head, b"x", Duration::from_secs(3600)).await;
    let err = fetch(&url, &dest, Pin { sha256: &sha256, size: 100_000 }, Limits::default()).await.unwrap_err();
    assert!(matches!(err, DownloadError::TooLarge { .. }), "{err}");
    assert!(!dir.path().join("model.onnx.part").exists());
}

#[tokio::test]
async fn a_silent_server_and_a_slow_drip_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("model.onnx");
    let sha256 = "ab".repeat(32);
    let limits = Limits { connect: Duration::from_secs(5), read: Duration::from_secs(1), min_rate: 100_000 };
    // Headers, one byte, then silence: the read deadline.
    let (url, _) = raw_server(ENDLESS, b"x", Duration::from_secs(3600)).await;
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(60), fetch(&url, &dest, Pin { sha256: &sha256, size: 100_000 }, limits))
        .await
        .expect("a silent server is cut off by the read deadline")
        .unwrap_err();
    assert!(matches!(err, DownloadError::Http(ref e) if e.is_timeout()), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());

    // A byte every 100 ms never trips the read deadline; the overall one (1 s + 1 s) stops it.
    let (url, _) = raw_server(ENDLESS, b"x", Duration::from_millis(100)).await;
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(60), fetch(&url, &dest, Pin { sha256: &sha256, size: 100_000 }, limits))
        .await
        .expect("a slow drip is cut off by the overall deadline")
        .unwrap_err();
    assert!(matches!(err, DownloadError::Deadline(d) if d == Duration::from_secs(2)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}
