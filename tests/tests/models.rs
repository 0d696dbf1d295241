//! `heimdex-models download` as a user with internet meets it, against a local HTTP server that
//! serves the upstream files exactly as Hugging Face lays them out (`{repo}/resolve/{rev}/{path}`,
//! byte-identical copies from the bundle's sources, see `heimdex_tests::upstream`):
//! the pinned sources are fetched, Whisper's and MiniLM's graphs are built here, every file matches
//! its pin, a worker transcribes with them exactly as with the bundle, and any mismatch is refused
//! with nothing installed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use heimdex_models::catalog::{self, Build, File, MODELS, Model};
use heimdex_models::install::{InstallError, Installation, install};
use heimdex_models::registry::{parse_manifest, sha256_file};
use heimdex_shared::contract::TaskKind;
use heimdex_tests::{TestEnv, binary, models_dir, upstream};
use uuid::Uuid;

#[derive(Clone)]
struct Mirror {
    root: PathBuf,
    /// A path served with one byte changed.
    tampered: Option<String>,
    /// Every path requested, in order.
    requests: Arc<Mutex<Vec<String>>>,
    /// When set, each request waits (up to 2 s) for another to arrive before it is answered, so
    /// that two downloads that could overlap do.
    hold: Option<Arc<tokio::sync::Notify>>,
}

async fn serve_file(State(m): State<Mirror>, UrlPath(path): UrlPath<String>, headers: HeaderMap) -> Response {
    m.requests.lock().unwrap().push(path.clone());
    if let Some(hold) = &m.hold {
        let next = hold.notified();
        hold.notify_waiters();
        let _ = tokio::time::timeout(Duration::from_secs(2), next).await;
    }
    let Ok(mut body) = tokio::fs::read(m.root.join(&path)).await else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if m.tampered.as_deref() == Some(path.as_str()) {
        let middle = body.len() / 2;
        body[middle] ^= 1;
    }
    let start = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
    match start {
        Some(start) if start < body.len() => {
            let range = format!("bytes {start}-{}/{}", body.len() - 1, body.len());
            (StatusCode::PARTIAL_CONTENT, [(header::CONTENT_RANGE, range)], body[start..].to_vec()).into_response()
        }
        _ => body.into_response(),
    }
}

async fn start_mirror(tampered: Option<String>) -> (String, Mirror) {
    start_mirror_with(Mirror { root: upstream::mirror(), tampered, requests: Arc::default(), hold: None }).await
}

async fn start_mirror_with(mirror: Mirror) -> (String, Mirror) {
    let app = Router::new().route("/{*path}", get(serve_file)).with_state(mirror.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, mirror)
}

async fn download(dir: &Path, mirror: &str, kind: &str) -> (i32, String, String) {
    let out = tokio::process::Command::new(binary("heimdex-models"))
        .args(["download", "--kind", kind, "--mirror", mirror, "--dir"])
        .arg(dir)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("run heimdex-models");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn index_models() -> impl Iterator<Item = &'static Model> {
    MODELS.iter().filter(|m| m.kind == TaskKind::Index)
}

/// Runs sample.mp4's index task on a fresh worker-index that loads its models from `models`;
/// returns the transcript segments' texts and embeddings.
async fn transcribe_sample(env: &TestEnv, models: &Path, name: &str) -> Vec<(String, Vec<f32>)> {
    env.add_media("video/sample.mp4", name);
    let dir = models.display().to_string();
    let mut worker = env.spawn_worker("index", &format!("index-{name}"), &[("HEIMDEX__MODELS__DIR", &dir)]);
    let (video, job) = env.enqueue(name, TaskKind::Index, false).await.expect("enqueue");
    let row = env.wait_job(job, "succeeded", Duration::from_secs(180)).await;
    assert_eq!(row.attempts, 1);
    worker.signal("TERM");
    assert_eq!(worker.wait_exit(Duration::from_secs(60)).await, Some(0), "{}", worker.log());
    segments(env, video).await
}

async fn segments(env: &TestEnv, video: Uuid) -> Vec<(String, Vec<f32>)> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT text, embedding::text FROM transcript_segments WHERE video_id = $1 ORDER BY idx")
            .bind(video)
            .fetch_all(&env.pool)
            .await
            .expect("segments");
    rows.into_iter().map(|(text, v)| (text, v.trim_matches(['[', ']']).split(',').map(|x| x.parse().unwrap()).collect())).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

#[tokio::test]
async fn downloaded_models_are_pinned_built_here_and_transcribe_like_the_bundle() {
    let (url, mirror) = start_mirror(None).await;
    let dir = tempfile::tempdir().unwrap();

    let (code, stdout, stderr) = download(dir.path(), &url, "index").await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(stdout.matches("installed").count(), 3, "{stdout}");
    let manifest: Vec<(String, String)> = parse_manifest(&std::fs::read_to_string(dir.path().join("MANIFEST.sha256")).unwrap()).collect();
    let bundle: Vec<(String, String)> = parse_manifest(&std::fs::read_to_string(models_dir().join("MANIFEST.sha256")).unwrap()).collect();
    for File { path, sha256 } in index_models().flat_map(|m| m.files) {
        assert_eq!(sha256_file(&dir.path().join(path)).unwrap(), *sha256, "{path} matches its pin");
        assert!(manifest.contains(&(path.to_string(), sha256.to_string())), "{path} is in the manifest");
    }
    // What the bundle's Python build makes, the product makes byte for byte.
    for name in ["encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx", "mel_filters.f32", "tokenizer.json"] {
        let path = format!("whisper-base/{name}");
        let in_bundle = bundle.iter().find(|(p, _)| *p == path).map(|(_, s)| s.clone());
        assert_eq!(Some(sha256_file(&dir.path().join(&path)).unwrap()), in_bundle, "{path} equals the bundle's");
    }
    assert!(!dir.path().join(".downloads").exists(), "sources are removed once installed");
    let fetched = mirror.requests.lock().unwrap().len();
    let sources: usize = index_models().map(|m| m.sources.len()).sum();
    assert_eq!(fetched, sources, "each source fetched once: {:?}", mirror.requests.lock().unwrap());

    // A second run finds everything in place and fetches nothing.
    let (code, stdout, stderr) = download(dir.path(), &url, "index").await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(stdout.matches("present").count(), 3, "{stdout}");
    assert_eq!(mirror.requests.lock().unwrap().len(), fetched);

    // A worker-index on the downloaded folder writes what a worker on the bundle writes.
    let env = TestEnv::new().await;
    let downloaded = transcribe_sample(&env, dir.path(), "downloaded.mp4").await;
    let bundled = transcribe_sample(&env, &models_dir(), "bundled.mp4").await;
    let texts = |s: &[(String, Vec<f32>)]| s.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>();
    assert_eq!(texts(&downloaded), texts(&bundled));
    assert!(texts(&downloaded).join(" ").contains("Dashwood"), "{:?}", texts(&downloaded));
    for ((text, a), (_, b)) in downloaded.iter().zip(&bundled) {
        assert!(cosine(a, b) > 0.9999, "{text}: cosine {}", cosine(a, b));
    }
    env.cleanup().await;
}

#[tokio::test]
async fn a_source_that_does_not_match_its_pin_is_refused_and_nothing_is_installed() {
    let silero = MODELS.iter().find(|m| m.folder == "silero-vad").unwrap();
    let source = silero.sources[0];
    let served = format!("{}/resolve/{}/{}", source.repo, source.revision, source.path);
    let (url, _mirror) = start_mirror(Some(served.clone())).await;
    let dir = tempfile::tempdir().unwrap();
    let err = install(dir.path(), silero, Some(&url)).await.unwrap_err();
    assert!(matches!(err, InstallError::Download { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("sha256 mismatch") && message.contains(&served), "{message}");
    assert!(!dir.path().join("silero-vad").exists() && !dir.path().join("MANIFEST.sha256").exists());
}

#[tokio::test]
async fn a_built_file_that_does_not_match_its_pin_is_refused_and_nothing_is_installed() {
    let (url, _mirror) = start_mirror(None).await;
    let minilm = MODELS.iter().find(|m| m.build == Build::MiniLm).unwrap();
    let files: Vec<File> =
        minilm.files.iter().map(|f| if f.path.ends_with(".onnx") { catalog::File { path: f.path, sha256: "00" } } else { *f }).collect();
    let wrong = Model { files: Box::leak(files.into_boxed_slice()), ..*minilm };
    let dir = tempfile::tempdir().unwrap();
    let err = install(dir.path(), &wrong, Some(&url)).await.unwrap_err();
    assert!(matches!(err, InstallError::Mismatch { path: "minilm-l6-v2/model_fp32.onnx", .. }), "{err}");
    assert!(!dir.path().join("minilm-l6-v2").exists(), "no file of the folder is installed");
    assert!(!dir.path().join("MANIFEST.sha256").exists());
}

#[tokio::test]
async fn an_upstream_file_that_is_not_there_fails_naming_its_url_and_keeps_what_was_installed() {
    // The mirror has YuNet but not SigLIP (no registry ships SigLIP's weights).
    let (url, _mirror) = start_mirror(None).await;
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = download(dir.path(), &url, "vision").await;
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(stdout.contains("installed") && stdout.contains("yunet"), "{stdout}");
    let siglip = upstream::model("siglip-base-patch16-224").sources[0];
    assert!(stderr.contains(&siglip.url(Some(&url))) && stderr.contains("404"), "{stderr}");
    assert!(dir.path().join("yunet/face_detection_yunet_2023mar.onnx").is_file());
    assert!(!dir.path().join("siglip-base-patch16-224").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn two_installs_into_one_folder_take_turns() {
    let hold = Some(Arc::new(tokio::sync::Notify::new()));
    let (url, mirror) = start_mirror_with(Mirror { root: upstream::mirror(), tampered: None, requests: Arc::default(), hold }).await;
    let dir = tempfile::tempdir().unwrap();
    let silero = upstream::model("silero-vad");
    let (a, b) = tokio::join!(install(dir.path(), silero, Some(&url)), install(dir.path(), silero, Some(&url)));
    let mut outcomes = [a.expect("first install"), b.expect("second install")];
    outcomes.sort_by_key(|o| *o == Installation::Present);
    assert_eq!(outcomes, [Installation::Installed, Installation::Present], "the second waited, then found the model");
    assert_eq!(mirror.requests.lock().unwrap().len(), 1, "one download: {:?}", mirror.requests.lock().unwrap());
    let file = silero.files[0];
    assert_eq!(sha256_file(&dir.path().join(file.path)).unwrap(), file.sha256);
}
