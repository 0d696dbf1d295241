//! How search stores and reads what it finds, against the real database: the halfvec migration on a
//! database that already holds segments, frames and scenes (their vectors kept to fp16 precision, the
//! old fp32 HNSW indexes replaced by halfvec ones, the rows found again), and the full-text side in the
//! transcript's own language (a German segment found by an inflected German word, an English one by
//! English stemming, an unknown language by its exact words).

use heimdex_tests::TestEnv;
use uuid::Uuid;

/// The first migration this file tests: everything before it is the schema the data was written in.
const HALFVEC: &str = "20261205000002";

/// A unit vector of `dim` with most of its weight on `axis`, and values fp16 cannot hold exactly.
fn vector(dim: usize, axis: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..dim).map(|i| 0.01 + (i as f32 * 0.37).sin() * 0.003).collect();
    v[axis] = 1.0;
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
    v
}

fn literal(v: &[f32]) -> String {
    heimdex_shared::db::vector_literal(v)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_halfvec_migration_keeps_the_rows_and_search_reads_each_language() {
    let env = TestEnv::new().await;
    let pool = env.database_before(HALFVEC).await;
    let (text_model, text_dim) = (env.settings.index.embed_model.clone(), env.settings.index.embed_dim);
    let (vision_model, vision_dim) = (env.settings.vision.embed_model.clone(), env.settings.vision.embed_dim);

    // Rows as the fp32 schema held them, with its HNSW indexes (as `heimdex migrate` made them).
    let video = Uuid::new_v4();
    sqlx::query("INSERT INTO videos (id, uri) VALUES ($1, 'old.mp4')").bind(video).execute(&pool).await.unwrap();
    let segments = [
        ("de", "Die Katzen liefen schnell über die nassen Straßen"),
        ("en", "The young men were running towards the harbour"),
        ("xx", "zorblat quindle vesh"),
        ("en", "Budget review for the third quarter"),
    ];
    for (i, (language, text)) in segments.iter().enumerate() {
        sqlx::query(
            "INSERT INTO transcript_segments (video_id, idx, start_s, end_s, text, language, embedding, embedding_model) \
             VALUES ($1, $2, $2, $2 + 1, $3, $4, $5::vector, $6)",
        )
        .bind(video)
        .bind(i as i32)
        .bind(text)
        .bind(language)
        .bind(literal(&vector(text_dim, i)))
        .bind(&text_model)
        .execute(&pool)
        .await
        .unwrap();
    }
    sqlx::query("INSERT INTO scenes (video_id, idx, start_s, end_s, frame_count, embedding, embedding_model) VALUES ($1, 0, 0, 3, 3, $2::vector, $3)")
        .bind(video)
        .bind(literal(&vector(vision_dim, 0)))
        .bind(&vision_model)
        .execute(&pool)
        .await
        .unwrap();
    for i in 0..3 {
        sqlx::query(
            "INSERT INTO frames (video_id, idx, ts_s, scene_idx, embedding, embedding_model) VALUES ($1, $2, $2, 0, $3::vector, $4)",
        )
        .bind(video)
        .bind(i)
        .bind(literal(&vector(vision_dim, i as usize)))
        .bind(&vision_model)
        .execute(&pool)
        .await
        .unwrap();
    }
    for (table, model, dim) in heimdex_shared::db::vector_indexes(&env.settings) {
        let index = heimdex_shared::db::vector_index_name(table, model, dim);
        sqlx::query(&format!(
            "CREATE INDEX \"{index}\" ON {table} USING hnsw ((embedding::vector({dim})) vector_cosine_ops) WHERE embedding_model = '{model}'"
        ))
        .execute(&pool)
        .await
        .unwrap();
    }

    // `heimdex migrate`: the rest of the migrations, then the vector indexes of the configured models.
    heimdex_shared::db::migrate(&pool, &env.settings).await.unwrap();

    let types: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_name::text, udt_name::text FROM information_schema.columns WHERE column_name = 'embedding' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        types,
        [("frames", "halfvec"), ("scenes", "halfvec"), ("transcript_segments", "halfvec")].map(|(a, b)| (a.to_string(), b.to_string()))
    );
    let indexes: Vec<String> = sqlx::query_scalar("SELECT indexdef FROM pg_indexes WHERE indexname LIKE '%\\_hnsw\\_%' ORDER BY indexname")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(indexes.len(), 3, "{indexes:#?}");
    assert!(indexes.iter().all(|d| d.contains("halfvec_cosine_ops") && !d.contains("::vector(")), "{indexes:#?}");

    // Every vector kept, to fp16 precision (relative error under 2^-11 per value).
    let stored: Vec<(i32, String)> = sqlx::query_as("SELECT idx, embedding::text FROM frames WHERE video_id = $1 ORDER BY idx")
        .bind(video)
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(stored.len(), 3);
    for (i, text) in &stored {
        let got: Vec<f32> = text.trim_matches(['[', ']']).split(',').map(|x| x.parse().unwrap()).collect();
        let want = vector(vision_dim, *i as usize);
        assert_eq!(got.len(), want.len());
        let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs() / w.abs()).fold(0.0f32, f32::max);
        assert!(worst < 1.0 / 2048.0, "frame {i}: relative error {worst}");
    }

    // Found again by meaning (a stored embedding is a query as it is) and by words in their language.
    let search = |text: &'static str, axis: usize| {
        let (pool, model) = (pool.clone(), text_model.clone());
        async move { heimdex_producer::search::segments_by_vector(&pool, &vector(text_dim, axis), text, &model, 4, None).await.unwrap() }
    };
    let hits = search("", 1).await;
    assert_eq!(hits[0].idx, 1, "{hits:#?}");
    assert_eq!(hits[0].semantic_rank, Some(1));
    assert!(hits[0].similarity.unwrap() > 0.999, "{hits:#?}");
    // German stemming finds "Katzen" and "Straßen" by "Katze Straße" (English stemming would not),
    // English finds "running … harbour" by "run harbours"; an unknown language by its exact word.
    for (words, idx) in [("Katze Straße", 0), ("run harbours", 1), ("quindle", 2), ("quarterly budgets", 3)] {
        let hits = search(words, 3).await;
        let by_text: Vec<i32> = hits.iter().filter(|h| h.text_rank.is_some()).map(|h| h.idx).collect();
        assert_eq!(by_text, [idx], "{words:?}: {hits:#?}");
    }
    let frames = heimdex_producer::search::frames_by_vector(&pool, &vector(vision_dim, 2), &vision_model, 3, None).await.unwrap();
    assert_eq!(frames.iter().map(|f| f.idx).collect::<Vec<_>>()[0], 2, "{frames:#?}");
    let configs: Vec<String> = sqlx::query_scalar("SELECT heimdex_text_config(l)::text FROM unnest(ARRAY['de', 'en', 'ja', NULL]) l")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(configs, ["german", "english", "simple", "simple"]);

    pool.close().await;
    env.cleanup().await;
}
