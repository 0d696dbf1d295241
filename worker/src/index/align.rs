//! Word timestamps the way Whisper computes them (`openai-whisper`'s `timing.py`, which faster-whisper
//! follows): the decoded text is run through the decoder once more, without timestamp tokens; the
//! cross-attention weights of the model's alignment heads say which audio frame each token attends
//! to; after a softmax over the window's frames, a normalisation per frame across tokens, a median
//! filter along time and the mean over heads, dynamic time warping finds the monotonic path from the
//! first token to the last through the frames, and a token starts where the path reaches it. Tokens
//! are then grouped into words (at spaces and punctuation; at characters in languages written
//! without spaces), punctuation is merged into its word, and words longer than twice the median word
//! (at a sentence end, or at a segment's first and last word) are cut to it. Last, the words are
//! fitted to the speech the VAD heard ([`fit_to_speech`]).
//!
//! [`token_times`] is the numeric part (run on the model thread); [`words`], [`clamp_long_words`] and
//! [`fit_to_speech`] need the tokenizer, the segments and the window (run by the transcriber).

use super::pack::Piece;
use super::persist::{Segment, Word};

/// Encoder positions per second of audio (1500 per 30 s window).
pub const POSITIONS_PER_S: f32 = 50.0;
/// Width of the median filter along time (Whisper's `medfilt_width`).
const MEDIAN_WIDTH: usize = 7;
/// Punctuation merged into the word after it (`prepend_punctuations`) and before it
/// (`append_punctuations`), as Whisper's defaults.
const PREPENDED: &str = "\"'“¿([{-";
const APPENDED: &str = "\"'.。,，!！?？:：”)]}、";
/// A word that ends a sentence, for [`clamp_long_words`].
const SENTENCE_ENDS: &str = ".。!！?？";
/// Languages written without spaces between words: their words are characters (Whisper's list).
const WITHOUT_SPACES: [&str; 6] = ["zh", "ja", "th", "lo", "my", "yue"];

/// The time (seconds from the window's start) at which each text token starts, and one more: where
/// the text ends (the position of end-of-text).
///
/// `heads` holds, per alignment head, the scaled cross-attention scores over the alignment sequence
/// (`rows` positions: the `prompt` tokens ending in `<|notimestamps|>`, the text tokens, end-of-text),
/// row-major [rows × `frames`], already cut to the encoder positions of the window's audio. The output
/// at a position predicts the next token, so the row of `<|notimestamps|>` aligns the first text
/// token and the row of the last text token aligns end-of-text. Empty when there is no text token or
/// no frame.
pub fn token_times(heads: &[Vec<f32>], rows: usize, frames: usize, prompt: usize) -> Vec<f32> {
    if heads.is_empty() || frames == 0 || prompt == 0 || rows < prompt + 2 {
        return Vec::new();
    }
    let mut mean = vec![0f32; rows * frames];
    for scores in heads {
        let mut w = scores.clone();
        for row in w.chunks_exact_mut(frames) {
            softmax(row);
        }
        // Each frame's weights standardised across tokens.
        for f in 0..frames {
            let m = (0..rows).map(|r| w[r * frames + f]).sum::<f32>() / rows as f32;
            let var = (0..rows).map(|r| (w[r * frames + f] - m).powi(2)).sum::<f32>() / rows as f32;
            let sd = var.sqrt();
            for r in 0..rows {
                let v = &mut w[r * frames + f];
                *v = if sd > 0.0 { (*v - m) / sd } else { 0.0 };
            }
        }
        for (row, out) in w.chunks_exact(frames).zip(mean.chunks_exact_mut(frames)) {
            for (o, v) in out.iter_mut().zip(median_filter(row)) {
                *o += v / heads.len() as f32;
            }
        }
    }
    // From the row of <|notimestamps|> (the last prompt token) to the row before end-of-text.
    let matrix = &mean[(prompt - 1) * frames..(rows - 1) * frames];
    let n = matrix.len() / frames;
    let cost: Vec<f32> = matrix.iter().map(|v| -v).collect();
    let path = dtw(&cost, n, frames);
    // A token starts at the first frame the path gives it.
    let mut times = Vec::with_capacity(n);
    let mut last = usize::MAX;
    for (i, j) in path {
        if i != last {
            times.push(j as f32 / POSITIONS_PER_S);
            last = i;
        }
    }
    times
}

fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    row.iter_mut().for_each(|v| *v /= sum);
}

/// The median over a window of [`MEDIAN_WIDTH`] values around each, the edges reflected (without
/// repeating the edge value, as `torch.nn.functional.pad(mode="reflect")`); a row no longer than half
/// the window is returned as it is, as Whisper does.
fn median_filter(row: &[f32]) -> Vec<f32> {
    let pad = MEDIAN_WIDTH / 2;
    let n = row.len();
    if n <= pad {
        return row.to_vec();
    }
    let at = |i: isize| -> f32 {
        let j = if i < 0 {
            -i
        } else if i as usize >= n {
            2 * (n as isize - 1) - i
        } else {
            i
        };
        row[j as usize]
    };
    let mut window = [0f32; MEDIAN_WIDTH];
    (0..n)
        .map(|i| {
            for (k, w) in window.iter_mut().enumerate() {
                *w = at(i as isize + k as isize - pad as isize);
            }
            median_of_7(window)
        })
        .collect()
}

/// The median of seven finite values, by a sorting network: 16 compare-exchanges, each a select the
/// compiler makes one `minss` and one `maxss` (`f32::min` and `max` also order NaN, which costs three
/// more instructions and made the network slower than sorting). The filter runs for every frame of
/// every token of every alignment head, about 1.3 million times a window: about 10 ns a value against
/// 21–26 for sorting each window of seven (a micro-benchmark over a 1,500-frame row, opt-level 3).
#[inline]
fn median_of_7(mut v: [f32; MEDIAN_WIDTH]) -> f32 {
    const { assert!(MEDIAN_WIDTH == 7, "the network sorts seven values") };
    const NETWORK: [(usize, usize); 16] =
        [(0, 6), (2, 3), (4, 5), (0, 2), (1, 4), (3, 6), (0, 1), (2, 5), (3, 4), (1, 2), (4, 6), (2, 3), (4, 5), (1, 2), (3, 4), (5, 6)];
    for (i, j) in NETWORK {
        let (a, b) = (v[i], v[j]);
        v[i] = if b < a { b } else { a };
        v[j] = if b < a { a } else { b };
    }
    v[MEDIAN_WIDTH / 2]
}

/// The monotonic alignment of rows to columns of least total `cost` (row-major [n × m]), as
/// `openai-whisper`'s `dtw_cpu` (ties resolved the same way): (row, column) pairs from (0, 0) to
/// (n − 1, m − 1), each step one row down, one column right, or both.
fn dtw(cost: &[f32], n: usize, m: usize) -> Vec<(usize, usize)> {
    let w = m + 1;
    let mut acc = vec![f32::INFINITY; (n + 1) * w];
    // 0: diagonal, 1: from the row above, 2: from the column to the left.
    let mut trace = vec![2u8; (n + 1) * w];
    acc[0] = 0.0;
    for j in 1..=m {
        for i in 1..=n {
            let (c0, c1, c2) = (acc[(i - 1) * w + j - 1], acc[(i - 1) * w + j], acc[i * w + j - 1]);
            let (c, t) = if c0 < c1 && c0 < c2 {
                (c0, 0)
            } else if c1 < c0 && c1 < c2 {
                (c1, 1)
            } else {
                (c2, 2)
            };
            acc[i * w + j] = cost[(i - 1) * m + j - 1] + c;
            trace[i * w + j] = t;
        }
    }
    for i in 0..=n {
        trace[i * w] = 1;
    }
    for t in trace.iter_mut().take(w) {
        *t = 2;
    }
    let (mut i, mut j) = (n, m);
    let mut path = Vec::with_capacity(n + m);
    while i > 0 && j > 0 {
        path.push((i - 1, j - 1));
        match trace[i * w + j] {
            0 => {
                i -= 1;
                j -= 1;
            }
            1 => i -= 1,
            _ => j -= 1,
        }
    }
    path.reverse();
    path
}

/// The words of a segment's text tokens, with times on the window's clock and the mean probability
/// of their tokens. `times` holds the start of each token and then the end of the last one
/// (`tokens.len() + 1` values, from [`token_times`]); `piece` decodes tokens to text; `language` is
/// the transcript's ISO code.
pub fn words(tokens: &[u32], probs: &[f32], times: &[f32], language: &str, piece: impl Fn(&[u32]) -> String) -> Vec<Word> {
    if tokens.is_empty() || times.len() != tokens.len() + 1 || probs.len() != tokens.len() {
        return Vec::new();
    }
    // Whole characters first: a character can span tokens (byte-level BPE).
    let mut pieces: Vec<(String, std::ops::Range<usize>)> = Vec::new();
    let mut start = 0;
    for end in 1..=tokens.len() {
        let text = piece(&tokens[start..end]);
        if !text.contains('\u{fffd}') || end == tokens.len() {
            pieces.push((text, start..end));
            start = end;
        }
    }
    let spaced = !WITHOUT_SPACES.contains(&language);
    let mut groups: Vec<(String, std::ops::Range<usize>)> = Vec::new();
    for (text, range) in pieces {
        let punctuation = !text.trim().is_empty() && text.trim().chars().all(|c| c.is_ascii_punctuation());
        match groups.last_mut() {
            Some((word, r)) if spaced && !text.starts_with(' ') && !punctuation => {
                word.push_str(&text);
                r.end = range.end;
            }
            _ => groups.push((text, range)),
        }
    }
    merge_punctuation(&mut groups);
    groups
        .into_iter()
        .filter(|(text, range)| !text.trim().is_empty() && !range.is_empty())
        .map(|(text, range)| Word {
            text: text.trim().to_string(),
            start_s: f64::from(times[range.start]),
            end_s: f64::from(times[range.end]),
            probability: probs[range.clone()].iter().sum::<f32>() / range.len() as f32,
        })
        .collect()
}

/// Opening punctuation joins the word after it, closing punctuation the word before it; the joined
/// word keeps its own times (Whisper's `merge_punctuations`). The emptied groups stay, empty.
fn merge_punctuation(groups: &mut [(String, std::ops::Range<usize>)]) {
    for i in (0..groups.len().saturating_sub(1)).rev() {
        let (text, _) = &groups[i];
        if text.starts_with(' ') && !text.trim().is_empty() && PREPENDED.contains(text.trim()) {
            let (text, _) = std::mem::take(&mut groups[i]);
            // The next group that still holds a word.
            if let Some((next, _)) = groups[i + 1..].iter_mut().find(|(t, _)| !t.is_empty()) {
                *next = format!("{text}{next}");
            }
        }
    }
    let mut previous = 0;
    for j in 1..groups.len() {
        let (text, _) = &groups[j];
        if !groups[previous].0.ends_with(' ') && !text.is_empty() && APPENDED.contains(text.as_str()) {
            let (text, _) = std::mem::take(&mut groups[j]);
            groups[previous].0.push_str(&text);
        } else {
            previous = j;
        }
    }
}

/// The longest a word may last by Whisper's heuristics: twice the median word duration, the median
/// at most 0.7 s. `None` without a word of positive length.
fn max_word_s<'a>(words: impl Iterator<Item = &'a Word>) -> Option<f64> {
    let mut durations: Vec<f64> = words.map(|w| w.end_s - w.start_s).filter(|d| *d > 0.0).collect();
    if durations.is_empty() {
        return None;
    }
    durations.sort_by(f64::total_cmp);
    let mid = durations.len() / 2;
    let median = if durations.len() % 2 == 1 { durations[mid] } else { (durations[mid - 1] + durations[mid]) / 2.0 };
    Some(2.0 * median.min(0.7))
}

/// Cuts words that the alignment stretched over silence (Whisper's heuristics): with `max` from
/// [`max_word_s`], a sentence-ending word or the word after one keeps at most `max`, and a segment's
/// first and last words keep at most `max` on the side of the pause. Times are on any one clock.
pub fn clamp_long_words(segments: &mut [Segment]) {
    let Some(max) = max_word_s(segments.iter().flat_map(|s| &s.words)) else { return };
    let ends_sentence = |w: &Word| w.text.chars().last().is_some_and(|c| SENTENCE_ENDS.contains(c));
    for words in segments.iter_mut().map(|s| &mut s.words) {
        for i in 1..words.len() {
            if words[i].end_s - words[i].start_s > max {
                if ends_sentence(&words[i]) {
                    words[i].end_s = words[i].start_s + max;
                } else if ends_sentence(&words[i - 1]) {
                    words[i].start_s = words[i].end_s - max;
                }
            }
        }
        if let Some(first) = words.first_mut()
            && first.end_s - first.start_s > max
        {
            first.start_s = first.end_s - max;
        }
        if let Some(last) = words.last_mut()
            && last.end_s - last.start_s > max
        {
            last.end_s = last.start_s + max;
        }
    }
}

/// Fits a window's words to the speech the VAD heard, which the alignment cannot see.
///
/// - Packing (see [`super::pack`]) shrinks each pause to its pads, so a word the alignment drew over
///   the few frames of a pause would span seconds once mapped back to the recording: a clip's first
///   word starting in the sentence before it. A word across the border of two pieces belongs to the
///   piece that holds more of it, and there starts where the VAD heard speech start (or ends where it
///   heard speech end).
/// - The alignment ends the last word before a pause early: end-of-text takes the last frames of the
///   speech (0.3–0.6 s on the benchmark's clips, faster-whisper's words alike). Such a word ends where
///   the VAD heard the speech end, moved by at most [`max_word_s`] (speech that no word holds is not
///   given to one).
///
/// `pieces` map the window to the recording; `speech` holds the VAD's spans, in order; both, and the
/// words, in window time.
pub fn fit_to_speech(segments: &mut [Segment], pieces: &[Piece], speech: &[(f64, f64)]) {
    let Some(max) = max_word_s(segments.iter().flat_map(|s| &s.words)) else { return };
    let mut words: Vec<&mut Word> = segments.iter_mut().flat_map(|s| s.words.iter_mut()).collect();
    for w in words.iter_mut() {
        let overlap = |p: &&Piece| (w.end_s.min(p.window_s + p.len_s) - w.start_s.max(p.window_s)).max(0.0);
        let Some(home) = pieces.iter().filter(|p| overlap(p) > 0.0).max_by(|a, b| overlap(a).total_cmp(&overlap(b))) else {
            continue;
        };
        let (from, to) = (home.window_s, home.window_s + home.len_s);
        let mut heard = speech.iter().filter(|(a, b)| *b > from && *a < to);
        if w.start_s < from {
            w.start_s = heard.clone().next().map_or(from, |(a, _)| a.max(from)).min(w.end_s);
        }
        if w.end_s > to {
            w.end_s = heard.next_back().map_or(to, |(_, b)| b.min(to)).max(w.start_s);
        }
    }
    for i in 0..words.len() {
        let next = words.get(i + 1).map_or(f64::INFINITY, |w| w.start_s);
        let w = &mut words[i];
        if let Some(&(_, end)) = speech.iter().find(|(a, b)| *a < w.end_s && w.end_s < *b)
            && next >= end
        {
            w.end_s = end.min(w.end_s + max);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The network's median is the sorted window's middle value, for every order of seven values
    /// (with ties among them).
    #[test]
    fn the_median_network_picks_the_middle_value() {
        for code in 0..7usize.pow(7) {
            let v: [f32; 7] = std::array::from_fn(|k| (code / 7usize.pow(k as u32) % 7) as f32 - 3.0);
            let mut sorted = v;
            sorted.sort_unstable_by(f32::total_cmp);
            assert_eq!(median_of_7(v), sorted[3], "{v:?}");
        }
    }

    #[test]
    fn dtw_follows_the_cheap_diagonal_band() {
        // 3 tokens over 6 frames; token i is cheap on frames 2i and 2i + 1.
        let (n, m) = (3, 6);
        let cost: Vec<f32> = (0..n * m).map(|k| if (k % m) / 2 == k / m { 0.0 } else { 1.0 }).collect();
        let path = dtw(&cost, n, m);
        assert_eq!(path.first(), Some(&(0, 0)));
        assert_eq!(path.last(), Some(&(2, 5)));
        assert_eq!(path, [(0, 0), (0, 1), (1, 2), (1, 3), (2, 4), (2, 5)]);
    }

    #[test]
    fn the_median_filter_reflects_at_the_edges() {
        let row = [5.0, 1.0, 1.0, 1.0, 9.0, 9.0, 9.0, 9.0];
        let out = median_filter(&row);
        assert_eq!(out.len(), row.len());
        // At 0 the window is [1 1 1 5 1 1 1] reflected: median 1.
        assert_eq!(out[0], 1.0);
        assert_eq!(out[7], 9.0);
        assert_eq!(median_filter(&[3.0, 1.0]), [3.0, 1.0], "too short to filter");
    }

    /// Attention that moves from frame to frame with the tokens gives each token the frame it looks
    /// at, in seconds.
    #[test]
    fn tokens_start_where_their_attention_lands() {
        // prompt of 4 (…, notimestamps), 3 text tokens, end-of-text: 8 rows; 100 frames (2 s).
        let (rows, frames, prompt) = (8, 100, 4);
        let mut scores = vec![0f32; rows * frames];
        // Row r (predicting token r − 3) attends to frame 20·(r − 3) and the frames after it.
        for r in 3..rows {
            let at = 20 * (r - 3);
            for f in at..(at + 20).min(frames) {
                scores[r * frames + f] = 8.0;
            }
        }
        let times = token_times(&[scores.clone(), scores], rows, frames, prompt);
        assert_eq!(times.len(), 4, "three tokens and the end of text: {times:?}");
        for (k, t) in times.iter().enumerate() {
            assert!((t - 0.4 * k as f32).abs() <= 0.1, "token {k} starts at {t}, expected {}", 0.4 * k as f32);
        }
    }

    fn word(text: &str, start_s: f64, end_s: f64) -> Word {
        Word { text: text.into(), start_s, end_s, probability: 1.0 }
    }

    #[test]
    fn tokens_group_into_words_with_punctuation_merged() {
        // " Hello", ",", " wor", "ld", ".": two words.
        let vocab = [" Hello", ",", " wor", "ld", "."];
        let tokens = [0, 1, 2, 3, 4];
        let probs = [0.9, 0.5, 0.8, 0.6, 1.0];
        let times = [0.0, 0.5, 0.6, 0.9, 1.2, 1.3];
        let piece = |t: &[u32]| t.iter().map(|&i| vocab[i as usize]).collect::<String>();
        let w = words(&tokens, &probs, &times, "en", piece);
        assert_eq!(w.iter().map(|w| w.text.as_str()).collect::<Vec<_>>(), ["Hello,", "world."]);
        assert_eq!((w[0].start_s, w[0].end_s), (0.0, f64::from(0.5f32)));
        assert_eq!((w[1].start_s, w[1].end_s), (f64::from(0.6f32), f64::from(1.2f32)));
        assert!((w[1].probability - 0.7).abs() < 1e-6, "the mean over the word's own tokens");
        // Without spaces, each character is a word.
        let zh = ["你", "好"];
        let w = words(&[0, 1], &[1.0, 1.0], &[0.0, 0.3, 0.6], "zh", |t: &[u32]| t.iter().map(|&i| zh[i as usize]).collect());
        assert_eq!(w.len(), 2);
    }

    fn segment(words: Vec<Word>) -> Segment {
        Segment { start_s: 0.0, end_s: 0.0, text: String::new(), confidence: 1.0, embedding: Vec::new(), words }
    }

    #[test]
    fn words_stretched_over_a_pause_are_cut_to_twice_the_median() {
        let mut segs = vec![segment(vec![
            word("So", 0.0, 3.0),
            word("we", 3.0, 3.3),
            word("begin.", 3.3, 3.6),
            word("Then", 3.6, 6.0),
            word("go", 6.0, 6.3),
            word("on", 6.3, 6.6),
            word("now", 6.6, 9.0),
        ])];
        clamp_long_words(&mut segs);
        let w = &segs[0].words;
        let near = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(near(w[0].start_s, 2.4), "the first word starts at most 0.6 s before its end: {w:?}");
        assert!(near(w[3].start_s, 5.4), "the word after a sentence end: {w:?}");
        assert!(near(w[6].end_s, 7.2), "the last word ends at most 0.6 s after its start: {w:?}");
    }

    /// Two pieces of a packed window: [0, 2) s and [2, 4) s, the pause between them removed; the VAD
    /// heard speech at 0.2–1.8 s and 2.3–3.5 s.
    #[test]
    fn words_keep_to_the_speech_the_vad_heard() {
        let pieces = [Piece { window_s: 0.0, audio_s: 10.0, len_s: 2.0 }, Piece { window_s: 2.0, audio_s: 20.0, len_s: 2.0 }];
        let speech = [(0.2, 1.8), (2.3, 3.5)];
        let mut segs = vec![
            segment(vec![word("One", 0.2, 0.8), word("two.", 0.8, 1.4)]),
            // "Go" drawn from the first piece's pad into the second's speech; "meters." ended early.
            segment(vec![word("Go", 1.9, 2.6), word("forward", 2.6, 3.0), word("meters.", 3.0, 3.2)]),
        ];
        fit_to_speech(&mut segs, &pieces, &speech);
        let at = |s: usize, w: usize| (segs[s].words[w].start_s, segs[s].words[w].end_s);
        assert_eq!(at(1, 0), (2.3, 2.6), "a word across the border starts where its piece's speech starts");
        assert_eq!(at(0, 1), (0.8, 1.8), "the last word before a pause ends where the speech ends");
        assert_eq!(at(1, 2), (3.0, 3.5));
        assert_eq!(at(1, 1), (2.6, 3.0), "a word followed by another in the same speech keeps its times");
        assert_eq!(at(0, 0), (0.2, 0.8));

        // The stretch is bounded: "two." moves by twice the median word at most.
        let mut segs = vec![segment(vec![word("One", 0.2, 0.4), word("two.", 0.4, 0.6)])];
        let speech = [(0.2, 3.8)];
        fit_to_speech(&mut segs, &pieces[..1], &speech);
        assert!((segs[0].words[1].end_s - 1.0).abs() < 1e-9, "{:?}", segs[0].words);
    }
}
