//! Metrics served on `/metrics` in the OpenMetrics text format ([`CONTENT_TYPE`]): tasks by kind and
//! outcome, query embeddings by kind and outcome, media seconds processed by kind, stage latencies, inference batch sizes and latencies,
//! the seconds of a model's batches by phase, warm-up duration, worker state, in-flight tasks, `heimdex_build_info`, and the standard `process_*`
//! series (resident memory, CPU seconds, open file descriptors, start time), read from `/proc/self`
//! at each scrape.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::encode`]'s output (Prometheus 2.5+ asks for it).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub kind: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub model: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

/// Labels of `heimdex_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// The crate version.
    pub version: String,
    /// `HEIMDEX_GIT_COMMIT` at build time (the image build passes it), else `unknown`.
    pub commit: String,
    /// The task contract version this build reads and writes.
    pub contract: String,
    /// The binary serving the metrics (`worker-index`, `worker-vision`).
    pub binary: String,
}

impl BuildLabels {
    fn current() -> Self {
        let binary = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "unknown".into());
        Self {
            version: env!("CARGO_PKG_VERSION").into(),
            commit: option_env!("HEIMDEX_GIT_COMMIT").unwrap_or("unknown").into(),
            contract: heimdex_shared::contract::CONTRACT_VERSION.to_string(),
            binary,
        }
    }
}

/// Every metric of one worker process.
pub struct Metrics {
    registry: Registry,
    tasks: Family<TaskLabels, Counter>,
    queries: Family<TaskLabels, Counter>,
    media_seconds: Family<KindLabels, Counter<f64, AtomicU64>>,
    stage_seconds: Family<StageLabels, Histogram>,
    batch_size: Family<ModelLabels, Histogram>,
    inference_seconds: Family<ModelLabels, Histogram>,
    phase_seconds: Family<PhaseLabels, Counter<f64, AtomicU64>>,
    warmup_seconds: Family<ModelLabels, Gauge<f64, AtomicU64>>,
    state: Family<StateLabels, Gauge>,
    in_flight: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let tasks = Family::<TaskLabels, Counter>::default();
        let queries = Family::<TaskLabels, Counter>::default();
        let media_seconds = Family::<KindLabels, Counter<f64, AtomicU64>>::default();
        let stage_seconds = Family::<StageLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.005, 2.0, 16))) as fn() -> Histogram,
        );
        let batch_size = Family::<ModelLabels, Histogram>::new_with_constructor(
            (|| Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])) as fn() -> Histogram,
        );
        let inference_seconds = Family::<ModelLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.001, 2.0, 16))) as fn() -> Histogram,
        );
        let phase_seconds = Family::<PhaseLabels, Counter<f64, AtomicU64>>::default();
        let warmup_seconds = Family::<ModelLabels, Gauge<f64, AtomicU64>>::default();
        let state = Family::<StateLabels, Gauge>::default();
        let in_flight = Gauge::default();
        {
            let heimdex = registry.sub_registry_with_prefix("heimdex");
            heimdex.register("build", "Version, commit and contract of the running binary", Info::new(BuildLabels::current()));
            heimdex.register("tasks", "Tasks finished, by kind and outcome", tasks.clone());
            heimdex.register(
                "queries",
                "Query embeddings taken, by kind and outcome (answered, bad_request, wrong_model, failed, unanswerable)",
                queries.clone(),
            );
            heimdex.register("media_seconds", "Seconds of media in tasks that succeeded, by kind", media_seconds.clone());
            heimdex.register("stage_seconds", "Time spent in each task stage", stage_seconds.clone());
            heimdex.register("inference_batch_size", "Requests per inference batch", batch_size.clone());
            heimdex.register("inference_seconds", "Time of one inference batch", inference_seconds.clone());
            heimdex.register(
                "inference_phase_seconds",
                "Seconds a model's batches spent in each phase (Whisper: encode, decode, align)",
                phase_seconds.clone(),
            );
            heimdex.register("warmup_seconds", "Warm-up time of each model", warmup_seconds.clone());
            heimdex.register("worker_state", "1 for the worker's current lifecycle state", state.clone());
            heimdex.register("tasks_in_flight", "Tasks being processed now", in_flight.clone());
        }
        registry.register_collector(Box::new(ProcessCollector));
        Self {
            registry,
            tasks,
            queries,
            media_seconds,
            stage_seconds,
            batch_size,
            inference_seconds,
            phase_seconds,
            warmup_seconds,
            state,
            in_flight,
        }
    }

    pub fn task_finished(&self, kind: &str, outcome: &str) {
        self.tasks.get_or_create(&TaskLabels { kind: kind.into(), outcome: outcome.into() }).inc();
    }

    pub fn query_finished(&self, kind: &str, outcome: &str) {
        self.queries.get_or_create(&TaskLabels { kind: kind.into(), outcome: outcome.into() }).inc();
    }

    /// Counts the media of a task that succeeded (its probed duration; nothing when unknown).
    pub fn media_processed(&self, kind: &str, seconds: Option<f64>) {
        if let Some(s) = seconds.filter(|s| s.is_finite() && *s > 0.0) {
            self.media_seconds.get_or_create(&KindLabels { kind: kind.into() }).inc_by(s);
        }
    }

    pub fn observe_stage(&self, stage: &str, seconds: f64) {
        self.stage_seconds.get_or_create(&StageLabels { stage: stage.into() }).observe(seconds);
    }

    pub fn observe_batch(&self, model: &str, size: usize, elapsed: Duration) {
        let labels = ModelLabels { model: model.into() };
        self.batch_size.get_or_create(&labels).observe(size as f64);
        self.inference_seconds.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }

    /// Counts the time one batch of `model` spent in `phase`.
    pub fn observe_phase(&self, model: &str, phase: &str, elapsed: Duration) {
        self.phase_seconds.get_or_create(&PhaseLabels { model: model.into(), phase: phase.into() }).inc_by(elapsed.as_secs_f64());
    }

    /// Seconds `model`'s batches have spent in `phase` so far.
    pub fn phase_seconds(&self, model: &str, phase: &str) -> f64 {
        self.phase_seconds.get_or_create(&PhaseLabels { model: model.into(), phase: phase.into() }).get()
    }

    pub fn set_warmup(&self, model: &str, elapsed: Duration) {
        self.warmup_seconds.get_or_create(&ModelLabels { model: model.into() }).set(elapsed.as_secs_f64());
    }

    pub fn set_state(&self, current: &str, all: &[&str]) {
        for s in all {
            self.state.get_or_create(&StateLabels { state: (*s).into() }).set(i64::from(*s == current));
        }
    }

    pub fn in_flight(&self) -> &Gauge {
        &self.in_flight
    }

    /// The OpenMetrics text exposition (ends with `# EOF`); serve it as [`CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

/// The `process_*` series of the Prometheus client libraries, read from `/proc/self` at each scrape
/// (nothing where there is no `/proc`).
#[derive(Debug)]
struct ProcessCollector;

/// Clock ticks per second of `/proc/<pid>/stat` times: Linux's `USER_HZ`, 100 on every architecture
/// it supports today (reading `sysconf(_SC_CLK_TCK)` would take `unsafe`).
const USER_HZ: f64 = 100.0;

/// What one scrape reads about the process.
#[derive(Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: Option<f64>,
    start_time_seconds: Option<f64>,
    resident_memory_bytes: Option<u64>,
    virtual_memory_bytes: Option<u64>,
    threads: Option<u64>,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
}

impl ProcessStats {
    fn read() -> Self {
        let mut stats = ProcessStats::default();
        let proc_stat = |name: &str| std::fs::read_to_string(format!("/proc/{name}")).ok();
        let boot_time = proc_stat("stat").as_deref().and_then(parse_boot_time);
        if let Some(stat) = proc_stat("self/stat") {
            let (cpu, start_ticks) = parse_self_stat(&stat);
            stats.cpu_seconds = cpu;
            stats.start_time_seconds = boot_time.zip(start_ticks).map(|(boot, ticks)| boot as f64 + ticks as f64 / USER_HZ);
        }
        if let Some(status) = proc_stat("self/status") {
            let kib = |key: &str| status_value(&status, key).map(|kb| kb * 1024);
            stats.resident_memory_bytes = kib("VmRSS:");
            stats.virtual_memory_bytes = kib("VmSize:");
            stats.threads = status_value(&status, "Threads:");
        }
        stats.open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as u64);
        stats.max_fds = proc_stat("self/limits").as_deref().and_then(parse_max_fds);
        stats
    }
}

/// (utime + stime in seconds, start time in ticks after boot) from `/proc/self/stat`.
fn parse_self_stat(stat: &str) -> (Option<f64>, Option<u64>) {
    // The command name (field 2) may hold spaces and parentheses: fields are counted after its ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else { return (None, None) };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): utime is field 14, stime 15, starttime 22.
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let cpu = field(14).zip(field(15)).map(|(u, s)| (u + s) as f64 / USER_HZ);
    (cpu, field(22))
}

fn parse_boot_time(stat: &str) -> Option<u64> {
    stat.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())
}

/// The number after `key` in `/proc/self/status` (`VmRSS:   1234 kB` → 1234).
fn status_value(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The soft limit of `Max open files` in `/proc/self/limits`.
fn parse_max_fds(limits: &str) -> Option<u64> {
    limits.lines().find_map(|l| l.strip_prefix("Max open files")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = ProcessStats::read();
        if let Some(v) = stats.cpu_seconds {
            let mut m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                MetricType::Counter,
            )?;
            m.encode_counter::<NoLabelSet, _, u64>(&v, None)?;
        }
        let gauges = [
            ("process_start_time_seconds", "Start time of the process since unix epoch in seconds", stats.start_time_seconds),
            ("process_resident_memory_bytes", "Resident memory size in bytes", stats.resident_memory_bytes.map(|v| v as f64)),
            ("process_virtual_memory_bytes", "Virtual memory size in bytes", stats.virtual_memory_bytes.map(|v| v as f64)),
            ("process_threads", "Number of OS threads in the process", stats.threads.map(|v| v as f64)),
            ("process_open_fds", "Number of open file descriptors", stats.open_fds.map(|v| v as f64)),
            ("process_max_fds", "Maximum number of open file descriptors", stats.max_fds.map(|v| v as f64)),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                encoder.encode_descriptor(name, help, None, MetricType::Gauge)?.encode_gauge(&v)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_parsed() {
        let stat = "4242 (worker (vision) x) S 1 4242 4242 0 -1 4194560 9 0 0 0 250 50 0 0 20 0 7 0 12345 1000 200 ...";
        assert_eq!(parse_self_stat(stat), (Some(3.0), Some(12345)));
        assert_eq!(parse_boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 9\n"), Some(1_700_000_000));
        let status = "Name:\tworker\nVmSize:\t  204800 kB\nVmRSS:\t   10240 kB\nThreads:\t7\n";
        assert_eq!(status_value(status, "VmRSS:"), Some(10240));
        assert_eq!(status_value(status, "Threads:"), Some(7));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        assert_eq!(parse_max_fds(limits), Some(1024));
    }

    #[test]
    fn exposition_is_openmetrics_with_build_info_process_series_and_media_seconds() {
        let metrics = Metrics::new();
        metrics.media_processed("vision", Some(25.0));
        metrics.media_processed("vision", Some(0.5));
        metrics.media_processed("index", None);
        let text = metrics.encode();
        assert!(text.ends_with("# EOF\n"), "{text}");
        let build = format!("heimdex_build_info{{version=\"{}\",commit=", env!("CARGO_PKG_VERSION"));
        assert!(text.lines().any(|l| l.starts_with(&build) && l.ends_with(" 1")), "{text}");
        assert!(text.contains("heimdex_media_seconds_total{kind=\"vision\"} 25.5"), "{text}");
        assert!(!text.contains("heimdex_media_seconds_total{kind=\"index\"}"), "{text}");
        if cfg!(target_os = "linux") {
            let value = |name: &str| -> f64 {
                let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name} missing: {text}"));
                line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("a number")
            };
            assert!(value("process_resident_memory_bytes") > 1e6);
            assert!(value("process_open_fds") >= 3.0);
            assert!(value("process_cpu_seconds_total") >= 0.0);
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
            let start = value("process_start_time_seconds");
            assert!(start <= now + 1.0 && start > now - 3600.0, "start {start}, now {now}");
        }
    }
}
