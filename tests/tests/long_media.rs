//! Long media through the queue: an index task killed midway resumes after its stored windows, and a
//! three-hour recording completes at its first attempt.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use heimdex_shared::contract::TaskKind;
use heimdex_shared::fleet::WorkerState;
use heimdex_tests::{TestEnv, bundle_media, words_found};
use uuid::Uuid;

const WARM: Duration = Duration::from_secs(180);

fn ffmpeg(args: &[&str], out: &Path) {
    let status = Command::new("ffmpeg").args(["-nostdin", "-v", "error", "-y"]).args(args).arg(out).status().expect("ffmpeg");
    assert!(status.success(), "ffmpeg could not make {}", out.display());
}

/// The transcript of a video as stored, one string.
async fn transcript(env: &TestEnv, video: Uuid) -> String {
    sqlx::query_scalar("SELECT coalesce(string_agg(text, ' ' ORDER BY idx), '') FROM transcript_segments WHERE video_id = $1")
        .bind(video)
        .fetch_one(&env.pool)
        .await
        .expect("transcript")
}

async fn stored_windows(env: &TestEnv, video: Uuid) -> i64 {
    env.count("SELECT count(*) FROM index_checkpoints WHERE video_id = $1", video).await
}

fn summary_count(summary: Option<&serde_json::Value>, key: &str) -> u64 {
    summary.and_then(|s| s[key].as_u64()).unwrap_or_else(|| panic!("summary without {key}: {summary:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_index_task_resumes_after_its_stored_windows_and_gives_the_same_transcript() {
    let env = TestEnv::new().await;
    // 200 s: the sample video eight times over, so that it has many Whisper windows.
    let long = env.media.path().join("long.mp4");
    let sample = bundle_media("video/sample.mp4");
    ffmpeg(&["-stream_loop", "7", "-i", &sample.display().to_string(), "-c", "copy"], &long);
    std::fs::copy(&long, env.media.path().join("same.mp4")).expect("copy");
    // Two windows in flight at a time, so the kill lands between stored windows and windows to come.
    let small = [("HEIMDEX__ENGINE__MAX_BATCH", "2")];

    let mut first = env.spawn_worker("index", "resume-1", &small);
    env.wait_state(&first, WorkerState::Warm, WARM).await;
    let (video, job) = env.enqueue("long.mp4", TaskKind::Index, false).await.unwrap();
    env.wait_for("two stored windows", Duration::from_secs(300), || async { (stored_windows(&env, video).await >= 2).then_some(()) }).await;
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10)).await;
    let stored = stored_windows(&env, video).await;

    let second = env.spawn_worker("index", "resume-2", &small);
    let done = env.wait_job(job, "succeeded", Duration::from_secs(600)).await;
    let windows = summary_count(done.summary.as_ref(), "windows");
    let resumed = summary_count(done.summary.as_ref(), "resumed_windows");
    assert_eq!(done.attempts, 2, "{done:?}");
    assert_eq!(resumed, stored as u64, "every stored window is reused: {done:?}");
    assert!(resumed < windows, "the kill left windows to decode: {done:?}");
    assert!(second.log().contains("resumed from the checkpoints"), "{}", second.log());
    assert_eq!(stored_windows(&env, video).await, 0, "the results transaction clears the checkpoints");

    // The same audio under another name, uninterrupted, on the same worker.
    let (other, other_job) = env.enqueue("same.mp4", TaskKind::Index, false).await.unwrap();
    let reference = env.wait_job(other_job, "succeeded", Duration::from_secs(600)).await;
    assert_eq!(summary_count(reference.summary.as_ref(), "resumed_windows"), 0);
    assert_eq!(summary_count(reference.summary.as_ref(), "windows"), windows);
    let (resumed_text, reference_text) = (transcript(&env, video).await, transcript(&env, other).await);
    let sentence = "unless to be rather cold hearted and rather selfish is to be ill disposed";
    assert!(words_found(sentence, &reference_text) == 1.0, "{reference_text}");
    assert_eq!(resumed_text, reference_text);
    drop(second);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forced_rerun_decodes_every_window_again() {
    let env = TestEnv::new().await;
    env.add_long_video("long.mp4");
    let small = [("HEIMDEX__ENGINE__MAX_BATCH", "2")];
    let mut first = env.spawn_worker("index", "force-1", &small);
    env.wait_state(&first, WorkerState::Warm, WARM).await;
    let (video, job) = env.enqueue("long.mp4", TaskKind::Index, false).await.unwrap();
    env.wait_for("a stored window", Duration::from_secs(300), || async { (stored_windows(&env, video).await >= 1).then_some(()) }).await;
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10)).await;
    assert!(stored_windows(&env, video).await >= 1);

    // A forced re-run (a new model, new settings: the user asked for it afresh) reuses nothing: the
    // stored windows stay (the enqueue touches only the job) but belong to the job's older generation.
    let stored = stored_windows(&env, video).await;
    env.enqueue("long.mp4", TaskKind::Index, true).await.unwrap();
    assert_eq!(stored_windows(&env, video).await, stored, "--force leaves the index checkpoints to the index pipeline");
    let _second = env.spawn_worker("index", "force-2", &small);
    let done = env.wait_job(job, "succeeded", Duration::from_secs(600)).await;
    assert_eq!(summary_count(done.summary.as_ref(), "resumed_windows"), 0, "{done:?}");
    assert!(summary_count(done.summary.as_ref(), "windows") >= 2, "{done:?}");
    assert_eq!(stored_windows(&env, video).await, 0, "the results transaction clears every generation's checkpoints");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_three_hour_recording_completes_at_its_first_attempt() {
    let env = TestEnv::new().await;
    // Three hours of silence with speech near the start, in the middle and near the end.
    let speech = |f: &str| bundle_media(&format!("speech/{f}")).display().to_string();
    let placed = [
        ("sense_and_sensibility_01_austen_64kb-0870.wav", 10.0),
        ("sense_and_sensibility_01_austen_64kb-0890.wav", 5400.0),
        ("sense_and_sensibility_01_austen_64kb-0930.wav", 10_780.0),
    ];
    let mut args: Vec<String> = ["-f", "lavfi", "-t", "10800", "-i", "anullsrc=r=16000:cl=mono"].map(String::from).to_vec();
    let mut graph = String::new();
    for (i, (file, at)) in placed.iter().enumerate() {
        args.extend(["-i".into(), speech(file)]);
        graph.push_str(&format!("[{}]adelay=delays={}:all=1[a{i}];", i + 1, (at * 1000.0) as u64));
    }
    graph.push_str("[0][a0][a1][a2]amix=inputs=4:normalize=0:duration=first");
    args.extend(["-filter_complex".into(), graph, "-c:a".into(), "flac".into()]);
    let path = env.media.path().join("three-hours.flac");
    ffmpeg(&args.iter().map(String::as_str).collect::<Vec<_>>(), &path);

    let worker = env.spawn_worker("index", "three-hours", &[]);
    env.wait_state(&worker, WorkerState::Warm, WARM).await;
    let (video, job) = env.enqueue("three-hours.flac", TaskKind::Index, false).await.unwrap();
    let done = env.wait_job(job, "succeeded", Duration::from_secs(1500)).await;
    assert_eq!(done.attempts, 1, "{done:?}");
    let audio_s = done.summary.as_ref().and_then(|s| s["audio_s"].as_f64()).expect("audio_s");
    assert!((audio_s - 10_800.0).abs() < 1.0, "{done:?}");

    // Each clip's words, at the time it was placed.
    let clips: std::collections::HashMap<String, String> = heimdex_tests::speech_clips().into_iter().collect();
    for (file, at) in placed {
        let text: String = sqlx::query_scalar(
            "SELECT coalesce(string_agg(text, ' ' ORDER BY idx), '') FROM transcript_segments
             WHERE video_id = $1 AND start_s BETWEEN $2 - 1 AND $2 + 15",
        )
        .bind(video)
        .bind(at)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        let found = words_found(&clips[file], &text);
        assert!(found >= 0.8, "{file} at {at} s: {found:.2} of its words in {text:?}");
    }
    env.cleanup().await;
}
