//! Greedy decoding rules of Whisper, per row, independent of how logits are computed: token
//! suppression, the timestamp rules of `openai-whisper` (`ApplyTimestampRules`), the loop guard, and
//! turning timestamp tokens into segments.
//!
//! Kept apart from the ONNX plumbing so that the KV-cache path, the no-cache path and any batch size
//! share exactly one implementation of "which token comes next".

use serde::Deserialize;

/// The parts of the bundle's `config.json` the decoder needs.
#[derive(Clone, Debug, Deserialize)]
pub struct WhisperConfig {
    pub special_tokens: SpecialTokens,
    pub language_ids: std::collections::BTreeMap<String, u32>,
    pub suppress_tokens: Vec<u32>,
    pub begin_suppress_tokens: Vec<u32>,
    pub max_decode_tokens: usize,
    pub n_vocab: usize,
    #[serde(default = "default_step")]
    pub timestamp_step_s: f32,
    /// (decoder layer, head) pairs whose cross-attention follows the audio (word timestamps; the
    /// model's published `alignment_heads`).
    #[serde(default)]
    pub alignment_heads: Vec<[usize; 2]>,
}

fn default_step() -> f32 {
    0.02
}

/// Special token ids.
#[derive(Clone, Copy, Debug, Deserialize)]
pub struct SpecialTokens {
    pub eot: u32,
    pub sot: u32,
    pub transcribe: u32,
    /// Absent in English-only models, which cannot translate.
    #[serde(default)]
    pub translate: Option<u32>,
    pub notimestamps: u32,
    pub timestamp_begin: u32,
}

/// Latest first timestamp allowed (Whisper's `max_initial_timestamp`, 1 s), in timestamp steps.
const MAX_INITIAL_TIMESTAMP: u32 = 50;
/// Loop guard: a row stops when its text ends with the same n-gram (n ≤ 16) repeated this often...
const LOOP_REPEATS: usize = 4;
/// ...covering at least this many tokens (so "no, no, no, no" is not a loop, 20 × "ha" is).
const LOOP_MIN_TOKENS: usize = 16;

/// Where one row of a batch stands.
#[derive(Clone, Debug)]
pub struct Row {
    timestamps: bool,
    max_tokens: usize,
    /// Generated tokens (no prompt, no eot).
    pub tokens: Vec<u32>,
    /// Probability of each generated token under the filtered distribution.
    pub probs: Vec<f32>,
    pub done: bool,
    /// Stopped by the loop guard (the repeats were removed).
    pub looped: bool,
}

impl Row {
    pub fn new(timestamps: bool, max_tokens: usize) -> Self {
        Self { timestamps, max_tokens, tokens: Vec::new(), probs: Vec::new(), done: max_tokens == 0, looped: false }
    }

    /// Applies the rules to `logits` (one position, full vocabulary), picks the next token, records it
    /// and returns the token to feed the model next (eot once the row is done).
    pub fn step(&mut self, cfg: &WhisperConfig, logits: &[f32]) -> u32 {
        let eot = cfg.special_tokens.eot;
        if self.done {
            return eot;
        }
        let mut lg = logits.to_vec();
        let ninf = f32::NEG_INFINITY;
        for &t in &cfg.suppress_tokens {
            set(&mut lg, t, ninf);
        }
        if self.tokens.is_empty() {
            for &t in &cfg.begin_suppress_tokens {
                set(&mut lg, t, ninf);
            }
        }
        if self.timestamps {
            self.timestamp_rules(cfg, &mut lg);
        }
        // The log-probabilities are lg − lse: the distribution after the rules above, before the
        // timestamp rule below. Nothing else needs them as a vector, so none is made (this runs on the
        // model thread between decoder runs, over the whole vocabulary, at every step of every row).
        let lse = log_sum_exp(&lg);
        if self.timestamps {
            // All timestamps together likelier than the likeliest text token: a timestamp follows.
            // Both sides are log-probabilities shifted by the same lse, so the logits compare as they are.
            let tb = (cfg.special_tokens.timestamp_begin as usize).min(lg.len());
            if log_sum_exp(&lg[tb..]) > largest(&lg[..tb]) {
                lg[..tb].fill(ninf);
            }
        }
        let next = argmax(&lg);
        if next == eot {
            self.done = true;
            return eot;
        }
        self.tokens.push(next);
        self.probs.push((lg[next as usize] - lse).exp());
        if self.tokens.len() >= self.max_tokens {
            self.done = true;
        } else if self.strip_loop(cfg.special_tokens.timestamp_begin) {
            self.done = true;
            self.looped = true;
        }
        if self.done { eot } else { next }
    }

    /// `ApplyTimestampRules`: timestamps come in pairs, never decrease, the first token is a timestamp
    /// no later than 1 s, and `<|notimestamps|>` is never produced.
    fn timestamp_rules(&self, cfg: &WhisperConfig, lg: &mut [f32]) {
        let sp = cfg.special_tokens;
        let tb = (sp.timestamp_begin as usize).min(lg.len());
        let ninf = f32::NEG_INFINITY;
        set(lg, sp.notimestamps, ninf);
        let seq = &self.tokens;
        let is_ts = |t: u32| t >= sp.timestamp_begin;
        let last_ts = seq.last().is_some_and(|&t| is_ts(t));
        let penultimate_ts = seq.len() < 2 || is_ts(seq[seq.len() - 2]);
        if last_ts {
            if penultimate_ts {
                lg[tb..].fill(ninf);
            } else {
                lg[..sp.eot as usize].fill(ninf);
            }
        }
        if let Some(&last) = seq.iter().rev().find(|&&t| is_ts(t)) {
            let floor = if last_ts && !penultimate_ts { last } else { last + 1 };
            let floor = (floor as usize).min(lg.len());
            lg[tb..floor].fill(ninf);
        }
        if seq.is_empty() {
            lg[..tb].fill(ninf);
            let last_allowed = tb + MAX_INITIAL_TIMESTAMP as usize;
            if last_allowed + 1 < lg.len() {
                lg[last_allowed + 1..].fill(ninf);
            }
        }
    }

    /// Detects a text loop at the end of the row; removes all but one occurrence when found.
    fn strip_loop(&mut self, timestamp_begin: u32) -> bool {
        let text: Vec<usize> = self.tokens.iter().enumerate().filter(|(_, t)| **t < timestamp_begin).map(|(i, _)| i).collect();
        for n in 1..=16usize {
            let reps = LOOP_REPEATS.max(LOOP_MIN_TOKENS.div_ceil(n));
            if text.len() < n * reps {
                break;
            }
            let tail = &text[text.len() - n * reps..];
            let gram: Vec<u32> = tail[..n].iter().map(|&i| self.tokens[i]).collect();
            if tail.chunks_exact(n).all(|c| c.iter().zip(&gram).all(|(&i, &g)| self.tokens[i] == g)) {
                let keep = tail[n];
                self.tokens.truncate(keep);
                self.probs.truncate(keep);
                return true;
            }
        }
        false
    }
}

fn set(lg: &mut [f32], token: u32, value: f32) {
    if let Some(v) = lg.get_mut(token as usize) {
        *v = value;
    }
}

/// Index of the largest value (the first on ties, like numpy).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Lanes of the reductions below: independent sums the compiler keeps in vector registers (a float
/// sum in one accumulator must be added in order, one value at a time).
const LANES: usize = 16;

/// The largest value (−∞ for none).
fn largest(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l = if v > *l { v } else { *l };
        }
    }
    chunks.remainder().iter().chain(&lanes).copied().fold(f32::NEG_INFINITY, f32::max)
}

/// ln Σ e^v, from the largest value so that no term overflows.
fn log_sum_exp(values: &[f32]) -> f32 {
    let m = largest(values);
    if m == f32::NEG_INFINITY {
        return m;
    }
    let mut lanes = [0f32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l += exp_nonpositive(v - m);
        }
    }
    let rest: f32 = chunks.remainder().iter().map(|&v| exp_nonpositive(v - m)).sum();
    m + (lanes.iter().sum::<f32>() + rest).ln()
}

/// e^x for x ≤ 0, within 3e-7 of it relative down to e^-87 (and about 1e-38 for anything lower, −∞
/// included, which beside the sum's e^0 = 1 is nothing): e^x = 2^n · e^f with n = round(x / ln 2)
/// and f = x − n·ln 2 (in two parts, so that f keeps its bits), |f| ≤ ½ ln 2, e^f by its Taylor series
/// to the sixth power. Unlike the C library's `expf`, it has no branch and no call, so the loops above
/// run it in vector registers.
#[inline]
fn exp_nonpositive(x: f32) -> f32 {
    // Adding and subtracting 1.5 · 2^23 rounds a float of magnitude below 2^22 to an integer.
    const ROUND: f32 = 12_582_912.0;
    // ln 2 as a float with 16 significant bits (n·LN2_HI is exact for |n| < 2^8) and the rest.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let f = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 + f * (1.0 + f * (0.5 + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0))))));
    // Multiply by 2^n: add n to the exponent field.
    f32::from_bits((p.to_bits() as i32 + ((n as i32) << 23)) as u32)
}

/// How far the output of a timestamped window covers its audio.
///
/// The last timestamp says where the transcribed audio ends. Whisper's timestamp grammar also marks
/// the last segment as unfinished when the output ends with a segment still open (`<|a|><|b|>` then
/// eot) or runs out of tokens inside one (text after the last timestamp pair, no closing timestamp):
/// in `openai-whisper`'s `transcribe` that means "the rest starts at `a`: seek there and decode a new
/// window", so only the tokens up to and including `<|a|>` are final.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Covered {
    /// Tokens that are final (the rest is an unfinished segment).
    pub keep: usize,
    /// Where the final tokens end: the last closing timestamp, seconds from the window's start (> 0).
    pub until_s: f32,
    /// The output ended in an unfinished segment (dropped from `keep`).
    pub unfinished: bool,
}

/// Where the final part of a timestamped window's output ends, when it ends with a closing timestamp
/// (complete) or with an unfinished segment that follows a finished one; `None` for an output that is
/// one open segment or empty, which cannot be resumed anywhere but at its start.
pub fn covered(tokens: &[u32], cfg: &WhisperConfig) -> Option<Covered> {
    let tb = cfg.special_tokens.timestamp_begin;
    let is_ts = |t: &u32| *t >= tb;
    let at = |t: u32| (t - tb) as f32 * cfg.timestamp_step_s;
    let n = tokens.len();
    // A lone closing timestamp at the end: every segment is finished.
    if n >= 2 && is_ts(&tokens[n - 1]) && !is_ts(&tokens[n - 2]) {
        return Some(Covered { keep: n, until_s: at(tokens[n - 1]), unfinished: false });
    }
    // The last pair of consecutive timestamps: `<|a|>` closes a segment, `<|b|>` opens the next one,
    // which is unfinished (nothing after it closes it, or the first branch would have returned).
    let open = tokens.windows(2).rposition(|w| is_ts(&w[0]) && is_ts(&w[1]))? + 1;
    let a = at(tokens[open - 1]);
    (a > 0.0).then_some(Covered { keep: open, until_s: a, unfinished: true })
}

/// A span of text with times relative to its window.
#[derive(Clone, Debug, PartialEq)]
pub struct RawSegment {
    pub start_s: f32,
    pub end_s: f32,
    /// Text tokens (no timestamps).
    pub tokens: Vec<u32>,
    /// Probability of each of those tokens.
    pub probs: Vec<f32>,
    /// Their mean.
    pub confidence: f32,
}

/// Splits a timestamped token sequence into segments: `<|t0|> text <|t1|>` gives [t0, t1]; text after
/// the last timestamp ends at `window_s` (the audio in the window).
pub fn segments(tokens: &[u32], probs: &[f32], cfg: &WhisperConfig, window_s: f32) -> Vec<RawSegment> {
    let tb = cfg.special_tokens.timestamp_begin;
    let time = |t: u32| ((t - tb) as f32 * cfg.timestamp_step_s).min(window_s);
    let mut out = Vec::new();
    let (mut start, mut text, mut p) = (0f32, Vec::new(), Vec::new());
    let mut close = |start: f32, end: f32, text: &mut Vec<u32>, p: &mut Vec<f32>| {
        if !text.is_empty() {
            let confidence = p.iter().sum::<f32>() / p.len().max(1) as f32;
            out.push(RawSegment {
                start_s: start.min(end),
                end_s: end,
                tokens: std::mem::take(text),
                probs: std::mem::take(p),
                confidence,
            });
        }
    };
    for (&t, &prob) in tokens.iter().zip(probs) {
        if t >= tb {
            close(start, time(t), &mut text, &mut p);
            start = time(t);
        } else if t < cfg.special_tokens.eot {
            text.push(t);
            p.push(prob);
        }
    }
    close(start, window_s.max(start), &mut text, &mut p);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The vectorisable e^x against the C library's, from 0 to −87, and the log-sum-exp against an f64
    /// sum over a vocabulary-sized row with masked (−∞) entries and a length that is no multiple of
    /// the lanes.
    #[test]
    fn the_reductions_match_the_libraries() {
        let mut worst = 0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) / 10_000.0;
            let (want, got) = (f64::from(x).exp(), f64::from(exp_nonpositive(x)));
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert!(exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
        let row: Vec<f32> =
            (0..51_865).map(|i| if i % 97 == 0 { f32::NEG_INFINITY } else { ((i * 7919 % 4001) as f32 - 3000.0) / 150.0 }).collect();
        let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(largest(&row), top);
        let want = f64::from(top) + row.iter().map(|&v| (f64::from(v) - f64::from(top)).exp()).sum::<f64>().ln();
        let got = f64::from(log_sum_exp(&row));
        assert!((got - want).abs() < 1e-5, "{got} against {want}");
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 3]), f32::NEG_INFINITY);
        assert_eq!(largest(&[]), f32::NEG_INFINITY);
    }

    fn cfg() -> WhisperConfig {
        let path = heimdex_shared::config::ModelSettings::default().dir.join("whisper-base/config.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    fn logits_favouring(cfg: &WhisperConfig, token: u32) -> Vec<f32> {
        let mut lg = vec![0f32; cfg.n_vocab];
        lg[token as usize] = 20.0;
        lg
    }

    #[test]
    fn first_token_is_an_early_timestamp_and_timestamps_pair_up() {
        let c = cfg();
        let tb = c.special_tokens.timestamp_begin;
        let mut row = Row::new(true, 100);
        // The model wants text first; the rules force a timestamp within the first second.
        assert!(row.step(&c, &logits_favouring(&c, 400)) >= tb);
        assert!(row.tokens[0] <= tb + 50);
        assert_eq!(row.step(&c, &logits_favouring(&c, 400)), 400);
        // A timestamp below the last one is forbidden.
        let t = row.step(&c, &logits_favouring(&c, tb));
        assert!(t > row.tokens[0], "timestamps must not decrease");
    }

    #[test]
    fn loops_are_cut_and_stop_the_row() {
        let c = cfg();
        let mut row = Row::new(false, 224);
        for _ in 0..40 {
            if row.done {
                break;
            }
            row.step(&c, &logits_favouring(&c, 2221));
        }
        assert!(row.done && row.looped);
        assert_eq!(row.tokens, vec![2221]);
    }

    #[test]
    fn coverage_ends_at_the_last_closing_timestamp_and_drops_an_open_segment() {
        let c = cfg();
        let tb = c.special_tokens.timestamp_begin;
        let cov = |keep, until_s, unfinished| Some(Covered { keep, until_s, unfinished });
        // Complete: a lone closing timestamp at the end.
        assert_eq!(covered(&[tb, 400, tb + 100, tb + 100, 402, tb + 150], &c), cov(6, 3.0, false));
        assert_eq!(covered(&[tb + 10, 400, tb + 100], &c), cov(3, 2.0, false));
        // A segment opened and nothing in it: final through <|a|>.
        assert_eq!(covered(&[tb, 400, 401, tb + 100, tb + 100, 402, tb + 150, tb + 160], &c), cov(7, 3.0, true));
        // Text after the last pair and no closing timestamp (eot or out of tokens): the same.
        assert_eq!(covered(&[tb, 400, tb + 100, tb + 100, 402, 403], &c), cov(3, 2.0, true));
        // One open segment, or nothing: no point to resume from.
        assert_eq!(covered(&[tb, 400, 401], &c), None);
        assert_eq!(covered(&[tb], &c), None);
        assert_eq!(covered(&[], &c), None);
    }

    #[test]
    fn timestamp_tokens_become_segments() {
        let c = cfg();
        let tb = c.special_tokens.timestamp_begin;
        let toks = [tb, 400, 401, tb + 100, tb + 100, 402, tb + 150, tb + 160, 403];
        let probs = [1.0, 0.8, 0.6, 1.0, 1.0, 0.5, 1.0, 1.0, 0.9];
        let segs = segments(&toks, &probs, &c, 4.0);
        assert_eq!(segs.len(), 3);
        assert_eq!((segs[0].start_s, segs[0].end_s, segs[0].tokens.clone()), (0.0, 2.0, vec![400, 401]));
        assert!((segs[0].confidence - 0.7).abs() < 1e-6);
        assert_eq!((segs[1].start_s, segs[1].end_s), (2.0, 3.0));
        assert!((segs[2].start_s - 3.2).abs() < 1e-5 && segs[2].end_s == 4.0, "{:?}", segs[2]);
    }
}
