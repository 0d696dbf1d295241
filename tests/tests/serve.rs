//! `heimdex serve`: the HTTP API enqueues, reads jobs, searches and exports transcripts against a real fleet,
//! refuses bad requests with a 4xx and a reason, and its status page, rendered by headless Chromium
//! (Debian's package), shows the fleet.

use std::time::Duration;

use heimdex_shared::fleet::WorkerState;
use heimdex_tests::{TestEnv, http, http_get, words_found};
use serde_json::Value;

const WARM: Duration = Duration::from_secs(180);
const TASK: Duration = Duration::from_secs(300);
/// The status page's colour for `warm` (its badge and the warm-up bar): `#1a7f37`.
const WARM_RGB: [u8; 3] = [0x1a, 0x7f, 0x37];

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_enqueues_reads_jobs_searches_exports_transcripts_and_the_status_page_shows_the_fleet() {
    let env = TestEnv::new().await;
    env.add_media("video/sample.mp4", "talk.mp4");
    let index = env.spawn_worker("index", "api-index", &[]);
    let vision = env.spawn_worker("vision", "api-vision", &[]);
    let (_server, addr) = env.serve().await;

    // Bad requests: a 4xx with the reason, and nothing written.
    let refused = [
        ("POST", "/v1/videos", Some("{not json"), 400, "json"),
        ("POST", "/v1/videos", Some(r#"{"uri": "missing.mp4"}"#), 422, "not found"),
        ("POST", "/v1/videos", Some(r#"{"uri": "talk.mp4", "colour": "red"}"#), 400, "unknown field"),
        ("POST", "/v1/videos", Some(r#"{"uri": "talk.mp4", "kinds": ["audio"]}"#), 400, "unknown variant"),
        ("POST", "/v1/videos", Some(r#"{"uri": "talk.mp4", "frame_rate": 0}"#), 400, "frame_rate"),
        ("GET", "/v1/jobs/42", None, 400, "not a uuid"),
        ("GET", "/v1/jobs/8f0e7c57-2f4b-4d7e-9a55-1b2a3c4d5e6f", None, 404, "no job"),
        ("GET", "/v1/videos/8f0e7c57-2f4b-4d7e-9a55-1b2a3c4d5e6f/transcript", None, 404, "no video"),
        ("GET", "/v1/nothing", None, 404, "no such route"),
    ];
    for (method, path, body, status, reason) in refused {
        let (code, answer) = http(&addr, method, path, body).await;
        assert_eq!(code, status, "{method} {path} {body:?}: {answer}");
        let error = json(&answer)["error"].as_str().unwrap_or_default().to_lowercase();
        assert!(error.contains(reason), "{method} {path}: {error:?} should say {reason:?}");
    }
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&env.pool).await.unwrap();
    assert_eq!(jobs, 0, "a refused request writes nothing");

    // Enqueue both kinds, follow the jobs, export the transcript.
    env.wait_state(&index, WorkerState::Warm, WARM).await;
    env.wait_state(&vision, WorkerState::Warm, WARM).await;
    let (code, answer) = http(&addr, "POST", "/v1/videos", Some(r#"{"uri": "talk.mp4", "language": "en"}"#)).await;
    assert_eq!(code, 202, "{answer}");
    let enqueued = json(&answer);
    let video = enqueued["video_id"].as_str().unwrap().to_string();
    let job_ids: Vec<String> = enqueued["jobs"].as_array().unwrap().iter().map(|j| j["job_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(job_ids.len(), 2, "{answer}");
    for id in &job_ids {
        let job = env
            .wait_for("the job to succeed", TASK, || async {
                let (code, body) = http_get(&addr, &format!("/v1/jobs/{id}")).await;
                assert_eq!(code, 200, "{body}");
                let job = json(&body);
                assert!(!["failed", "dead"].contains(&job["status"].as_str().unwrap()), "{job}");
                (job["status"] == "succeeded").then_some(job)
            })
            .await;
        assert!(job["stage_timings"].as_object().is_some_and(|stages| !stages.is_empty()), "stage timings: {job}");
    }
    let (code, srt) = http_get(&addr, &format!("/v1/videos/{video}/transcript?format=srt")).await;
    assert_eq!(code, 200, "{srt}");
    assert!(srt.starts_with("1\n00:00:0"), "{srt}");
    assert!(srt.to_lowercase().contains("dashwood"), "the sample's words: {srt}");
    let (code, answer) = http_get(&addr, &format!("/v1/videos/{video}/transcript?format=doc")).await;
    assert_eq!(code, 400, "{answer}");

    // Search: a paraphrase of one of the sample's sentences through worker-index's text model, frames
    // by text through worker-vision's SigLIP stand-in (plumbing only: its towers are not trained
    // together), and frames like a stored frame, which is itself first.
    let (code, body) = http_get(&addr, "/v1/search?q=the%20young%20fellow%20was%20not%20unkind&limit=3").await;
    assert_eq!(code, 200, "{body}");
    let found = json(&body);
    let top = found["hits"][0]["text"].as_str().unwrap_or_default();
    assert_eq!(words_found("he was not an ill disposed young man", top), 1.0, "{found:#}");
    assert_eq!(found["hits"][0]["video_id"], video.as_str());
    let (code, body) = http_get(&addr, &format!("/v1/search?q=a%20cat&in=frames&video={video}&limit=5")).await;
    assert_eq!(code, 200, "{body}");
    let scores: Vec<f64> = json(&body)["hits"].as_array().unwrap().iter().map(|h| h["score"].as_f64().unwrap()).collect();
    assert_eq!(scores.len(), 5, "{body}");
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "ordered by cosine: {scores:?}");
    let (code, body) = http_get(&addr, &format!("/v1/search?similar_to={video}@13&limit=3")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["hits"][0]["ts_s"].as_f64(), Some(13.0), "the frame itself first: {body}");
    for (path, status, reason) in [
        ("/v1/search", 400, "required"),
        ("/v1/search?q=x&limit=0", 400, "limit"),
        ("/v1/search?q=x&in=audio", 400, "segments or frames"),
        ("/v1/search?q=x&video=nothing.mp4", 404, "no video"),
        ("/v1/search?similar_to=talk.mp4", 400, "video@seconds"),
    ] {
        let (code, answer) = http_get(&addr, path).await;
        assert_eq!(code, status, "{path}: {answer}");
        assert!(json(&answer)["error"].as_str().unwrap_or_default().to_lowercase().contains(reason), "{path}: {answer}");
    }

    // The status as JSON, then the page as a browser shows it.
    let (code, body) = http_get(&addr, "/v1/status").await;
    assert_eq!(code, 200, "{body}");
    let status = json(&body);
    let warm: Vec<&str> =
        status["workers"].as_array().unwrap().iter().filter(|w| w["state"] == "warm").map(|w| w["id"].as_str().unwrap()).collect();
    assert_eq!(warm.len(), 2, "{status}");
    assert_eq!(status["recent"].as_array().unwrap().len(), 2, "{status}");

    let shots = tempfile::tempdir().unwrap();
    let (dom, rgb) = heimdex_tests::render_page(&format!("http://{addr}/"), &shots.path().join("status.png"), 1400, 1000);
    for text in ["api-index", "api-vision", "talk.mp4", &env.topology().dlq(heimdex_shared::contract::TaskKind::Vision), "succeeded"] {
        assert!(dom.contains(text), "the rendered page lacks {text:?}:\n{dom}");
    }
    assert_eq!(dom.matches("state warm").count(), 2, "two warm badges:\n{dom}");
    // Two warm badges and two full warm-up bars, painted in the warm colour.
    let painted = rgb.chunks_exact(3).filter(|p| *p == WARM_RGB).count();
    assert!(painted > 2_000, "only {painted} pixels in the warm colour: the fleet is not on the screenshot");
    env.cleanup().await;
}
