//! Word error rate: one scorer for the benchmarks and the index tests, so that both score alike.

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
