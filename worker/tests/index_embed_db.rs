//! Text embeddings against an independent reference (onnxruntime's Python API on the same ONNX file,
//! un-batched), and persistence into a real PostgreSQL.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed assertion

mod common;

use std::process::Command;

use common::*;
use heimdex_shared::contract::SpeechTask;
use heimdex_worker::index::{IndexOutput, Segment, Word};
use heimdex_worker::pipeline::Persist;
use sqlx::{Connection, Executor, PgConnection};
use uuid::Uuid;

const SENTENCES: [&str; 4] = [
    "He was not an ill-disposed young man.",
    "The young man was not unkind or badly disposed.",
    "Stock markets fell sharply on Tuesday after the central bank raised interest rates.",
    "Unless to be rather cold-hearted and rather selfish is to be ill-disposed.",
];

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / (a.iter().map(|x| x * x).sum::<f32>().sqrt() * b.iter().map(|x| x * x).sum::<f32>().sqrt())
}

/// Mean-pooled, L2-normalised embeddings from onnxruntime + tokenizers in Python, one sentence at a time.
fn python_reference(model: &str, tokenizer: &str) -> Vec<Vec<f32>> {
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/venv/bin/python");
    assert!(python.is_file(), "reference interpreter missing: {} (run scripts/setup)", python.display());
    let script = r#"
import json, sys
import numpy as np, onnxruntime as ort, tokenizers
model, tok_path, sentences = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
tok = tokenizers.Tokenizer.from_file(tok_path)
tok.no_padding(); tok.enable_truncation(256)
names = [i.name for i in sess.get_inputs()]
out = []
for s in sentences:
    ids = np.array([tok.encode(s).ids], np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    h = sess.run(["last_hidden_state"], {k: v for k, v in feed.items() if k in names})[0][0]
    v = h.mean(axis=0)
    out.append((v / np.linalg.norm(v)).tolist())
print(json.dumps(out))
"#;
    let out = Command::new(&python)
        .args(["-c", script, model, tokenizer, &serde_json::to_string(&SENTENCES).unwrap()])
        .output()
        .expect("running the Python reference");
    assert!(out.status.success(), "python reference failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("reference json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_match_reference_and_rank_similarity() {
    let s = settings();
    let p = load(&s);
    let texts: Vec<String> = SENTENCES.iter().map(|s| s.to_string()).collect();
    let batched = p.embedder().embed(texts.clone()).await.unwrap();
    let dir = bundle().join(&s.index.embed_dir);
    let reference =
        python_reference(&dir.join(&s.index.embed_file).display().to_string(), &dir.join("tokenizer.json").display().to_string());
    for (i, (got, want)) in batched.iter().zip(&reference).enumerate() {
        assert_eq!(got.len(), 384);
        let c = cosine(got, want);
        assert!(c >= 0.999, "sentence {i}: cosine to reference {c}");
        assert!((got.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-4, "not unit length");
    }
    // Paraphrase closer than an unrelated sentence.
    assert!(cosine(&batched[0], &batched[1]) > cosine(&batched[0], &batched[2]) + 0.2);
    // One at a time (batch 1) equals the padded batch.
    for (text, b) in texts.iter().zip(&batched) {
        let enc = p.embedder().encode(vec![text.clone()]).await.unwrap();
        let single = p.embedder().handle().run_exact(enc).await.unwrap();
        assert!(cosine(&single[0], b) > 0.9999);
    }
}

const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A fresh, migrated database of its own (tests run in parallel).
async fn fresh_db() -> (String, sqlx::PgPool) {
    let name = format!("heimdex_index_test_{}", Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(ADMIN_URL).await.expect("postgres at 127.0.0.1:5432");
    admin.execute(format!("CREATE DATABASE {name}").as_str()).await.unwrap();
    let pool = sqlx::PgPool::connect(&format!("postgres://postgres@127.0.0.1:5432/{name}")).await.unwrap();
    heimdex_shared::db::migrate(&pool, &heimdex_shared::Settings::default()).await.unwrap();
    (name, pool)
}

async fn drop_db(name: &str, pool: sqlx::PgPool) {
    pool.close().await;
    let mut admin = PgConnection::connect(ADMIN_URL).await.unwrap();
    admin.execute(format!("DROP DATABASE {name} WITH (FORCE)").as_str()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_one_vector_index_per_configured_model() {
    let (name, pool) = fresh_db().await;
    let mut settings = heimdex_shared::Settings::default();
    heimdex_shared::db::migrate(&pool, &settings).await.unwrap();
    settings.index.embed_model = "BAAI/bge-m3".into();
    settings.index.embed_dim = 1024;
    heimdex_shared::db::migrate(&pool, &settings).await.unwrap();
    let mut defs: Vec<String> =
        sqlx::query_scalar("SELECT indexdef FROM pg_indexes WHERE tablename = 'transcript_segments' AND indexdef ILIKE '%hnsw%'")
            .fetch_all(&pool)
            .await
            .unwrap();
    defs.sort();
    assert_eq!(defs.len(), 2, "{defs:?}");
    assert!(defs[0].contains("halfvec(1024)") && defs[0].contains("BAAI/bge-m3"), "{defs:?}");
    assert!(defs[1].contains("halfvec(384)") && defs[1].contains("all-MiniLM-L6-v2"), "{defs:?}");
    drop_db(&name, pool).await;
}

#[tokio::test]
async fn writing_twice_leaves_one_set_of_rows() {
    let (name, pool) = fresh_db().await;

    let video = Uuid::new_v4();
    sqlx::query("INSERT INTO videos (id, uri) VALUES ($1, $2)").bind(video).bind("/m/a.mp4").execute(&pool).await.unwrap();
    let seg = |i: usize, text: &str| Segment {
        start_s: i as f64 * 2.0,
        end_s: i as f64 * 2.0 + 1.5,
        text: text.into(),
        confidence: 0.9,
        embedding: (0..384).map(|k| ((k + i) % 7) as f32 / 7.0).collect(),
        // The words of the second segment only: a segment without them stores NULL.
        words: if i == 1 {
            ["ten", "of", "clubs"]
                .iter()
                .enumerate()
                .map(|(k, w)| Word { text: (*w).into(), start_s: 2.0 + k as f64 * 0.5, end_s: 2.4 + k as f64 * 0.5, probability: 0.8 })
                .collect()
        } else {
            Vec::new()
        },
    };
    let out = IndexOutput {
        segments: vec![seg(0, "he was not an ill disposed young man"), seg(1, "ten of clubs"), seg(2, "go forward")],
        language: "en".into(),
        task: SpeechTask::Transcribe,
        spoken_language: None,
        audio_s: 6.0,
        embedding_model: "sentence-transformers/all-MiniLM-L6-v2".into(),
        windows: 1,
        resumed_windows: 0,
    };
    for _ in 0..2 {
        let mut tx = pool.begin().await.unwrap();
        out.write(&mut tx, video).await.unwrap();
        tx.commit().await.unwrap();
    }
    let rows: Vec<(i32, String, String, Option<String>, i32)> = sqlx::query_as(
        "SELECT idx, text, language, embedding_model, vector_dims(embedding) FROM transcript_segments WHERE video_id = $1 ORDER BY idx",
    )
    .bind(video)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(rows[1].1, "ten of clubs");
    assert!(rows.iter().all(|r| r.2 == "en" && r.3.as_deref() == Some("sentence-transformers/all-MiniLM-L6-v2") && r.4 == 384));
    let words: Vec<Option<sqlx::types::Json<Vec<Word>>>> =
        sqlx::query_scalar("SELECT words FROM transcript_segments WHERE video_id = $1 ORDER BY idx")
            .bind(video)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(words[0].is_none() && words[2].is_none(), "no words, no JSON");
    let second = &words[1].as_ref().expect("the second segment's words").0;
    assert_eq!(second, &out.segments[1].words, "stored as they were timed");
    let third_start: f64 =
        sqlx::query_scalar("SELECT (words -> 2 ->> 'start_s')::float8 FROM transcript_segments WHERE video_id = $1 AND idx = 1")
            .bind(video)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(third_start, 3.0, "SQL reads a word's time by name");
    assert_eq!(out.summary()["segments"], 3);
    assert_eq!(out.summary()["words"], 13);

    drop_db(&name, pool).await;
}
