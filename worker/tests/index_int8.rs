//! Whisper with int8 weights (`index.whisper_int8`, the default) against the files' fp32 greedy
//! transcripts: the rewrite may move a comma or spell a number, not lose words.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed assertion

mod common;

use common::*;
use heimdex_worker::index::Prompt;
use heimdex_worker::media::audio::decode_all;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn int8_transcripts_keep_the_fp32_words() {
    let s = settings();
    assert!(s.index.whisper_int8, "int8 is the default");
    let p = load(&s);
    let t = p.transcriber();
    let en = t.language_token("en").unwrap();
    let fixture = json("speech/whisper_base_greedy.json");
    let (mut errors, mut words, mut exact) = (0, 0, 0);
    let clips = fixture["clips"].as_object().unwrap();
    let mut audio = Vec::new();
    for (name, want) in clips {
        let pcm = decode_all(&media(&format!("speech/{name}")), 60.0).await.unwrap();
        let got = t.decode_window(pcm.clone(), Prompt::transcribe(Some(en)), false).await.unwrap();
        let (text, reference) = (t.decode_text(&got.tokens), want["text"].as_str().unwrap());
        let (e, n) = word_errors(reference, &text);
        eprintln!("{name}: {e}/{n} words differ from fp32 | {text}");
        exact += usize::from(text == reference);
        errors += e;
        words += n;
        audio.push(pcm);
    }
    let wer = errors as f64 / words as f64;
    eprintln!("int8 against fp32: {errors}/{words} words ({:.1} %), {exact}/{} clips identical", 100.0 * wer, clips.len());
    assert!(wer <= 0.03, "int8 transcripts differ from fp32 in {errors} of {words} words");
    assert!(exact * 2 >= clips.len(), "only {exact} of {} clips decode to the fp32 text", clips.len());
    // Batched: MatMulNBits quantises activations per row (in blocks along K), so a row's result should
    // not depend on its neighbours; whatever the kernel does, the words must stay.
    let batched = futures::future::try_join_all(audio.iter().map(|pcm| t.decode_window(pcm.clone(), Prompt::transcribe(Some(en)), false)))
        .await
        .unwrap();
    let (mut errors, mut words) = (0, 0);
    for ((name, want), b) in clips.iter().zip(&batched) {
        let (e, n) = word_errors(want["text"].as_str().unwrap(), &t.decode_text(&b.tokens));
        eprintln!("{name}, batched: {e}/{n}");
        errors += e;
        words += n;
    }
    assert!(errors as f64 <= 0.03 * words as f64, "batched int8 transcripts differ from fp32 in {errors} of {words} words");
}
