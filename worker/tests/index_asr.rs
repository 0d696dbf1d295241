//! Whisper through the real pipeline: exact tokens against the bundle's fixture, KV cache against no
//! cache, WER on the speech clips and the sample video, segment timing.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed assertion

mod common;

use common::*;
use heimdex_shared::contract::SpeechTask;
use heimdex_worker::index::Prompt;
use heimdex_worker::media::audio::decode_all;
use heimdex_worker::pipeline::{Pipeline, StageTimings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_tokens_match_fixture_and_kv_cache_matches_no_cache() {
    // The fixture holds the files' fp32 greedy tokens; int8 weights are checked in index_int8.rs.
    let mut s = settings();
    s.index.whisper_int8 = false;
    let p = load(&s);
    let t = p.transcriber();
    let fixture = json("speech/whisper_base_greedy.json");
    let prompt: Vec<u64> = fixture["prompt"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    let sp = &t.cfg.special_tokens;
    assert_eq!(
        prompt,
        vec![u64::from(sp.sot), u64::from(t.language_token("en").unwrap()), u64::from(sp.transcribe), u64::from(sp.notimestamps)]
    );
    let clips = fixture["clips"].as_object().unwrap();
    assert_eq!(clips.len(), 8);
    let en = t.language_token("en").unwrap();
    let mut audio = Vec::new();
    for (name, want) in clips {
        let pcm = decode_all(&media(&format!("speech/{name}")), 60.0).await.unwrap();
        let ids: Vec<u32> = want["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        // One window at a time (batch 1), KV cache: the exact tokens of the fixture.
        let got = t.decode_window(pcm.clone(), Prompt::transcribe(Some(en)), false).await.unwrap();
        assert_eq!(got.tokens, ids, "{name}");
        assert_eq!(t.decode_text(&got.tokens), want["text"].as_str().unwrap(), "{name}");
        audio.push((name.clone(), pcm, ids));
    }
    // All clips at once: batched KV-cache decoding and batched no-cache decoding give the same tokens.
    let batched =
        futures::future::try_join_all(audio.iter().map(|(_, pcm, _)| t.decode_window(pcm.clone(), Prompt::transcribe(Some(en)), false)))
            .await
            .unwrap();
    let nocache = futures::future::try_join_all(
        audio.iter().map(|(_, pcm, _)| t.decode_window_without_cache(pcm.clone(), Prompt::transcribe(Some(en)), false)),
    )
    .await
    .unwrap();
    for (((name, _, ids), b), n) in audio.iter().zip(&batched).zip(&nocache) {
        assert_eq!(&b.tokens, ids, "{name}: batched KV cache");
        assert_eq!(&n.tokens, ids, "{name}: no KV cache");
    }
    assert!(t.asr.batch_histogram().iter().skip(2).any(|&c| c > 0), "chunks were never batched: {:?}", t.asr.batch_histogram());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speech_clips_and_sample_video_transcribe_within_wer_bounds() {
    let p = load(&settings());
    let (mut errors, mut words) = (0, 0);
    for (file, reference) in transcripts() {
        let (out, _) = p.index(&media(&format!("speech/{file}")), None, SpeechTask::Transcribe, &StageTimings::default()).await.unwrap();
        assert_eq!(out.language, "en", "{file}: detected language");
        let (e, n) = word_errors(&reference, &out.text());
        eprintln!("{file}: {e}/{n} | {}", out.text());
        errors += e;
        words += n;
    }
    let wer = errors as f64 / words as f64;
    assert!(wer <= 0.05, "WER over the speech clips {wer:.3} > 5 %");

    let sample = json("video/sample.json");
    let timings = StageTimings::default();
    let (out, transcript) = p.index(&media("video/sample.mp4"), None, SpeechTask::Transcribe, &timings).await.unwrap();
    let (e, n) = word_errors(sample["transcript"].as_str().unwrap(), &out.text());
    assert!((e as f64 / n as f64) <= 0.10, "sample.mp4 WER {e}/{n}: {}", out.text());
    assert!((out.audio_s - 25.0).abs() < 0.1, "{}", out.audio_s);
    assert_eq!(out.language, "en");
    let segs = &out.segments;
    assert!(segs.len() >= 2, "{segs:?}");
    for pair in segs.windows(2) {
        assert!(pair[1].start_s >= pair[0].start_s && pair[1].start_s >= pair[0].end_s - 0.01, "{pair:?}");
    }
    for s in segs {
        assert!(s.start_s >= 0.0 && s.end_s <= out.audio_s + 0.01 && s.end_s >= s.start_s, "{s:?}");
        assert!(s.confidence > 0.0 && s.confidence <= 1.0);
        assert_eq!(s.embedding.len(), 384);
    }
    let speech_start = sample["speech_segments"][0]["start_s"].as_f64().unwrap();
    assert!((segs[0].start_s - speech_start).abs() <= 1.0, "first segment at {} s", segs[0].start_s);
    assert!(segs.last().unwrap().end_s >= sample["speech_end_s"].as_f64().unwrap() - 2.0);
    assert!(transcript.stats.chunks >= 1 && transcript.peak_buffer <= 31 * 16_000, "{:?}", transcript.stats);
    let stages = timings.to_json();
    assert!(stages["asr"].as_f64().unwrap() > 0.0 && stages["embed"].as_f64().is_some(), "{stages}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_model_has_one_name_and_a_timed_warm_up() {
    let s = settings();
    let p = load(&s);
    let reports = p.warm_up().await.unwrap();
    // Whisper's batches count their time by phase (heimdex_inference_phase_seconds_total); warm-up
    // runs each phase, the alignment pass of word timestamps included.
    for phase in ["encode", "decode", "align"] {
        let seconds = engine(&s).metrics().phase_seconds(heimdex_worker::index::WHISPER, phase);
        assert!(seconds > 0.0, "whisper's {phase} phase counted {seconds} s over warm-up");
    }
    let mut models: Vec<String> = p.models().into_iter().map(|m| m.name).collect();
    let mut warmed: Vec<String> = reports.iter().map(|r| r.model.clone()).collect();
    models.sort();
    warmed.sort();
    assert_eq!(models, warmed, "models() and the warm-up reports name different models");
    assert_eq!(models.len(), 3, "{models:?}");
    for r in &reports {
        assert!(!r.duration.is_zero(), "{} warmed up in no time", r.model);
    }
    for m in p.models() {
        assert!(std::path::Path::new(&m.path).exists(), "{}: {}", m.name, m.path);
    }
}

/// Whisper's translate task (`options.task = "translate"`): Spanish speech gives English text, and
/// the transcript's language is then `en` with the language spoken beside it. The voice is synthetic
/// (espeak-ng, which scripts/setup installs): the bundle holds no Spanish recording.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spanish_speech_translates_to_english() {
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("es.wav");
    let spoken = "Buenos días. Me gusta mucho el café con leche. Mi perro se llama Max y le gusta correr en la playa.";
    let status = std::process::Command::new("espeak-ng")
        .args(["-v", "es", "-s", "140", "-w"])
        .arg(&wav)
        .arg(spoken)
        .status()
        .expect("espeak-ng (scripts/setup installs it)");
    assert!(status.success(), "espeak-ng could not speak Spanish");
    let p = load(&settings());
    let uri = wav.display().to_string();
    let (transcribed, _) = p.index(&uri, None, SpeechTask::Transcribe, &StageTimings::default()).await.unwrap();
    let (translated, _) = p.index(&uri, None, SpeechTask::Translate, &StageTimings::default()).await.unwrap();
    let (as_spoken, english) = (transcribed.text().to_lowercase(), translated.text().to_lowercase());
    eprintln!("transcribe: {as_spoken}\ntranslate: {english}");
    assert_eq!((transcribed.language.as_str(), transcribed.spoken_language.as_deref()), ("es", None));
    for word in ["café", "leche", "playa"] {
        assert!(as_spoken.contains(word), "the transcription keeps the Spanish {word:?}: {as_spoken}");
    }
    assert_eq!((translated.language.as_str(), translated.spoken_language.as_deref()), ("en", Some("es")));
    for word in ["coffee", "milk", "dog", "beach"] {
        assert!(english.contains(word), "the translation has {word:?}: {english}");
    }
    for word in ["leche", "playa", "perro"] {
        assert!(!english.contains(word), "the translation has no Spanish {word:?}: {english}");
    }
}
