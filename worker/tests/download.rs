//! The model downloader against a local HTTP server: fresh download, resume from a partial file via
//! an HTTP Range request, and a checksum mismatch refused (nothing installed).

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use heimdex_worker::engine::download::{DownloadError, fetch};
use sha2::{Digest, Sha256};

#[derive(Clone)]
struct Server {
    body: Arc<Vec<u8>>,
    /// Range headers the server received, to prove the client resumed.
    ranges: Arc<Mutex<Vec<Option<String>>>>,
}

async fn serve_file(State(s): State<Server>, headers: HeaderMap) -> impl IntoResponse {
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_string);
    s.ranges.lock().unwrap().push(range.clone());
    let start = range.as_deref().and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
    match start {
        Some(start) if start < s.body.len() => (
            StatusCode::PARTIAL_CONTENT,
            [(header::CONTENT_RANGE, format!("bytes {start}-{}/{}", s.body.len() - 1, s.body.len()))],
            s.body[start..].to_vec(),
        ),
        _ => (StatusCode::OK, [(header::CONTENT_RANGE, String::new())], s.body.to_vec()),
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

#[tokio::test]
async fn fresh_download_is_verified_and_installed() {
    let (url, server) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m/model.onnx");
    let got = fetch(&url, &dest, Some(&sha(&server.body))).await.unwrap();
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
    fetch(&url, &dest, Some(&sha(&server.body))).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), *server.body);
    assert_eq!(*server.ranges.lock().unwrap(), vec![Some("bytes=123456-".to_string())]);
}

#[tokio::test]
async fn a_checksum_mismatch_is_refused_and_nothing_is_installed() {
    let (url, _server) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("model.onnx");
    let err = fetch(&url, &dest, Some(&"ab".repeat(32))).await.unwrap_err();
    assert!(matches!(err, DownloadError::Checksum { .. }), "{err}");
    assert!(err.to_string().contains("sha256 mismatch"));
    assert!(!dest.exists() && !dir.path().join("model.onnx.part").exists());
}
