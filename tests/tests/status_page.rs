//! The status page as a person sees it: one job in each job state and one worker in each worker state,
//! real rows in the test's database and real fleet entries in Redis, served by `heimdex serve` and
//! rendered by headless Chromium; every state badge's text must be readable on its background (WCAG AA,
//! 4.5:1), measured from the screenshot's pixels, not read from the DOM.
//!
//! How the badges are found on the screenshot: the browser loads the page through a small proxy of the
//! test's own that forwards `/v1/status` to the server and adds one script to the page it passes on;
//! the script records each badge's text box and computed colours in the DOM, which `--dump-dom` prints.
//! The page itself carries nothing for the test. The screenshot is a second run of the same page
//! with the same data, so the layout is the same.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse};
use chrono::Utc;
use heimdex_shared::fleet::{ModelStatus, WorkerState, WorkerStatus};
use heimdex_shared::jobs::JobStatus;
use heimdex_tests::{TestEnv, http_get, render_page};
use serde_json::Value;
use uuid::Uuid;

/// WCAG 2 AA for normal-size text (the badges are 14 px bold, below the 18.66 px bold "large" size).
const AA: f64 = 4.5;
const WIDTH: u32 = 1400;
const HEIGHT: u32 = 1600;

/// Added to the page by the proxy: the text box of every state badge, in page pixels, with its computed
/// colours, as JSON in a `<script type="application/json">` (which takes no space on the page).
const MEASURE: &str = r#"<script>
setInterval(() => {
  const boxes = [...document.querySelectorAll("span.state")].map(badge => {
    const text = document.createRange();
    text.selectNodeContents(badge);
    const r = text.getBoundingClientRect();
    const style = getComputedStyle(badge);
    return { state: badge.textContent, x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height,
             color: style.color, background: style.backgroundColor };
  });
  let out = document.getElementById("badge-boxes");
  if (!out) {
    out = document.createElement("script");
    out.type = "application/json";
    out.id = "badge-boxes";
    document.body.appendChild(out);
  }
  out.textContent = JSON.stringify(boxes);
}, 200);
</script>
</body>"#;

/// WCAG relative luminance of an sRGB colour.
fn luminance([r, g, b]: [u8; 3]) -> f64 {
    let lin = |c: u8| {
        let c = f64::from(c) / 255.0;
        if c <= 0.039_28 { c / 12.92 } else { ((c + 0.055) / 1.055).powf(2.4) }
    };
    0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b)
}

/// WCAG contrast ratio, 1 to 21.
fn contrast(a: [u8; 3], b: [u8; 3]) -> f64 {
    let (la, lb) = (luminance(a), luminance(b));
    (la.max(lb) + 0.05) / (la.min(lb) + 0.05)
}

/// A computed CSS colour (`rgb(r, g, b)` or `rgba(r, g, b, a)`) laid over the page's white.
fn css_colour(text: &str) -> [u8; 3] {
    let inner = text.trim_start_matches("rgba(").trim_start_matches("rgb(").trim_end_matches(')');
    let parts: Vec<f64> = inner.split(',').map(|p| p.trim().parse().unwrap_or_else(|_| panic!("colour {text:?}"))).collect();
    let alpha = parts.get(3).copied().unwrap_or(1.0);
    let over_white = |c: f64| (c * alpha + 255.0 * (1.0 - alpha)).round() as u8;
    [over_white(parts[0]), over_white(parts[1]), over_white(parts[2])]
}

/// The proxy the browser loads the page through (see the module docs); returns its address.
async fn measuring_proxy(server: String) -> String {
    async fn page(State(server): State<Arc<String>>) -> Html<String> {
        let (code, html) = http_get(&server, "/").await;
        assert_eq!(code, 200, "{html}");
        assert!(html.contains("</body>"), "{html}");
        Html(html.replacen("</body>", MEASURE, 1))
    }
    async fn status(State(server): State<Arc<String>>) -> impl IntoResponse {
        let (code, body) = http_get(&server, "/v1/status").await;
        (StatusCode::from_u16(code).expect("status code"), [(header::CONTENT_TYPE, "application/json")], body)
    }
    let app = axum::Router::new()
        .route("/", axum::routing::get(page))
        .route("/v1/status", axum::routing::get(status))
        .with_state(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// One job row in each job state, each on its own video, newest first in `ALL`'s order.
async fn one_job_in_each_state(env: &TestEnv) {
    for (i, status) in JobStatus::ALL.into_iter().enumerate() {
        let video = Uuid::new_v4();
        sqlx::query("INSERT INTO videos (id, uri, duration_s, has_audio, has_video) VALUES ($1, $2, 25.0, true, true)")
            .bind(video)
            .bind(format!("{status}.mp4"))
            .execute(&env.pool)
            .await
            .expect("insert video");
        let started = !matches!(status, JobStatus::Queued);
        let error = matches!(status, JobStatus::Retrying | JobStatus::Failed | JobStatus::Dead).then_some("ffmpeg: no audio stream");
        sqlx::query(
            "INSERT INTO jobs (id, video_id, kind, status, attempts, last_error, worker_id, queued_at, started_at, finished_at, stage_timings)
             VALUES ($1, $2, 'index', $3, $4, $5, $6, now() - make_interval(secs => $7), CASE WHEN $8 THEN now() END,
                     CASE WHEN $9 THEN now() END, CASE WHEN $9 THEN '{\"decode\": 120, \"asr\": 2400}'::jsonb ELSE '{}'::jsonb END)",
        )
        .bind(Uuid::new_v4())
        .bind(video)
        .bind(status.as_str())
        .bind(i32::from(started))
        .bind(error)
        .bind(started.then_some("index-warm"))
        .bind(i as f64)
        .bind(started)
        .bind(status.is_terminal())
        .execute(&env.pool)
        .await
        .expect("insert job");
    }
}

/// One fleet entry in each worker state, written to Redis the way workers publish themselves.
async fn one_worker_in_each_state(env: &TestEnv) {
    for state in WorkerState::ALL {
        let warm = matches!(state, WorkerState::Warm | WorkerState::Paused | WorkerState::Draining | WorkerState::Disconnected);
        let status = WorkerStatus {
            id: format!("vision-{}", state.as_str()),
            kind: "vision".into(),
            state,
            host: "page-test".into(),
            pid: std::process::id(),
            health_addr: "127.0.0.1:9".into(),
            concurrency: 2,
            models: vec![
                ModelStatus { name: "siglip".into(), path: "siglip/model.onnx".into(), warmup_ms: warm.then_some(812.0) },
                ModelStatus { name: "yunet".into(), path: "yunet.onnx".into(), warmup_ms: warm.then_some(35.0) },
            ],
            warmup_ms: warm.then_some(847.0),
            in_flight: Vec::new(),
            tasks_done: 0,
            started_at: Utc::now(),
            updated_at: Utc::now(),
        };
        // Long enough to outlive the test's renders; the test removes them at the end.
        env.fleet.publish(&status, 300_000).await.expect("publish to redis");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_job_and_worker_state_has_a_badge_whose_text_is_readable_on_the_screenshot() {
    let env = TestEnv::new().await;
    one_job_in_each_state(&env).await;
    one_worker_in_each_state(&env).await;
    let (_server, server) = env.serve().await;
    let proxy = measuring_proxy(server).await;

    let png = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status_page.png");
    let (dom, rgb) = render_page(&format!("http://{proxy}/"), &png, WIDTH, HEIGHT);
    println!("screenshot of the status page with one job and one worker in each state: {}", png.display());
    let boxes = dom
        .split_once(r#"<script type="application/json" id="badge-boxes">"#)
        .and_then(|(_, rest)| rest.split_once("</script>"))
        .map(|(json, _)| serde_json::from_str::<Vec<Value>>(json).expect("badge boxes as JSON"))
        .unwrap_or_else(|| panic!("the page did not render its badges:\n{dom}"));

    let pixel = |x: usize, y: usize| {
        let i = (y * WIDTH as usize + x) * 3;
        [rgb[i], rgb[i + 1], rgb[i + 2]]
    };
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut unreadable = Vec::new();
    println!("{:<13} {:>18} {:>9} {:>11} {:>12}", "state", "css background", "css ratio", "pixel ratio", "text pixels");
    for b in &boxes {
        let state = b["state"].as_str().expect("state").to_string();
        let (x, y, w, h) = (b["x"].as_f64().unwrap(), b["y"].as_f64().unwrap(), b["w"].as_f64().unwrap(), b["h"].as_f64().unwrap());
        let (x0, y0, x1, y1) = (x.ceil() as usize, y.ceil() as usize, (x + w).floor() as usize, (y + h).floor() as usize);
        assert!(
            x1 > x0 + 4 && y1 > y0 + 4 && x1 <= WIDTH as usize && y1 <= HEIGHT as usize,
            "{state}: its text box {b} is not on the screenshot"
        );
        // The badge's background is the commonest colour in its text box (the gaps between letters);
        // text pixels are those that stand out from it by the AA ratio.
        let mut colours: HashMap<[u8; 3], usize> = HashMap::new();
        for yy in y0..y1 {
            for xx in x0..x1 {
                *colours.entry(pixel(xx, yy)).or_default() += 1;
            }
        }
        let background = colours.iter().max_by_key(|(_, n)| **n).map(|(c, _)| *c).expect("pixels");
        let text_pixels: usize = colours.iter().filter(|(c, _)| contrast(**c, background) >= AA).map(|(_, n)| n).sum();
        let best = colours.keys().map(|c| contrast(*c, background)).fold(1.0, f64::max);
        let css = contrast(css_colour(b["color"].as_str().unwrap()), css_colour(b["background"].as_str().unwrap()));
        println!("{state:<13} {:>18} {css:>9.2} {best:>11.2} {text_pixels:>12}", b["background"].as_str().unwrap());
        // A 14 px bold word has well over 20 pixels at full ink; a stray pixel is not text.
        if text_pixels < 20 || css < AA {
            unreadable.push(format!("{state} (css {css:.2}, pixels {best:.2}, {text_pixels} text pixels on {background:?})"));
        }
        *seen.entry(state).or_default() += 1;
    }
    let states: Vec<&str> = JobStatus::ALL.iter().map(|s| s.as_str()).chain(WorkerState::ALL.iter().map(|s| s.as_str())).collect();
    for state in &states {
        assert!(seen.contains_key(*state), "no {state} badge on the page: {seen:?}\n{dom}");
    }
    assert!(unreadable.is_empty(), "badges whose text cannot be read (AA is {AA}:1), see {}: {unreadable:?}", png.display());
    // Jobs appear in the counts and in the recent list (failed and dead also among the dead letters),
    // workers once each: every badge was measured, not just one per state.
    assert_eq!(boxes.len(), 2 * JobStatus::ALL.len() + 2 + WorkerState::ALL.len(), "{seen:?}");
    for state in WorkerState::ALL {
        env.fleet.remove(&format!("vision-{}", state.as_str())).await.expect("remove from redis");
    }
    env.cleanup().await;
}
