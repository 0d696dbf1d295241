//! The API as a client integrates with it: its OpenAPI 3.1 document (served, valid, and true of the
//! answers the server gives, checked by an independent validator) and its lists, paged by cursor,
//! newest first, stable while rows are added, filtered by status, kind and the caller's id.
//! No worker or model is needed: rows are written straight into the test's database.

use std::collections::HashSet;
use std::path::Path;

use heimdex_tests::{TestEnv, http_with};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

const KEY: &str = "k3y-lists-0123456789abcdefXYZ";

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// A GET with the key; (status, body as JSON).
async fn get(addr: &str, path: &str) -> (u16, Value) {
    let (code, body) = http_with(addr, "GET", path, &[("Authorization", &format!("Bearer {KEY}"))], None).await;
    (code, json(&body))
}

/// A video with an index job and a vision job in the given states; (video, index job, vision job).
async fn video(pool: &PgPool, uri: &str, index: &str, vision: &str, external_id: Option<&str>) -> (Uuid, Uuid, Uuid) {
    let (id, index_job, vision_job) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    sqlx::query("INSERT INTO videos (id, uri, duration_s, width, height) VALUES ($1, $2, 12.5, 640, 360)")
        .bind(id)
        .bind(uri)
        .execute(pool)
        .await
        .unwrap();
    for (job, kind, status) in [(index_job, "index", index), (vision_job, "vision", vision)] {
        sqlx::query("INSERT INTO jobs (id, video_id, kind, status, external_id) VALUES ($1, $2, $3, $4, $5)")
            .bind(job)
            .bind(id)
            .bind(kind)
            .bind(status)
            .bind(external_id)
            .execute(pool)
            .await
            .unwrap();
    }
    (id, index_job, vision_job)
}

/// Every page of `path` (which has a query) from the first, `limit` rows each: the ids of `field`.
async fn all_pages(addr: &str, path: &str, field: &str) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let at = match &cursor {
            Some(c) => format!("{path}&cursor={c}"),
            None => path.to_string(),
        };
        let (code, page) = get(addr, &at).await;
        assert_eq!(code, 200, "{at}: {page}");
        pages.push(page[field].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_string()).collect());
        match page.get("next_cursor") {
            Some(next) => cursor = Some(next.as_str().unwrap().to_string()),
            None => return pages,
        }
        assert!(pages.len() < 100, "{path}: more pages than rows");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn lists_page_newest_first_stay_stable_and_filter() {
    let env = TestEnv::new().await;
    let (_server, addr) = env.serve_with(&[("HEIMDEX__SERVE__API_KEYS", KEY)], "127.0.0.1:0").await;
    let states = [("succeeded", "dead"), ("running", "queued"), ("failed", "succeeded"), ("succeeded", "dead"), ("queued", "retrying")];
    let mut made = Vec::new();
    for (i, (index, vision)) in states.iter().enumerate() {
        let caller = (i % 2 == 0).then_some("batch-7");
        made.push(video(&env.pool, &format!("https://cdn.example/v{i}.mp4?sig=s3cr3t"), index, vision, caller).await);
    }
    let newest_first: Vec<String> = made.iter().rev().map(|m| m.0.to_string()).collect();

    // Videos: newest first, two per page, every video once; the page shows the video's jobs.
    let pages = all_pages(&addr, "/v1/videos?limit=2", "videos").await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
    assert_eq!(pages.concat(), newest_first);
    let (_, first) = get(&addr, "/v1/videos?limit=1").await;
    let shown = &first["videos"][0];
    assert_eq!(shown["uri"], "https://cdn.example/v4.mp4?…", "URLs are shown without their query: {first}");
    assert_eq!((shown["duration_s"].as_f64(), shown["width"].as_i64()), (Some(12.5), Some(640)), "{first}");
    let jobs: Vec<(&str, &str)> =
        shown["jobs"].as_array().unwrap().iter().map(|j| (j["kind"].as_str().unwrap(), j["status"].as_str().unwrap())).collect();
    assert_eq!(jobs, [("index", "queued"), ("vision", "retrying")]);
    assert_eq!(shown["jobs"][0]["job_id"], made[4].1.to_string());

    // A video added while a reader pages shows up on the first page only: nothing repeated, nothing skipped.
    let (_, page1) = get(&addr, "/v1/videos?limit=2").await;
    let cursor = page1["next_cursor"].as_str().unwrap().to_string();
    let added = video(&env.pool, "late.mp4", "queued", "queued", None).await;
    let (_, page2) = get(&addr, &format!("/v1/videos?limit=2&cursor={cursor}")).await;
    let ids = |page: &Value| page["videos"].as_array().unwrap().iter().map(|v| v["id"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!([ids(&page1), ids(&page2)].concat(), newest_first[..4]);
    assert_eq!(ids(&get(&addr, "/v1/videos?limit=1").await.1), [added.0.to_string()]);

    // A forced re-run moves `queued_at`, not the job's place in the list.
    sqlx::query("UPDATE jobs SET queued_at = now() + interval '1 hour' WHERE id = $1").bind(made[0].1).execute(&env.pool).await.unwrap();
    let all_jobs = all_pages(&addr, "/v1/jobs?limit=3", "jobs").await.concat();
    assert_eq!(all_jobs.len(), 12);
    assert_eq!(all_jobs[10..], [made[0].2.to_string(), made[0].1.to_string()][..], "the oldest jobs stay last: {all_jobs:?}");

    // Filters, alone and together, each paged.
    let expect = |pick: &dyn Fn(usize, &str, &str) -> bool| -> Vec<String> {
        let mut out = Vec::new();
        for (i, (index, vision)) in states.iter().enumerate().rev() {
            for (job, kind, status) in [(made[i].2, "vision", *vision), (made[i].1, "index", *index)] {
                if pick(i, kind, status) {
                    out.push(job.to_string());
                }
            }
        }
        out
    };
    let dead_vision = all_pages(&addr, "/v1/jobs?status=dead&kind=vision&limit=1", "jobs").await;
    assert_eq!(dead_vision.concat(), expect(&|_, k, s| k == "vision" && s == "dead"));
    assert_eq!(dead_vision.len(), 2);
    let succeeded = all_pages(&addr, "/v1/jobs?status=succeeded&limit=2", "jobs").await.concat();
    assert_eq!(succeeded, expect(&|_, _, s| s == "succeeded"));
    let batch = all_pages(&addr, "/v1/jobs?external_id=batch-7&kind=index&limit=2", "jobs").await.concat();
    assert_eq!(batch, expect(&|i, k, _| i % 2 == 0 && k == "index"));
    let (code, none) = get(&addr, "/v1/jobs?external_id=nobody").await;
    assert_eq!((code, none), (200, json!({ "jobs": [] })));

    // Refused: limits out of range, cursors this API did not give, unknown states, kinds and parameters.
    for (path, reason) in [
        ("/v1/videos?limit=0", "limit must be in 1..=500"),
        ("/v1/videos?limit=501", "limit must be in 1..=500"),
        ("/v1/videos?cursor=abc", "cursor is not one this API gave"),
        ("/v1/jobs?cursor=-4", "cursor is not one this API gave"),
        ("/v1/jobs?status=finished", "unknown variant"),
        ("/v1/jobs?kind=audio", "unknown variant"),
        ("/v1/jobs?offset=10", "unknown field"),
    ] {
        let (code, body) = get(&addr, path).await;
        assert_eq!(code, 400, "{path}: {body}");
        assert!(body["error"].as_str().unwrap().contains(reason), "{path}: {body}");
    }
    let (code, body) = http_with(&addr, "GET", "/v1/videos", &[], None).await;
    assert_eq!(code, 401, "lists need the key: {body}");
    env.cleanup().await;
}

/// The document the server serves is the one the routes generate and the committed copy, a valid
/// OpenAPI 3.1 document, and every answer below (successes and errors) matches its schema.
#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_is_served_valid_and_true_of_the_answers() {
    let env = TestEnv::new().await;
    let (_server, addr) = env.serve_with(&[("HEIMDEX__SERVE__API_KEYS", KEY)], "127.0.0.1:0").await;
    let (code, served) = http_with(&addr, "GET", "/openapi.json", &[], None).await;
    assert_eq!(code, 200, "the document needs no key: {served}");
    let served = json(&served);
    let generated = serde_json::to_value(heimdex_producer::serve::openapi()).unwrap();
    assert!(served == generated, "the served document is not the one the routes generate (the binaries are older than the tests?)");
    assert_eq!(served["openapi"], "3.1.0");
    let paths: HashSet<&str> = served["paths"].as_object().unwrap().keys().map(String::as_str).collect();
    let expected = [
        "/healthz",
        "/readyz",
        "/v1/status",
        "/v1/videos",
        "/v1/videos/{id}",
        "/v1/videos/{id}/transcript",
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/search",
    ];
    assert_eq!(paths, expected.into_iter().collect(), "every route is documented");
    assert_eq!(served["paths"]["/v1/jobs"]["get"]["security"], json!([{ "apiKey": [] }]));
    assert!(served["paths"]["/healthz"]["get"].get("security").is_none());

    let (video, job, _) = video(&env.pool, "doc.mp4", "succeeded", "dead", Some("doc-1")).await;
    sqlx::query("UPDATE jobs SET summary = '{\"segments\": 3}', finished_at = now(), metadata = '{\"a\": 1}' WHERE id = $1")
        .bind(job)
        .execute(&env.pool)
        .await
        .unwrap();
    let mut answers = Vec::new();
    for (method, path, template, body) in [
        ("GET", "/v1/status".to_string(), "/v1/status", None),
        ("GET", "/v1/videos?limit=1".into(), "/v1/videos", None),
        ("GET", "/v1/videos?limit=0".into(), "/v1/videos", None),
        ("GET", "/v1/jobs?status=succeeded&external_id=doc-1".into(), "/v1/jobs", None),
        ("GET", format!("/v1/jobs/{job}"), "/v1/jobs/{id}", None),
        ("GET", format!("/v1/jobs/{}", Uuid::new_v4()), "/v1/jobs/{id}", None),
        ("GET", "/v1/search?q=hello&in=pictures".into(), "/v1/search", None),
        ("POST", "/v1/videos".into(), "/v1/videos", Some(r#"{"uri": "doc.mp4", "colour": "red"}"#)),
        ("DELETE", format!("/v1/videos/{video}"), "/v1/videos/{id}", None),
    ] {
        let (code, answer) = http_with(&addr, method, &path, &[("Authorization", &format!("Bearer {KEY}"))], body).await;
        answers.push(json!({ "path": template, "method": method.to_lowercase(), "status": code, "body": json(&answer) }));
    }
    let codes: Vec<u64> = answers.iter().map(|a| a["status"].as_u64().unwrap()).collect();
    assert_eq!(codes, [200, 200, 400, 200, 200, 404, 400, 400, 200], "{answers:#?}");

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".deps/venv/bin/python");
    assert!(python.is_file(), "{} missing: run scripts/setup", python.display());
    let document = env.media.path().join("openapi.json");
    std::fs::write(&document, served.to_string()).unwrap();
    let mut child = tokio::process::Command::new(python)
        .arg(root.join("tests/python/openapi_check.py"))
        .arg(&document)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, Value::Array(answers).to_string().as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("openapi_check.py did not finish in 60 s")
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the document or an answer fails validation:\n{stdout}\n{stderr}");
    assert_eq!(stdout.lines().filter(|l| l.ends_with(": ok")).count(), 9, "{stdout}");
    env.cleanup().await;
}

/// Rows that exist before the list-order migration are numbered in the order they were created, and
/// rows added after it follow them.
#[tokio::test(flavor = "multi_thread")]
async fn the_list_order_migration_numbers_existing_rows_by_creation() {
    let env = TestEnv::new().await;
    let pool = env.database_before("20261205000001").await;
    let has_seq: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'videos' AND column_name = 'seq')")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(!has_seq, "the old schema has no seq");

    // Inserted in another order than they were created.
    let created = ["2026-11-03", "2026-11-01", "2026-11-02"];
    let mut ids = Vec::new();
    for (i, day) in created.iter().enumerate() {
        let id = Uuid::new_v4();
        sqlx::query("INSERT INTO videos (id, uri, created_at) VALUES ($1, $2, $3::timestamptz)")
            .bind(id)
            .bind(format!("old{i}.mp4"))
            .bind(day)
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO jobs (id, video_id, kind, status, queued_at) VALUES ($1, $1, 'index', 'succeeded', $2::timestamptz)")
            .bind(id)
            .bind(day)
            .execute(&pool)
            .await
            .unwrap_or_else(|_| panic!("job of {id}"));
        ids.push(id);
    }
    heimdex_shared::db::MIGRATOR.run(&pool).await.unwrap();
    let new = video(&pool, "new.mp4", "queued", "queued", None).await;

    let videos = heimdex_shared::jobs::list_videos(&pool, None, 10).await.unwrap();
    let order: Vec<Uuid> = videos.iter().map(|v| v.id).collect();
    assert_eq!(order, [new.0, ids[0], ids[2], ids[1]], "newest first by creation");
    let seqs: Vec<i64> = videos.iter().map(|v| v.seq).collect();
    assert_eq!(seqs, [4, 3, 2, 1]);
    let jobs = heimdex_shared::jobs::list_jobs(&pool, &Default::default(), None, 10).await.unwrap();
    let order: Vec<Uuid> = jobs.iter().map(|j| j.id).collect();
    assert_eq!(order, [new.2, new.1, ids[0], ids[2], ids[1]]);

    pool.close().await;
    env.cleanup().await;
}
