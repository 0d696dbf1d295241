//! Measurement helpers shared by the benchmark binaries: medians, timers, peak RSS, and fresh child
//! processes whose last line of output is a JSON object (each cold start and peak RSS is its own process).

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Median of `v` (mean of the middle two for an even count); NaN when empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Milliseconds since `t`.
pub fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// This process's peak resident set (VmHWM) in MiB; NaN where /proc is unavailable.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// CPU seconds (user + system) of this process and of its children that have been waited for (the
/// ffmpeg processes of finished tasks); NaN where /proc is unavailable.
pub fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return f64::NAN };
    // Fields after the parenthesised name: utime, stime, cutime, cstime are 14–17 (1-based).
    let Some((_, rest)) = stat.rsplit_once(')') else { return f64::NAN };
    let fields: Vec<f64> = rest.split_whitespace().skip(11).take(4).filter_map(|f| f.parse().ok()).collect();
    // The kernel's USER_HZ is 100 on every Linux this runs on.
    if fields.len() == 4 { fields.iter().sum::<f64>() / 100.0 } else { f64::NAN }
}

/// The sum and count of a Prometheus histogram `name` for `model` in `text` (the worker's /metrics
/// exposition): (0, 0) when absent.
pub fn histogram_totals(text: &str, name: &str, model: &str) -> (f64, f64) {
    let value = |suffix: &str| {
        let prefix = format!("{name}_{suffix}{{model=\"{model}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)?.trim().parse::<f64>().ok()).unwrap_or(0.0)
    };
    (value("sum"), value("count"))
}

/// Median of the numeric field `key` over JSON objects (one per run, round or child process).
pub fn field_median(values: &[Value], key: &str) -> f64 {
    median(values.iter().filter_map(|v| v[key].as_f64()).collect())
}

/// Runs a child process (a fresh copy of a benchmark, or the Python reference) and parses the JSON
/// object on the last line of its output.
///
/// # Errors
/// The process cannot start, exits non-zero, or prints no JSON.
pub fn child_json(cmd: &mut Command) -> Result<Value> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().with_context(|| format!("{cmd:?} printed nothing"))?;
    Ok(serde_json::from_str(last)?)
}

/// The q-quantile (nearest rank) of sorted `v`.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Writes a benchmark's report as pretty JSON to `path`, creating its folder.
///
/// # Errors
/// The folder or the file cannot be written.
pub fn write_report(path: &std::path::Path, report: &Value) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(report)?)?;
    Ok(())
}

/// The CPU's ISA flags that matter to inference speed, printed beside every figure.
pub fn isa_flags() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo.lines().find_map(|l| l.strip_prefix("flags")).unwrap_or_default();
    ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"]
        .iter()
        .filter(|f| flags.split_whitespace().any(|x| x == **f))
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}
