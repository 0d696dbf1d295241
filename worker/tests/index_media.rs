//! Bad and unusual audio through the real pipeline: every case ends in a clear outcome (a permanent
//! error with a readable reason, or an empty transcript), never a panic; and a three-hour file is
//! chunked in bounded memory.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed assertion

mod common;

use std::process::Command;

use common::*;
use heimdex_shared::TaskKind;
use heimdex_shared::contract::SpeechTask;
use heimdex_shared::contract::TaskOptions;
use heimdex_shared::jobs::Run;
use heimdex_worker::TaskError;
use heimdex_worker::index::IndexPipeline;
use heimdex_worker::index::Prompt;
use heimdex_worker::pipeline::{Pipeline, StageTimings, TaskInput};
use uuid::Uuid;

#[track_caller]
fn ffmpeg(args: &[&str]) {
    let out = Command::new("ffmpeg").args(["-nostdin", "-v", "error", "-y"]).args(args).output().expect("ffmpeg");
    assert!(out.status.success(), "ffmpeg {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

async fn task(p: &IndexPipeline, uri: &str) -> Result<heimdex_worker::index::IndexOutput, TaskError> {
    task_with(p, uri, TaskOptions::default()).await
}

async fn task_with(p: &IndexPipeline, uri: &str, options: TaskOptions) -> Result<heimdex_worker::index::IndexOutput, TaskError> {
    let probe = heimdex_shared::media::probe(uri).await.expect("ffprobe");
    let run = Run { job_id: Uuid::new_v4(), video_id: Uuid::new_v4(), token: Uuid::new_v4(), attempt: 1, deaths: 0, generation: 0 };
    let input = TaskInput { run, fenced: None, kind: TaskKind::Index, media: uri.to_string(), probe, options };
    p.process(&input, &StageTimings::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_audio_gives_clear_outcomes() {
    let dir = tempfile::tempdir().unwrap();
    let path = |f: &str| dir.path().join(f).display().to_string();
    let p = load(&settings());

    // No audio track: a permanent error that says so.
    let m = permanent(task(&p, &media("video/silent.mp4")).await);
    assert!(m.contains("has no audio track"), "{m}");
    // Silence only: an empty transcript.
    ffmpeg(&["-f", "lavfi", "-i", "anullsrc=r=44100:cl=stereo", "-t", "6", &path("silence.wav")]);
    let out = task(&p, &path("silence.wav")).await.unwrap();
    assert!(out.segments.is_empty(), "{:?}", out.segments);
    assert!((out.audio_s - 6.0).abs() < 0.05);
    // Quiet noise: no speech either.
    ffmpeg(&["-f", "lavfi", "-i", "anoisesrc=r=16000:a=0.002:seed=7", "-t", "5", &path("noise.wav")]);
    assert!(task(&p, &path("noise.wav")).await.unwrap().segments.is_empty());
    // 0.1 s of speech: too short to hold a word; no panic, no segment.
    ffmpeg(&["-i", &media("speech/goforward.wav"), "-ss", "0.6", "-t", "0.1", &path("short.wav")]);
    let out = task(&p, &path("short.wav")).await.unwrap();
    assert!(out.audio_s < 0.11 && out.segments.len() <= 1, "{out:?}");
    // Corrupt stream: ffprobe already refuses it (the runtime's check); the pipeline itself names ffmpeg's reason.
    assert!(heimdex_shared::media::probe(&media("video/corrupt.mp4")).await.is_err());
    let m = permanent(p.index(&media("video/corrupt.mp4"), None, SpeechTask::Transcribe, &StageTimings::default()).await);
    assert!(m.contains("moov atom not found") || m.contains("Invalid data"), "{m}");
    // A file cut in half: ffmpeg exits 0 with half the audio; the container's length gives it away.
    let m = permanent(task(&p, &media("video/truncated.mp4")).await);
    assert!(m.contains("truncated"), "{m}");
    // A WAV whose data was cut mid-sample: ffmpeg (-xerror) reports the corrupt packet.
    let wav = std::fs::read(bundle().join("media/speech/goforward.wav")).unwrap();
    std::fs::write(path("cut.wav"), &wav[..wav.len() / 2 + 1]).unwrap();
    let m = permanent(p.index(&path("cut.wav"), Some("en"), SpeechTask::Transcribe, &StageTimings::default()).await);
    assert!(m.contains("cannot decode the audio") && m.contains("corrupt"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_audio_is_an_empty_transcript_when_allowed() {
    let mut s = settings();
    s.index.allow_no_audio = true;
    let p = load(&s);
    let out = task(&p, &media("video/silent.mp4")).await.unwrap();
    assert!(out.segments.is_empty() && out.audio_s == 0.0);
    assert_eq!(heimdex_worker::pipeline::Persist::summary(&out)["segments"], 0);
}

/// Translating silence translates nothing: no language is claimed (not English), and the summary
/// names the task but no language spoken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translating_silence_claims_no_language() {
    let dir = tempfile::tempdir().unwrap();
    let quiet = dir.path().join("quiet.wav").display().to_string();
    ffmpeg(&["-f", "lavfi", "-t", "8", "-i", "anullsrc=r=16000:cl=mono", &quiet]);
    let p = load(&settings());
    let options = TaskOptions { task: Some(SpeechTask::Translate), ..TaskOptions::default() };
    let out = task_with(&p, &quiet, options).await.unwrap();
    let summary = heimdex_worker::pipeline::Persist::summary(&out);
    assert!(out.segments.is_empty(), "{summary}");
    assert_eq!(out.language, "", "{summary}");
    assert_eq!((summary["task"].as_str(), summary.get("spoken_language")), (Some("translate"), None), "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hour_file_streams_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let long = dir.path().join("long.flac").display().to_string();
    // 90 min of silence, 3 s of speech, 90 min of silence.
    #[rustfmt::skip]
    ffmpeg(&[
        "-f", "lavfi", "-t", "5400", "-i", "anullsrc=r=16000:cl=mono",
        "-i", &media("speech/goforward.wav"),
        "-f", "lavfi", "-t", "5400", "-i", "anullsrc=r=16000:cl=mono",
        "-filter_complex", "[0][1][2]concat=n=3:v=0:a=1", "-c:a", "flac", &long,
    ]);
    let mut s = settings();
    s.index.language = "en".into();
    let p = load(&s);
    let en = p.transcriber().language_token("en").ok();
    let t = p.transcriber().transcribe(&long, Prompt::transcribe(en), None).await.unwrap();
    assert!((t.stats.audio_s - 10_802.8).abs() < 1.0, "{:?}", t.stats);
    // The chunker never held more than one chunk (30 s) plus its pre-roll, of 3 hours.
    assert!(t.peak_buffer <= 31 * 16_000, "peak buffer {} samples", t.peak_buffer);
    assert_eq!(t.stats.chunks, 1);
    let text: Vec<_> = t.segments.iter().map(|s| s.text.as_str()).collect();
    assert_eq!(word_errors("go forward ten meters", &text.join(" ")).0, 0, "{text:?}");
    assert!((t.segments[0].start_s - 5400.0).abs() < 1.0, "{:?}", t.segments[0]);
    // Over the configured limit: a permanent error, found while streaming.
    let mut s = settings();
    s.index.max_duration_s = 600.0;
    let p = load(&s);
    let m = permanent(p.index(&long, Some("en"), SpeechTask::Transcribe, &StageTimings::default()).await);
    assert!(m.contains("longer than the limit"), "{m}");
}

/// The message of a permanent error; anything else fails the test.
#[track_caller]
fn permanent<T>(result: Result<T, TaskError>) -> String {
    match result {
        Err(e) if e.disposition() == heimdex_shared::error::Disposition::Permanent => e.to_string(),
        Err(e) => panic!("expected a permanent error, got {e:?}"),
        Ok(_) => panic!("expected a permanent error, got a result"),
    }
}
