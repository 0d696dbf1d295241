//! Search and query embeddings from the warm workers, against the real broker, database, workers and
//! models: a paraphrase finds the sample video's sentence; a query is answered while the worker is
//! busy with a long task; no warm worker is a clear error at once; a malformed query gets an error
//! reply; frames by text and `--similar-to`; the plans use the partial HNSW and full-text indexes.
//!
//! Frames by text run through the bundle's SigLIP *stand-in*, whose towers were not trained together:
//! those checks prove the plumbing (the query vector is the text tower's output for the text, the hits
//! are ordered by cosine), not that the frames found show what the text says.

use std::sync::Arc;
use std::time::{Duration, Instant};

use heimdex_shared::Settings;
use heimdex_shared::contract::TaskKind;
use heimdex_shared::fleet::WorkerState;
use heimdex_shared::jobs::JobStatus;
use heimdex_shared::query::{EmbedRequest, QueryClient, QueryError, RefusalCode};
use heimdex_tests::{TestEnv, WorkerProcess, words_found};
use serde_json::Value;
use uuid::Uuid;

const WARM: Duration = Duration::from_secs(180);
const INDEXED: Duration = Duration::from_secs(300);
/// How soon "no warm worker" must be told: far below the query timeout (10 s).
const AT_ONCE: Duration = Duration::from_secs(3);

/// The sentence of sample.mp4 spoken from 7.10 s to 10.09 s (`media/video/sample.json`).
const SENTENCE: &str = "he was not an ill disposed young man";
const SENTENCE_S: (f64, f64) = (7.10, 10.09);

/// Starts a worker of `kind` and waits until it is warm and consuming its query queue.
async fn warm_worker(env: &TestEnv, kind: TaskKind, id: &str, extra: &[(&str, &str)]) -> WorkerProcess {
    let worker = env.spawn_worker(kind.as_str(), id, extra);
    env.wait_state(&worker, WorkerState::Warm, WARM).await;
    let queue = env.topology().query_queue(kind);
    env.wait_for("the worker consuming its query queue", WARM, || async { (env.queue(&queue).await.1 == 1).then_some(()) }).await;
    worker
}

/// Enqueues `name` for `kind` and waits until its job succeeded; returns the video id.
async fn indexed(env: &TestEnv, name: &str, kind: TaskKind) -> Uuid {
    let (video, job) = env.enqueue(name, kind, false).await.expect("enqueue");
    env.wait_job(job, "succeeded", INDEXED).await;
    video
}

/// Runs `heimdex search ARGS --json` and returns its JSON, asserting exit code 0.
async fn search_json(env: &TestEnv, args: &[&str]) -> Value {
    let mut all = vec!["search", "--json"];
    all.extend_from_slice(args);
    let (code, out, err) = env.cli(&all).await;
    assert_eq!(code, 0, "heimdex {all:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("heimdex {all:?}: {e}: {out}"))
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

fn parse_vector(text: &str) -> Vec<f32> {
    text.trim_matches(['[', ']']).split(',').map(|x| x.parse().expect("a float")).collect()
}

/// The plan of every statement a search function runs, as auto_explain tells it to the client.
fn plans(env: &TestEnv, call: &str) -> String {
    let script = format!(
        "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on;
         SET auto_explain.log_level = notice; SET client_min_messages = notice;
         -- a handful of rows: without this the planner rightly prefers reading them all
         SET enable_seqscan = off;
         {call};"
    );
    let out = std::process::Command::new("psql")
        .args([env.settings.database.url.expose(), "-v", "ON_ERROR_STOP=1", "-c", &script])
        .output()
        .expect("psql (PostgreSQL's client)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paraphrase_finds_the_sample_videos_sentence() {
    let env = TestEnv::new().await;
    env.add_media("video/sample.mp4", "sample.mp4");
    let worker = warm_worker(&env, TaskKind::Index, "search-i", &[]).await;
    let video = indexed(&env, "sample.mp4", TaskKind::Index).await;
    let stored: Vec<(i32, f64, f64, String, String)> =
        sqlx::query_as("SELECT idx, start_s, end_s, text, embedding::text FROM transcript_segments WHERE video_id = $1 ORDER BY idx")
            .bind(video)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let transcript: Vec<_> = stored.iter().map(|s| (s.1, s.2, s.3.as_str())).collect();

    // Said otherwise, sharing no word with it that full-text search would match as a whole.
    let json = search_json(&env, &["the young fellow was not unkind", "--limit", "3"]).await;
    assert_eq!(json["in"], "segments");
    assert_eq!(json["model"], env.settings.index.embed_model.as_str());
    let top = &json["hits"][0];
    eprintln!("paraphrase: {:#}", json["hits"]);
    let text = top["text"].as_str().unwrap_or_default();
    assert_eq!(words_found(SENTENCE, text), 1.0, "the top hit holds the sentence: {json:#}\ntranscript: {transcript:?}");
    let (start, end) = (top["start_s"].as_f64().unwrap(), top["end_s"].as_f64().unwrap());
    // Whisper's timestamps are 20 ms steps and a segment may hold a neighbouring sentence too.
    assert!(start <= SENTENCE_S.0 + 0.5 && end >= SENTENCE_S.1 - 0.5, "{start}–{end} s should span {SENTENCE_S:?}: {transcript:?}");
    assert!(start >= SENTENCE_S.0 - 8.0 && end <= SENTENCE_S.1 + 8.0, "{start}–{end} s is more than that sentence: {transcript:?}");
    assert_eq!(top["video_id"], video.to_string());
    assert!(top["uri"].as_str().unwrap().ends_with("/sample.mp4"), "{top}");
    assert_eq!(top["semantic_rank"], 1, "{json:#}");
    assert_eq!(top["text_rank"], Value::Null, "no full-text match: {json:#}");
    let scores: Vec<f64> = json["hits"].as_array().unwrap().iter().map(|h| h["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");

    // A word of the first sentence: first by words and by meaning, fused (1/61 + 1/61).
    let json = search_json(&env, &["Dashwood", "--video", "sample.mp4"]).await;
    let top = &json["hits"][0];
    assert!(top["text"].as_str().unwrap().to_lowercase().contains("dashwood"), "{json:#}");
    assert_eq!(top["text_rank"], 1, "{json:#}");
    assert!((top["score"].as_f64().unwrap() - (1.0 / 61.0 + 1.0 / (60.0 + top["semantic_rank"].as_f64().unwrap()))).abs() < 1e-9);
    // The hit carries the matching word with its time (word timestamps are on by default), inside its
    // segment, and the text output says where to jump to.
    let words = top["words"].as_array().unwrap();
    assert_eq!(words.len(), 1, "one word of the segment matches: {top:#}");
    assert!(words[0]["text"].as_str().unwrap().to_lowercase().starts_with("dashwood"), "{top:#}");
    let at = words[0]["start_s"].as_f64().unwrap();
    assert!(at >= top["start_s"].as_f64().unwrap() - 0.5 && at <= top["end_s"].as_f64().unwrap(), "{top:#}");
    let (code, out, err) = env.cli(&["search", "Dashwood", "--video", "sample.mp4", "--limit", "1"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!(" at {at:.2} s)")), "the first matching word's time: {out}");

    // The query vector is the one the task stored for the same text (same model, same thread).
    let client = QueryClient::connect(&env.settings).await.unwrap();
    let (_, _, _, text, embedding) = &stored[0];
    let queried = client.embed(TaskKind::Index, Some(&env.settings.index.embed_model), vec![text.clone()]).await.unwrap();
    assert_eq!(queried.dim, 384);
    let similarity = cosine(&queried.vectors[0], &parse_vector(embedding));
    assert!(similarity > 0.999, "cosine {similarity} between the query vector and the stored one of {text:?}");

    // Refusals: an unknown video, a model the worker does not serve.
    let (code, _, err) = env.cli(&["search", "anything", "--video", "missing.mp4"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no video \"missing.mp4\""), "{err}");
    let e = client.embed(TaskKind::Index, Some("another/model"), vec!["x".into()]).await.unwrap_err();
    assert!(matches!(&e, QueryError::Refused { refusal, .. } if refusal.code == RefusalCode::WrongModel), "{e:?}");

    // The plans: the partial HNSW index of the model, and the full-text index.
    let call = format!(
        "SELECT count(*) FROM heimdex_search_segments((SELECT embedding FROM transcript_segments LIMIT 1), 'young man', '{}', 5)",
        env.settings.index.embed_model
    );
    let plan = plans(&env, &call);
    assert!(plan.contains("Index Scan using transcript_segments_hnsw_"), "{plan}");
    assert!(plan.contains("Order By: ((embedding)::halfvec(384) <=>"), "{plan}");
    assert!(plan.contains("Bitmap Index Scan on transcript_segments_text_search"), "{plan}");
    drop(worker);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_is_answered_while_the_worker_is_busy_and_a_malformed_one_gets_an_error() {
    let env = TestEnv::new().await;
    env.add_long_video("long.mp4");
    // One task at a time: the long video holds the only task permit.
    let mut worker = warm_worker(&env, TaskKind::Index, "busy-i", &[("HEIMDEX__WORKER__CONCURRENCY", "1")]).await;
    let client = QueryClient::connect(&env.settings).await.unwrap();
    let model = env.settings.index.embed_model.clone();

    for (body, says) in [
        (b"not json".to_vec(), "not a JSON request"),
        (br#"{"v":1,"texts":[]}"#.to_vec(), "0 given"),
        (br#"{"v":2,"texts":["x"]}"#.to_vec(), "version 2"),
        (format!(r#"{{"v":1,"texts":["{}"]}}"#, "x".repeat(3000)).into_bytes(), "characters"),
        (vec![b'x'; 200_000], "over the limit"),
    ] {
        let refusal = client.request(TaskKind::Index, &body).await.unwrap().into_result().unwrap_err();
        assert_eq!(refusal.code, RefusalCode::BadRequest, "{refusal}");
        assert!(refusal.reason.contains(says), "{says}: {refusal}");
    }
    let good = EmbedRequest::new(vec!["a red car".into(), "a blue bicycle".into()], Some(model.clone()));
    let embedded = client.request(TaskKind::Index, &good.to_body()).await.unwrap().into_result().unwrap();
    assert_eq!((embedded.vectors.len(), embedded.dim, embedded.model.as_str()), (2, 384, model.as_str()));
    assert!(worker.child.try_wait().unwrap().is_none(), "the worker still runs:\n{}", worker.log());

    let (_, job) = env.enqueue("long.mp4", TaskKind::Index, false).await.unwrap();
    env.wait_job(job, "running", WARM).await;
    let asked = Instant::now();
    let answer = client.embed(TaskKind::Index, Some(&model), vec!["he was not an ill disposed young man".into()]).await;
    let took = asked.elapsed();
    let status = env.job(job).await.unwrap().status;
    let answer = answer.unwrap_or_else(|e| panic!("{e:?}\n{}", worker.log()));
    assert_eq!(status, JobStatus::Running, "the long task still runs when the answer arrives ({took:?})");
    let norm: f32 = answer.vectors[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "a unit vector: {norm}");
    assert!(took < Duration::from_secs(5), "answered in {took:?} beside a long task");
    eprintln!("query answered in {took:?} while the worker's only task permit was held by a long task");

    worker.signal("TERM");
    worker.wait_exit(Duration::from_secs(60)).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_warm_worker_is_a_clear_error_at_once() {
    let env = TestEnv::new().await;
    for (kind, target) in [("index", "segments"), ("vision", "frames")] {
        let asked = Instant::now();
        let (code, out, err) = env.cli(&["search", "a red car", "--in", target]).await;
        assert_eq!(code, 3, "{out}{err}");
        assert!(err.contains(&format!("no warm {kind} worker is answering queries")), "{err}");
        assert!(asked.elapsed() < AT_ONCE, "told after {:?}", asked.elapsed());
    }

    // A worker that is still warming does not answer either.
    let release = env.media.path().join("release-warmup");
    let hold = format!("hold_warmup:{}", release.display());
    let mut worker = env.spawn_worker("index", "late-i", &[("HEIMDEX__WORKER__FAILPOINT", hold.as_str())]);
    env.wait_state(&worker, WorkerState::Warming, WARM).await;
    let asked = Instant::now();
    let (code, _, err) = env.cli(&["search", "a red car"]).await;
    assert_eq!(code, 3, "{err}");
    assert!(asked.elapsed() < AT_ONCE, "told after {:?}", asked.elapsed());

    // Warm: answered (nothing is indexed, so no hits).
    std::fs::write(&release, b"").unwrap();
    env.wait_state(&worker, WorkerState::Warm, WARM).await;
    let queue = env.topology().query_queue(TaskKind::Index);
    env.wait_for("the query consumer", WARM, || async { (env.queue(&queue).await.1 == 1).then_some(()) }).await;
    let (code, out, err) = env.cli(&["search", "a red car"]).await;
    assert_eq!(code, 0, "{err}\n{}", worker.log());
    assert!(out.contains(": 0 hits"), "{out}");

    // Stopped: its consumer is gone, and the error is told at once again.
    worker.signal("TERM");
    assert_eq!(worker.wait_exit(Duration::from_secs(60)).await, Some(0), "{}", worker.log());
    assert_eq!(env.queue(&queue).await.1, 0);
    let asked = Instant::now();
    let (code, _, err) = env.cli(&["search", "a red car"]).await;
    assert_eq!(code, 3, "{err}");
    assert!(asked.elapsed() < AT_ONCE, "told after {:?}", asked.elapsed());
    env.cleanup().await;
}

/// The SigLIP text tower's own output for `text`, loaded in this process as the worker loads it.
async fn text_tower(settings: &Settings, text: &str) -> Vec<f32> {
    use heimdex_models::registry::ModelRegistry;
    use heimdex_worker::engine::Engine;
    use heimdex_worker::pipeline::LoadContext;
    use heimdex_worker::vision::VisionPipeline;
    let mut settings = settings.clone();
    settings.engine.intra_threads = 1; // as TestEnv gives the worker
    let engine = Engine::new(settings.engine.clone(), Arc::new(heimdex_worker::metrics::Metrics::new())).expect("onnx runtime");
    let models = ModelRegistry::open(&settings.models.dir).expect("model directory");
    let vision = VisionPipeline::load(&LoadContext { settings: &settings, engine: &engine, models: &models }).expect("vision pipeline");
    vision.embed_text(text).await.expect("text tower")
}

#[tokio::test(flavor = "multi_thread")]
async fn frames_by_text_and_similar_frames_through_the_siglip_stand_in() {
    let env = TestEnv::new().await;
    env.add_media("video/sample.mp4", "sample.mp4");
    let worker = warm_worker(&env, TaskKind::Vision, "search-v", &[]).await;
    let video = indexed(&env, "sample.mp4", TaskKind::Vision).await;
    let model = env.settings.vision.embed_model.clone();
    let stored: Vec<(i32, f64, String)> = sqlx::query_as("SELECT idx, ts_s, embedding::text FROM frames WHERE video_id = $1 ORDER BY idx")
        .bind(video)
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(stored.len(), 25);

    // The query vector is the text tower's output for the text (plumbing: the stand-in's towers are
    // not trained together, so which frames come first says nothing about their content).
    let text = "a photo of an astronaut";
    let client = QueryClient::connect(&env.settings).await.unwrap();
    let queried = client.embed(TaskKind::Vision, Some(&model), vec![text.into()]).await.unwrap();
    let direct = text_tower(&env.settings, text).await;
    assert_eq!(queried.dim, direct.len());
    let most = queried.vectors[0].iter().zip(&direct).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(most <= 1e-6, "the worker's vector differs from the text tower's by up to {most}");

    // Hits ordered by cosine, with the cosine of the query and each stored frame as their score.
    let json = search_json(&env, &[text, "--in", "frames", "--limit", "25"]).await;
    assert_eq!(json["model"], model.as_str());
    let hits = json["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 25, "{json:#}");
    let exact: Vec<f64> = stored.iter().map(|(_, _, e)| cosine(&direct, &parse_vector(e))).collect();
    let mut previous = f64::INFINITY;
    for hit in hits {
        let idx = hit["idx"].as_i64().unwrap() as usize;
        let score = hit["score"].as_f64().unwrap();
        assert!((score - exact[idx]).abs() < 1e-4, "frame {idx}: score {score}, cosine {}", exact[idx]);
        assert!(score <= previous + 1e-12, "ordered by cosine: {json:#}");
        previous = score;
        let (ts, start, end) =
            (hit["ts_s"].as_f64().unwrap(), hit["scene_start_s"].as_f64().unwrap(), hit["scene_end_s"].as_f64().unwrap());
        assert!(start <= ts && ts <= end, "the frame lies in its scene's range: {hit}");
    }
    let best = exact.iter().cloned().fold(f64::MIN, f64::max);
    assert!((hits[0]["score"].as_f64().unwrap() - best).abs() < 1e-4, "the nearest frame first");

    // Like the frame at 13 s: that frame first (similarity 1), then by cosine to its embedding.
    let json = search_json(&env, &["--similar-to", "sample.mp4@13.2", "--limit", "5"]).await;
    let hits = json["hits"].as_array().unwrap();
    assert_eq!(json["similar_to"]["video_id"], video.to_string());
    assert_eq!((hits[0]["video_id"].as_str().unwrap(), hits[0]["idx"].as_i64().unwrap()), (video.to_string().as_str(), 13), "{json:#}");
    assert!((hits[0]["score"].as_f64().unwrap() - 1.0).abs() < 1e-6, "{json:#}");
    let source = parse_vector(&stored[13].2);
    for hit in &hits[1..] {
        let idx = hit["idx"].as_i64().unwrap() as usize;
        assert!((hit["score"].as_f64().unwrap() - cosine(&source, &parse_vector(&stored[idx].2))).abs() < 1e-4, "{hit}");
    }
    let (code, _, err) = env.cli(&["search", "--similar-to", "sample.mp4"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is not VIDEO@SECONDS"), "{err}");

    // The plan: the model's partial HNSW index on frames.
    let call = format!("SELECT count(*) FROM heimdex_search_frames((SELECT embedding FROM frames LIMIT 1), '{model}', 5)");
    let plan = plans(&env, &call);
    assert!(plan.contains("Index Scan using frames_hnsw_"), "{plan}");
    drop(worker);
    env.cleanup().await;
}
