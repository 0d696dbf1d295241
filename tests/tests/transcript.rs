//! `heimdex transcript`: the sample video's transcript as SubRip and WebVTT that third-party parsers
//! accept (Python's `srt` and `webvtt-py`), as JSON and as text, and clear refusals.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use heimdex_shared::contract::TaskKind;
use heimdex_shared::fleet::WorkerState;
use heimdex_tests::{TestEnv, words_found};

/// Cues as a parser read them: (start s, end s, text).
fn parse_with_python(script: &str, document: &str) -> Vec<(f64, f64, String)> {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/../.deps/venv/bin/python");
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the venv of scripts/setup");
    child.stdin.take().unwrap().write_all(document.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the parser refused it: {}\n{document}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("cues as JSON")
}

const SRT: &str = "import json, srt, sys
subs = list(srt.parse(sys.stdin.read(), ignore_errors=False))
print(json.dumps([(s.start.total_seconds(), s.end.total_seconds(), s.content) for s in subs]))";

const VTT: &str = "import io, json, sys, webvtt
def secs(t):
    h, m, s = t.split(':')
    return int(h) * 3600 + int(m) * 60 + float(s)
cues = webvtt.read_buffer(io.StringIO(sys.stdin.read()))
print(json.dumps([(secs(c.start), secs(c.end), c.text) for c in cues]))";

#[tokio::test(flavor = "multi_thread")]
async fn the_sample_videos_transcript_exports_as_srt_vtt_json_and_text() {
    let env = TestEnv::new().await;
    env.add_media("video/sample.mp4", "sample.mp4");
    env.add_media("video/silent.mp4", "pending.mp4");
    let worker = env.spawn_worker("index", "transcript", &[]);
    env.wait_state(&worker, WorkerState::Warm, Duration::from_secs(180)).await;
    let (video, job) = env.enqueue("sample.mp4", TaskKind::Index, false).await.unwrap();
    env.wait_job(job, "succeeded", Duration::from_secs(300)).await;
    let stored: Vec<(f64, f64, String)> =
        sqlx::query_as("SELECT start_s, end_s, text FROM transcript_segments WHERE video_id = $1 ORDER BY idx")
            .bind(video)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert!(stored.len() >= 3, "{stored:?}");

    for (format, parser) in [("srt", SRT), ("vtt", VTT)] {
        let (code, out, err) = env.cli(&["transcript", "sample.mp4", "--format", format]).await;
        assert_eq!(code, 0, "{err}");
        let cues = parse_with_python(parser, &out);
        assert_eq!(cues.len(), stored.len(), "{format}: {out}");
        for ((start, end, text), (s, e, t)) in cues.iter().zip(&stored) {
            assert!((start - s).abs() < 0.001 && (end - e).abs() < 0.001, "{format}: {start}-{end} against {s}-{e}");
            assert_eq!(text, t.trim(), "{format}");
        }
        let all: String = cues.iter().map(|c| c.2.as_str()).collect::<Vec<_>>().join(" ");
        let sentence = "he was not an ill disposed young man";
        assert!(words_found(sentence, &all) == 1.0, "{format}: {all}");
    }

    // By video id, as JSON, each line with its timed words (index.word_timestamps is on by default).
    let (code, out, err) = env.cli(&["transcript", &video.to_string(), "--format", "json"]).await;
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["video_id"], video.to_string());
    assert_eq!(json["language"], "en");
    let lines = json["segments"].as_array().unwrap();
    assert_eq!(lines.len(), stored.len());
    for line in lines {
        let (start, end) = (line["start_s"].as_f64().unwrap(), line["end_s"].as_f64().unwrap());
        let words = line["words"].as_array().unwrap_or_else(|| panic!("a line without words: {line}"));
        // Spacing aside: "ill-disposed" is the words "ill" and "-disposed", as Whisper splits it.
        let joined: String = words.iter().map(|w| w["text"].as_str().unwrap()).collect();
        let text: String = line["text"].as_str().unwrap().chars().filter(|c| !c.is_whitespace()).collect();
        assert_eq!(joined, text, "{line}");
        for w in words {
            let (ws, we) = (w["start_s"].as_f64().unwrap(), w["end_s"].as_f64().unwrap());
            assert!(ws >= start - 1.0 && we <= end + 1.0 && ws <= we, "word {w} outside its line {start}-{end}");
        }
    }

    // WebVTT with each word timed inside its cue: the parser reads the same cues and text, and the
    // cue timestamps (`<00:00:01.400>`) increase inside each cue.
    let (code, out, err) = env.cli(&["transcript", "sample.mp4", "--format", "vtt", "--words"]).await;
    assert_eq!(code, 0, "{err}");
    let cues = parse_with_python(VTT, &out);
    assert_eq!(cues.len(), stored.len(), "{out}");
    for ((_, _, text), (_, _, t)) in cues.iter().zip(&stored) {
        assert_eq!(text.split_whitespace().collect::<Vec<_>>(), t.split_whitespace().collect::<Vec<_>>(), "tags are not text: {out}");
    }
    let tags: Vec<&str> = out.split('<').skip(1).filter_map(|t| t.split_once('>').map(|(tag, _)| tag)).collect();
    assert!(tags.len() >= stored.len(), "a cue timestamp for most words: {out}");
    assert!(tags.iter().all(|t| t.len() == 12 && t.starts_with("00:00:")), "{tags:?}");
    let (code, _, err) = env.cli(&["transcript", "sample.mp4", "--format", "srt", "--words"]).await;
    assert_eq!(code, 2, "SubRip cannot time words: {err}");
    assert!(err.contains("--format vtt"), "{err}");
    let (code, out, _) = env.cli(&["transcript", "sample.mp4", "--format", "txt"]).await;
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), stored.len());

    // Refusals: an unknown video, a video whose index job has not run.
    let (code, _, err) = env.cli(&["transcript", "nothing-here.mp4"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("no video"), "{err}");
    drop(worker);
    env.enqueue("pending.mp4", TaskKind::Vision, false).await.unwrap();
    let (code, _, err) = env.cli(&["transcript", "pending.mp4"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("no transcript yet"), "{err}");
    env.cleanup().await;
}
