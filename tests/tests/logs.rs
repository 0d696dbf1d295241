//! Worker logs as a collector reads them: a worker whose stderr is a file (as in the demo, compose and
//! Kubernetes) writes one JSON object per line and no colour escapes, through a task, a drained stop
//! and a fatal error; colours appear only when stderr is a terminal (a pseudo-terminal from `script`), and a
//! forced `log.format = "pretty"` in a file is plain text.

use std::time::Duration;

use heimdex_shared::contract::TaskKind;
use heimdex_shared::fleet::WorkerState;
use heimdex_tests::{TestEnv, binary};
use serde_json::Value;

const WARM: Duration = Duration::from_secs(180);
const TASK: Duration = Duration::from_secs(240);
const ESC: u8 = 0x1b;

/// Every line of a log file as a JSON object; fails on the first line that is not one.
#[track_caller]
fn json_lines(log: &[u8]) -> Vec<Value> {
    let text = String::from_utf8(log.to_vec()).expect("a UTF-8 log");
    assert!(!log.contains(&ESC), "colour escapes in a log file:\n{text}");
    let lines: Vec<Value> = text
        .lines()
        .enumerate()
        .map(|(i, line)| match serde_json::from_str::<Value>(line) {
            Ok(v) if v.is_object() => v,
            _ => panic!("line {} is not a JSON object: {line:?}\nthe whole log:\n{text}", i + 1),
        })
        .collect();
    for line in &lines {
        assert!(line["timestamp"].is_string() && line["level"].is_string() && line["message"].is_string(), "{line}");
    }
    lines
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_logging_to_a_file_writes_json_lines_without_colour() {
    let env = TestEnv::new().await;
    env.add_media("video/sample.mp4", "logged.mp4");
    let mut worker = env.spawn_worker("vision", "json-logs", &[]);
    env.wait_state(&worker, WorkerState::Warm, WARM).await;
    let (_, job) = env.enqueue("logged.mp4", TaskKind::Vision, false).await.unwrap();
    env.wait_job(job, "succeeded", TASK).await;
    worker.signal("TERM");
    assert_eq!(worker.wait_exit(Duration::from_secs(60)).await, Some(0), "{}", worker.log());

    let lines = json_lines(&std::fs::read(&worker.log).expect("the worker's log file"));
    let states: Vec<&str> = lines.iter().filter(|l| l["message"] == "worker state").filter_map(|l| l["to"].as_str()).collect();
    assert_eq!(states, ["loading", "warming", "warm", "draining"], "the lifecycle, one JSON line per change");
    let warm = lines.iter().find(|l| l["message"] == "warm").unwrap_or_else(|| panic!("no warm line: {lines:#?}"));
    assert!(warm["warmup"].as_str().is_some_and(|w| w.ends_with('s')), "the warm-up time as a field: {warm}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn colours_reach_a_terminal_only_and_a_failing_worker_still_logs_json_to_a_file() {
    let env = TestEnv::new().await;
    let missing = env.media.path().join("no-models-here");
    let missing = missing.to_str().unwrap();

    // A file, default format: JSON, the fatal error included.
    let mut worker = env.spawn_worker("vision", "no-models", &[("HEIMDEX__MODELS__DIR", missing)]);
    assert_eq!(worker.wait_exit(Duration::from_secs(60)).await, Some(1), "{}", worker.log());
    let lines = json_lines(&std::fs::read(&worker.log).unwrap());
    let fatal = lines.iter().find(|l| l["level"] == "ERROR").unwrap_or_else(|| panic!("no ERROR line: {lines:#?}"));
    assert!(fatal["error"].as_str().is_some_and(|e| e.contains("no-models-here")), "the error names the model folder: {fatal}");

    // A file, `pretty` forced: plain compact lines, still no escapes.
    let mut worker =
        env.spawn_worker("vision", "no-models-pretty", &[("HEIMDEX__MODELS__DIR", missing), ("HEIMDEX__LOG__FORMAT", "pretty")]);
    assert_eq!(worker.wait_exit(Duration::from_secs(60)).await, Some(1), "{}", worker.log());
    let log = worker.log();
    assert!(!log.as_bytes().contains(&ESC), "colour escapes in a file:\n{log}");
    assert!(log.lines().any(|l| l.contains("ERROR") && l.contains("no-models-here")), "{log}");
    assert!(log.lines().all(|l| serde_json::from_str::<Value>(l).is_err()), "pretty is not JSON:\n{log}");

    // A terminal (a pseudo-terminal from util-linux `script`), default format: coloured lines; with
    // NO_COLOR, none.
    for (no_color, coloured) in [("", true), ("1", false)] {
        let out = tokio::process::Command::new("script")
            .args(["-qec", &binary("worker-vision").display().to_string(), "/dev/null"])
            .envs(env.env())
            .env("HEIMDEX__MODELS__DIR", missing)
            .env("HEIMDEX__WORKER__ID", "no-models-tty")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", no_color)
            .stdin(std::process::Stdio::null())
            .output();
        let out = tokio::time::timeout(Duration::from_secs(60), out).await.expect("the worker exits").expect("script (util-linux)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("no-models-here"), "the terminal shows the error:\n{text}");
        assert_eq!(out.stdout.contains(&ESC), coloured, "NO_COLOR={no_color:?}: colour on a terminal is {coloured}:\n{text}");
        assert!(
            text.lines().all(|l| serde_json::from_str::<Value>(l.trim_end_matches('\r')).is_err()),
            "a terminal gets lines for people:\n{text}"
        );
    }
    env.cleanup().await;
}
