//! `/metrics` as a scraper sees it after a real task: the OpenMetrics content type, a well-formed
//! exposition, `heimdex_build_info`, the process series and the media seconds processed by kind.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use heimdex_shared::contract::TaskKind;
use heimdex_shared::fleet::WorkerState;
use heimdex_tests::TestEnv;

const WARM: Duration = Duration::from_secs(120);
const TASK: Duration = Duration::from_secs(240);

/// A GET that keeps the response headers: (status, lower-cased headers, body).
async fn get(addr: &str, path: &str) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect health port");
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let mut lines = head.lines();
    let code = lines.next().and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0);
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string())).collect();
    (code, headers, body.to_string())
}

/// The value of the first sample line that starts with `prefix` (a whole name when it ends in one).
fn sample(text: &str, prefix: &str) -> f64 {
    let whole_name = prefix.ends_with(|c: char| c.is_alphanumeric() || c == '_');
    let line = text
        .lines()
        .find(|l| l.starts_with(prefix) && (!whole_name || l[prefix.len()..].starts_with([' ', '{'])))
        .unwrap_or_else(|| panic!("no sample {prefix} in:\n{text}"));
    line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no number in {line}"))
}

/// Checks the OpenMetrics text shape: every sample belongs to a family declared by `# TYPE`, every
/// family has a `# HELP`, and the exposition ends with `# EOF`.
fn assert_well_formed(text: &str) {
    assert!(text.ends_with("# EOF\n"), "no # EOF at the end:\n{text}");
    let mut typed = BTreeSet::new();
    let mut helped = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
            assert!(["counter", "gauge", "histogram", "info", "unknown"].contains(&kind), "{line}");
            typed.insert(name.to_string());
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split_once(' ').map_or(rest, |(n, _)| n).to_string());
        } else if line.starts_with('#') {
            assert!(line == "# EOF" || line.starts_with("# UNIT "), "unexpected comment {line}");
        } else {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let family = ["_total", "_bucket", "_count", "_sum", "_info", "_created"]
                .iter()
                .filter_map(|s| name.strip_suffix(s))
                .find(|f| typed.contains(*f))
                .unwrap_or(name);
            assert!(typed.contains(family), "sample {name} has no # TYPE before it:\n{text}");
            let value = line.rsplit(' ').next().unwrap_or_default();
            assert!(value.parse::<f64>().is_ok() || ["NaN", "+Inf", "-Inf"].contains(&value), "{line}");
        }
    }
    assert_eq!(typed, helped, "every family has # HELP and # TYPE");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_openmetrics_with_build_process_and_media_series() {
    let env = TestEnv::new().await;
    env.add_media("video/silent.mp4", "clip.mp4");
    let spawned_at = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs_f64();
    let worker = env.spawn_worker("vision", "m1", &[]);
    let status = env.wait_state(&worker, WorkerState::Warm, WARM).await;
    let addr = status.health_addr.clone();

    let (code, headers, before) = get(&addr, "/metrics").await;
    assert_eq!(code, 200);
    let content_type = headers.iter().find(|(k, _)| k == "content-type").map(|(_, v)| v.as_str());
    assert_eq!(content_type, Some("application/openmetrics-text; version=1.0.0; charset=utf-8"));
    assert_well_formed(&before);
    assert!(!before.contains("heimdex_media_seconds_total{"), "no media counted before a task:\n{before}");

    let (_, job) = env.enqueue("clip.mp4", TaskKind::Vision, false).await.expect("enqueue");
    env.wait_job(job, "succeeded", TASK).await;
    let after = env
        .wait_for("the task counted in /metrics", TASK, || async {
            let (_, _, text) = get(&addr, "/metrics").await;
            text.contains(r#"heimdex_tasks_total{kind="vision",outcome="succeeded"} 1"#).then_some(text)
        })
        .await;
    assert_well_formed(&after);

    // silent.mp4 is 4.0 s long.
    assert!((sample(&after, r#"heimdex_media_seconds_total{kind="vision"}"#) - 4.0).abs() < 0.05, "{after}");
    let build = format!(r#"heimdex_build_info{{version="{}",commit="#, env!("CARGO_PKG_VERSION"));
    assert_eq!(sample(&after, &build), 1.0);
    assert!(after.contains(r#"binary="worker-vision""#) && after.contains(r#"contract="1""#), "{after}");
    assert_eq!(sample(&after, r#"heimdex_worker_state{state="warm"}"#), 1.0);

    // The process series describe the worker's own process: its models make it tens of MB at least.
    let rss = sample(&after, "process_resident_memory_bytes");
    assert!(rss > 20e6, "resident memory {rss}");
    assert!(sample(&after, "process_virtual_memory_bytes") >= rss);
    let fds = sample(&after, "process_open_fds");
    assert!(fds >= 5.0 && fds <= sample(&after, "process_max_fds"), "open fds {fds}");
    assert!(sample(&after, "process_threads") >= 2.0);
    let cpu_before = sample(&before, "process_cpu_seconds_total");
    let cpu_after = sample(&after, "process_cpu_seconds_total");
    assert!(cpu_before > 0.0 && cpu_after > cpu_before, "cpu seconds {cpu_before} then {cpu_after} (a task ran)");
    let start = sample(&after, "process_start_time_seconds");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs_f64();
    assert!(start >= spawned_at - 2.0 && start <= now, "started at {start}, spawned at {spawned_at}, now {now}");

    // Every worker series the Grafana dashboard queries is served.
    let dashboard =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/heimdex.json")).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let queried = dashboard_series(&dashboard);
    assert!(queried.len() >= 10, "{queried:?}");
    let served: BTreeSet<&str> = after.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(['{', ' ']).next()).collect();
    let missing: Vec<&String> = queried.iter().filter(|name| !served.contains(name.as_str())).collect();
    assert!(missing.is_empty(), "the dashboard queries series /metrics does not serve: {missing:?}");
    drop(worker);
    env.cleanup().await;
}

/// The `heimdex_*` and `process_*` series named in the dashboard's queries.
fn dashboard_series(dashboard: &serde_json::Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            out.extend(
                expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| w.starts_with("heimdex_") || w.starts_with("process_"))
                    .map(String::from),
            );
        }
    }
    out
}
