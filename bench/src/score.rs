//! Word error rate, and the accuracy of word timestamps: one scorer for the benchmarks and the index
//! tests, so that both score alike.

/// Words for WER: lower case, punctuation removed, hyphens split, "mr." spelled out, small numbers as
/// words (the normalisation of the index tests, so both engines are scored alike).
pub fn normalise(s: &str) -> Vec<String> {
    let s = s.to_lowercase().replace("mr.", "mister").replace('-', " ");
    let cleaned: String = s.chars().map(|c| if c.is_alphanumeric() || c == '\'' || c == ' ' { c } else { ' ' }).collect();
    let nums = [("10", "ten"), ("1", "one"), ("2", "two"), ("3", "three"), ("4", "four"), ("5", "five")];
    cleaned.split_whitespace().map(|w| nums.iter().find(|(d, _)| *d == w).map_or(w.to_string(), |(_, n)| (*n).to_string())).collect()
}

/// Word edit distance of `hypothesis` against `reference`, and the reference's length in words.
pub fn word_errors(reference: &str, hypothesis: &str) -> (usize, usize) {
    let (r, h) = (normalise(reference), normalise(hypothesis));
    let mut d: Vec<usize> = (0..=h.len()).collect();
    for i in 1..=r.len() {
        let mut prev = d[0];
        d[0] = i;
        for j in 1..=h.len() {
            let cur = (d[j] + 1).min(d[j - 1] + 1).min(prev + usize::from(r[i - 1] != h[j - 1]));
            prev = d[j];
            d[j] = cur;
        }
    }
    (d[h.len()], r.len())
}

/// Word error rate of `hypothesis` against `reference`.
pub fn wer(reference: &str, hypothesis: &str) -> f64 {
    let (errors, words) = word_errors(reference, hypothesis);
    errors as f64 / words.max(1) as f64
}

/// Tolerances of issue 23: a clip's first word must start within 0.20 s of where its speech starts,
/// its last word end within 0.30 s of where its speech ends.
pub const START_TOLERANCE_S: f64 = 0.20;
pub const END_TOLERANCE_S: f64 = 0.30;

/// How far word timestamps are from the clips' own speech boundaries.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WordTiming {
    /// Per clip: first word's start − speech start and last word's end − speech end, seconds
    /// (negative: early; infinite for a clip that got no word).
    pub start_errors: Vec<f64>,
    pub end_errors: Vec<f64>,
}

impl WordTiming {
    /// Scores `words` ((start, end) seconds, any order) against `clips` ((speech start, speech end),
    /// in order, separated by pauses): a word belongs to the clip whose span, widened by half the
    /// pause on each side, holds its middle.
    pub fn score(clips: &[(f64, f64)], words: &[(f64, f64)]) -> Self {
        let (mut start_errors, mut end_errors) = (Vec::new(), Vec::new());
        for (k, &(start, end)) in clips.iter().enumerate() {
            let lo = if k == 0 { f64::NEG_INFINITY } else { (clips[k - 1].1 + start) / 2.0 };
            let hi = clips.get(k + 1).map_or(f64::INFINITY, |next| (end + next.0) / 2.0);
            let mine = words.iter().filter(|(s, e)| (lo..hi).contains(&((s + e) / 2.0)));
            let first = mine.clone().map(|w| w.0).fold(f64::INFINITY, f64::min);
            let last = mine.map(|w| w.1).fold(f64::NEG_INFINITY, f64::max);
            start_errors.push(if first.is_finite() { first - start } else { f64::INFINITY });
            end_errors.push(if last.is_finite() { last - end } else { f64::INFINITY });
        }
        Self { start_errors, end_errors }
    }

    /// The median signed start error and end error, seconds: which way the words lean.
    pub fn bias(&self) -> (f64, f64) {
        let m = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
        };
        (m(&self.start_errors), m(&self.end_errors))
    }

    /// Shares of clips within the start and the end tolerance.
    pub fn within(&self) -> (f64, f64) {
        let share = |v: &[f64], t: f64| v.iter().filter(|e| e.abs() <= t).count() as f64 / v.len().max(1) as f64;
        (share(&self.start_errors, START_TOLERANCE_S), share(&self.end_errors, END_TOLERANCE_S))
    }

    /// (median, p95) of the absolute start errors and of the absolute end errors, seconds.
    pub fn quantiles(&self) -> ((f64, f64), (f64, f64)) {
        let q = |v: &[f64]| {
            let mut v: Vec<f64> = v.iter().map(|e| e.abs()).collect();
            v.sort_by(f64::total_cmp);
            let at = |p: f64| v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);
            (at(0.5), at(0.95))
        };
        (q(&self.start_errors), q(&self.end_errors))
    }
}
