//! Harness for the end-to-end tests: every test gets its own database, queue prefix, Redis key space
//! and media root, spawns the real worker binaries against the real services and models, and waits on
//! conditions with deadlines (never sleeps).
//!
//! Every wait of a test ends by the test's own deadline ([`TEST_BUDGET`] after [`TestEnv::new`]),
//! which comes before the harness's (nextest stops a test at 360 s, `.config/nextest.toml`): a test
//! that waits too long fails by itself and prints what it waited for and the state of its world
//! ([`TestEnv::report`]: jobs, queues, workers and their last log lines).
//!
//! The worker binaries are run from the same target directory as the test (`cargo build --bins`
//! first; `scripts/test` does).

pub mod cluster;
pub mod proxy;
pub mod upstream;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use heimdex_shared::Settings;
use heimdex_shared::config::QueueType;
use heimdex_shared::contract::TaskKind;
use heimdex_shared::fleet::{Fleet, WorkerState, WorkerStatus};
use heimdex_shared::jobs::{self, JobRow};
use heimdex_shared::topology::{self, Topology};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use sqlx::PgPool;
use tokio::process::{Child, Command};
use uuid::Uuid;

pub const ADMIN_DB: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The model bundle (`../shared/models/prepare` output).
pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("HEIMDEX_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/heimdex/models"));
    assert!(dir.join("READY").is_file(), "model bundle missing at {} (run scripts/setup)", dir.display());
    dir
}

/// A file of the bundle's media folder.
pub fn bundle_media(rel: &str) -> PathBuf {
    models_dir().join("media").join(rel)
}

/// Where the worker binaries are: beside the test's own `deps/` folder.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(path.is_file(), "{} not built: run `cargo build --bins` first (scripts/test does)", path.display());
    path
}

/// How long one test may run, from [`TestEnv::new`] to its last wait: under nextest's 360 s
/// (`.config/nextest.toml`), so that the test's own timeout, with its report, comes first.
pub const TEST_BUDGET: Duration = Duration::from_secs(330);

/// One test's private world.
pub struct TestEnv {
    pub name: String,
    pub settings: Settings,
    pub pool: PgPool,
    pub media: tempfile::TempDir,
    pub channel: lapin::Channel,
    connection: lapin::Connection,
    pub fleet: Fleet,
    /// When every wait of this test gives up ([`TEST_BUDGET`] after the start).
    pub deadline: tokio::time::Instant,
    /// Set by [`TestEnv::cleanup`]; otherwise dropping the world removes it.
    cleaned: bool,
    /// Processes this world started (workers, `heimdex serve`): stopped before its queues are
    /// deleted, since a worker that outlives the deletion declares them again.
    children: std::sync::Mutex<Vec<u32>>,
}

impl TestEnv {
    /// Creates a database, a queue prefix and a media root for one test.
    pub async fn new() -> Self {
        Self::with_budget(TEST_BUDGET).await
    }

    /// A test world whose waits all end `budget` from now (a test that needs longer than
    /// [`TEST_BUDGET`] must have a nextest override that gives it more).
    pub async fn with_budget(budget: Duration) -> Self {
        Self::with(budget, QueueType::default(), None).await
    }

    /// A test world whose durable queues are of `queue_type` (for what only classic queues do, such
    /// as a channel-wide prefetch).
    pub async fn with_queue_type(queue_type: QueueType) -> Self {
        Self::with(TEST_BUDGET, queue_type, None).await
    }

    /// A test world on another broker than the local one: `urls` (comma-separated, as in
    /// `HEIMDEX__AMQP__URLS`), e.g. a [`cluster::Cluster`]'s. Workers are not given them by
    /// [`TestEnv::env`]: a test passes `HEIMDEX__AMQP__URLS` to each in the order it wants.
    pub async fn on_brokers(urls: &str) -> Self {
        Self::with(TEST_BUDGET, QueueType::default(), Some(urls)).await
    }

    async fn with(budget: Duration, queue_type: QueueType, urls: Option<&str>) -> Self {
        let deadline = tokio::time::Instant::now() + budget;
        let _ = tracing_subscriber::fmt().with_env_filter("warn").with_test_writer().try_init();
        let name = format!("t{}", &Uuid::new_v4().simple().to_string()[..12]);
        let admin = PgPool::connect(ADMIN_DB).await.expect("postgres is running (scripts/setup)");
        sqlx::query(&format!("CREATE DATABASE heimdex_{name}")).execute(&admin).await.expect("create database");
        admin.close().await;
        let mut settings = Settings::default();
        settings.database.url = heimdex_shared::config::Secret::new(format!("postgres://postgres@127.0.0.1:5432/heimdex_{name}"));
        settings.amqp.prefix = format!("heimdex-{name}");
        settings.amqp.queue_type = queue_type;
        if let Some(urls) = urls {
            settings.amqp.urls = urls.split(',').map(heimdex_shared::config::Secret::new).collect();
        }
        settings.models.dir = models_dir();
        let media = tempfile::Builder::new().prefix("heimdex-media-").tempdir().expect("tempdir");
        settings.media.root = media.path().to_path_buf();
        settings.worker.health_addr = "127.0.0.1:0".into();
        settings.worker.heartbeat_interval_ms = 500;
        settings.worker.heartbeat_ttl_ms = 3_000;
        settings.worker.retry_base_ms = 200;
        settings.worker.max_attempts = 3;
        let pool = heimdex_shared::db::pool(&settings.database).expect("pool");
        heimdex_shared::db::migrate(&pool, &heimdex_shared::Settings::default()).await.expect("migrate");
        let (connection, channel) = topology::connect(&settings.amqp, "heimdex-tests").await.expect("rabbitmq is running");
        Topology::new(&settings.amqp).declare(&channel, &settings.worker).await.expect("declare");
        let fleet = Fleet::connect(&settings.redis, &settings.amqp.prefix).await.expect("redis is running");
        Self { name, settings, pool, media, channel, connection, fleet, deadline, cleaned: false, children: Default::default() }
    }

    /// The name of the one database role this test may create: removed with its world, so that a
    /// test that panics leaves no role behind either.
    pub fn role(&self) -> String {
        role_of(&self.name)
    }

    pub fn topology(&self) -> Topology {
        Topology::new(&self.settings.amqp)
    }

    /// Copies a bundle file into this test's media root under `name`.
    pub fn add_media(&self, bundle_rel: &str, name: &str) -> PathBuf {
        let dest = self.media.path().join(name);
        std::fs::copy(bundle_media(bundle_rel), &dest).expect("copy media");
        dest
    }

    /// `sample.mp4` four times over (100 s) under `name`, so that a vision task runs for seconds.
    pub fn add_long_video(&self, name: &str) -> PathBuf {
        let dest = self.media.path().join(name);
        let status = std::process::Command::new("ffmpeg")
            .args(["-v", "error", "-y", "-stream_loop", "3", "-i"])
            .arg(bundle_media("video/sample.mp4"))
            .args(["-c", "copy"])
            .arg(&dest)
            .status()
            .expect("ffmpeg");
        assert!(status.success(), "ffmpeg could not make {name}");
        dest
    }

    /// Enqueues one task of `kind` for `name` through the producer library: (video id, job id).
    ///
    /// # Errors
    /// What the producer refuses.
    pub async fn enqueue(&self, name: &str, kind: TaskKind, force: bool) -> Result<(Uuid, Uuid), heimdex_producer::ProducerError> {
        let producer = heimdex_producer::Producer::connect(&self.settings).await?;
        let mut req = heimdex_producer::EnqueueRequest::all(name);
        req.kinds = vec![kind];
        req.force = force;
        let e = producer.enqueue(&req).await?;
        Ok((e.video_id, e.jobs[0].job_id))
    }

    /// The environment that gives a worker or the CLI this test's settings.
    pub fn env(&self) -> Vec<(String, String)> {
        let s = &self.settings;
        vec![
            ("HEIMDEX__DATABASE__URL".into(), s.database.url.expose().into()),
            ("HEIMDEX__AMQP__PREFIX".into(), s.amqp.prefix.clone()),
            ("HEIMDEX__AMQP__QUEUE_TYPE".into(), s.amqp.queue_type.as_str().into()),
            ("HEIMDEX__MEDIA__ROOT".into(), s.media.root.display().to_string()),
            ("HEIMDEX__MODELS__DIR".into(), s.models.dir.display().to_string()),
            ("HEIMDEX__WORKER__HEALTH_ADDR".into(), s.worker.health_addr.clone()),
            ("HEIMDEX__WORKER__HEARTBEAT_INTERVAL_MS".into(), s.worker.heartbeat_interval_ms.to_string()),
            ("HEIMDEX__WORKER__HEARTBEAT_TTL_MS".into(), s.worker.heartbeat_ttl_ms.to_string()),
            ("HEIMDEX__WORKER__RETRY_BASE_MS".into(), s.worker.retry_base_ms.to_string()),
            ("HEIMDEX__WORKER__MAX_ATTEMPTS".into(), s.worker.max_attempts.to_string()),
            ("HEIMDEX__ENGINE__INTRA_THREADS".into(), "1".into()),
        ]
    }

    /// Starts `worker-<kind>` with this test's settings plus `extra` variables.
    pub fn spawn_worker(&self, kind: &str, id: &str, extra: &[(&str, &str)]) -> WorkerProcess {
        let log = self.media.path().join(format!(".{id}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(binary(&format!("worker-{kind}")));
        cmd.envs(self.env()).env("HEIMDEX__WORKER__ID", id).env("RUST_LOG", "info").env_remove("RUST_BACKTRACE");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(file).kill_on_drop(true).spawn().expect("spawn worker");
        self.children.lock().expect("children").extend(child.id());
        WorkerProcess { id: id.to_string(), child, log }
    }

    /// Runs the `heimdex` CLI with this test's settings; returns (exit code, stdout, stderr).
    pub async fn cli(&self, args: &[&str]) -> (i32, String, String) {
        self.cli_with(&[], args).await
    }

    /// Runs the `heimdex` CLI with this test's settings plus `extra` variables.
    pub async fn cli_with(&self, extra: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
        let mut cmd = Command::new(binary("heimdex"));
        cmd.envs(self.env());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let out = cmd.args(args).output().await.expect("run heimdex");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts `heimdex serve` on a free loopback port with this test's settings; returns the process
    /// (killed on drop) and the address it printed.
    pub async fn serve(&self) -> (Child, String) {
        self.serve_with(&[], "127.0.0.1:0").await
    }

    /// Starts `heimdex serve --addr addr` with this test's settings plus `extra` variables (API keys,
    /// limits); its stderr goes to [`TestEnv::serve_log`]. Panics when it prints no address.
    pub async fn serve_with(&self, extra: &[(&str, &str)], addr: &str) -> (Child, String) {
        use tokio::io::AsyncBufReadExt;
        let log = std::fs::File::create(self.serve_log_path()).expect("serve log");
        let mut cmd = Command::new(binary("heimdex"));
        cmd.envs(self.env()).env("RUST_LOG", "debug");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let mut child = cmd
            .args(["serve", "--addr", addr])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn heimdex serve");
        self.children.lock().expect("children").extend(child.id());
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.expect("serve started").expect("read");
        let line = line.unwrap_or_else(|| panic!("heimdex serve printed no address; its log:\n{}", self.serve_log()));
        let addr = line.strip_prefix("listening on http://").unwrap_or_else(|| panic!("unexpected first line {line:?}")).to_string();
        (child, addr)
    }

    fn serve_log_path(&self) -> PathBuf {
        self.media.path().join(".serve.log")
    }

    /// What the last `heimdex serve` of this test wrote to stderr.
    pub fn serve_log(&self) -> String {
        std::fs::read_to_string(self.serve_log_path()).unwrap_or_default()
    }

    pub async fn worker_status(&self, id: &str) -> Option<WorkerStatus> {
        self.fleet.workers().await.ok()?.into_iter().find(|w| w.id == id)
    }

    /// Waits until `check` returns `Some`, polling every 50 ms, for at most `timeout` and never past
    /// the test's deadline; then panics with `what` and [`TestEnv::report`].
    #[track_caller]
    pub fn wait_for<'a, T, F, Fut>(&'a self, what: &str, timeout: Duration, mut check: F) -> impl Future<Output = T> + use<'a, T, F, Fut>
    where
        T: 'a,
        F: FnMut() -> Fut + 'a,
        Fut: Future<Output = Option<T>> + 'a,
    {
        let caller = std::panic::Location::caller();
        let what = what.to_string();
        async move {
            let started = tokio::time::Instant::now();
            let deadline = (started + timeout).min(self.deadline);
            loop {
                if let Some(v) = check().await {
                    return v;
                }
                if tokio::time::Instant::now() >= deadline {
                    let cause = if deadline == self.deadline { "the test's deadline" } else { "its timeout" };
                    panic!("timed out after {:?} ({cause}) waiting for {what} ({caller})\n{}", started.elapsed(), self.report().await);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Waits until the worker reports `state` in Redis.
    #[track_caller]
    pub fn wait_state<'a>(
        &'a self,
        worker: &'a WorkerProcess,
        state: WorkerState,
        timeout: Duration,
    ) -> impl Future<Output = WorkerStatus> + 'a {
        let what = format!("{} to be {}", worker.id, state.as_str());
        self.wait_for(&what, timeout, move || async move {
            let status = self.worker_status(&worker.id).await.filter(|s| s.state == state);
            // A worker that has exited will never get there: say so now, not at the timeout.
            if status.is_none() && worker.exited() {
                let log = worker.log();
                let tail: Vec<&str> = log.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
                panic!("{} exited while waiting for it to be {}; its log ends:\n  {}", worker.id, state.as_str(), tail.join("\n  "));
            }
            status
        })
    }

    /// What this test's world looks like now, for a timeout's message: jobs by status and every job
    /// that has not ended, each queue's depth and consumers, each worker's state in Redis, and the
    /// last lines of every worker's log.
    pub async fn report(&self) -> String {
        use std::fmt::Write;
        let mut out = String::from("--- the test's world now ---\n");
        let by_status: Vec<(String, i64)> = sqlx::query_as("SELECT status, count(*) FROM jobs GROUP BY status ORDER BY status")
            .fetch_all(&self.pool)
            .await
            .unwrap_or_default();
        let _ = writeln!(out, "jobs by status: {by_status:?}");
        let open: Vec<String> = sqlx::query_scalar(
            "SELECT format('  %s job %s: %s, attempts %s, deaths %s, worker %s, last error %s',
                           kind, id, status, attempts, deaths, coalesce(worker_id, '-'), coalesce(last_error, '-'))
             FROM jobs WHERE status NOT IN ('succeeded', 'failed', 'dead') ORDER BY queued_at LIMIT 20",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default();
        for line in open {
            let _ = writeln!(out, "{line}");
        }
        let topology = self.topology();
        for kind in TaskKind::ALL {
            let mut names = vec![topology.queue(kind), topology.dlq(kind)];
            names.extend(
                (1..self.settings.worker.max_attempts).map(|a| topology.retry_queue(kind, Topology::backoff_ms(&self.settings.worker, a))),
            );
            for name in names {
                // A passive declare of a missing queue closes its channel: one channel per look.
                let depth = match self.connection.create_channel().await {
                    Ok(channel) => {
                        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
                        let q = channel.queue_declare(name.as_str().into(), passive, FieldTable::default()).await;
                        let _ = channel.close(200, "".into()).await;
                        q.map(|q| (q.message_count(), q.consumer_count())).map_err(|e| e.to_string())
                    }
                    Err(e) => Err(e.to_string()),
                };
                match depth {
                    Ok((0, 0)) => {}
                    Ok((ready, consumers)) => {
                        let _ = writeln!(out, "queue {name}: {ready} ready, {consumers} consumers");
                    }
                    Err(e) => {
                        let _ = writeln!(out, "queue {name}: {e}");
                    }
                }
            }
        }
        // The broker's own view adds what a passive declare cannot see: deliveries held unacked, and
        // which channel each consumer is on (rabbitmqctl, the tests' broker being on this machine).
        let prefix = &self.settings.amqp.prefix;
        for (what, args) in [
            (
                "queues (name, ready, unacked, consumers)",
                &["list_queues", "name", "messages_ready", "messages_unacknowledged", "consumers"][..],
            ),
            (
                "consumers (queue, channel, tag, prefetch, active)",
                &["list_consumers", "queue_name", "channel_pid", "consumer_tag", "prefetch_count", "active"][..],
            ),
        ] {
            let listed = tokio::time::timeout(
                Duration::from_secs(10),
                tokio::process::Command::new("rabbitmqctl").arg("-q").args(args).kill_on_drop(true).output(),
            )
            .await;
            let lines: Vec<String> = match listed {
                Ok(Ok(o)) => String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.contains(prefix.as_str())).map(String::from).collect(),
                Ok(Err(e)) => vec![format!("rabbitmqctl: {e}")],
                Err(_) => vec!["rabbitmqctl gave no answer in 10 s".to_string()],
            };
            let _ = writeln!(out, "broker {what}:\n  {}", lines.join("\n  "));
        }
        match self.fleet.workers().await {
            Ok(workers) => {
                for w in workers {
                    let _ = writeln!(out, "worker {} ({}): {}, in flight {:?}", w.id, w.kind, w.state.as_str(), w.in_flight);
                }
            }
            Err(e) => {
                let _ = writeln!(out, "workers: Redis: {e}");
            }
        }
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.media.path())
            .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "log")).collect())
            .unwrap_or_default();
        logs.sort();
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(12)..];
            let _ = writeln!(out, "last lines of {}:\n  {}", log.file_name().unwrap_or_default().to_string_lossy(), tail.join("\n  "));
        }
        out
    }

    /// (ready messages, consumers) of a queue.
    pub async fn queue(&self, name: &str) -> (u32, u32) {
        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let q = self.channel.queue_declare(name.into(), passive, FieldTable::default()).await.expect("queue exists");
        (q.message_count(), q.consumer_count())
    }

    pub async fn job(&self, id: Uuid) -> Option<JobRow> {
        jobs::jobs_by_id(&self.pool, &[id]).await.ok()?.into_iter().next()
    }

    /// Waits until the job reaches `status`.
    #[track_caller]
    pub fn wait_job<'a>(&'a self, id: Uuid, status: &'a str, timeout: Duration) -> impl Future<Output = JobRow> + 'a {
        self.wait_for(&format!("job {id} to be {status}"), timeout, move || async move {
            self.job(id).await.filter(|j| j.status.as_str() == status)
        })
    }

    pub async fn count(&self, sql: &str, video: Uuid) -> i64 {
        sqlx::query_scalar(sql).bind(video).fetch_one(&self.pool).await.expect("count query")
    }

    /// A second database of this test's with the schema as it was before migration `version` (the
    /// committed migrations older than it, applied in order), to test a migration on rows written
    /// under the old schema. [`TestEnv::cleanup`] drops it.
    pub async fn database_before(&self, version: &str) -> PgPool {
        let name = format!("heimdex_{}_before", self.name);
        let admin = PgPool::connect(ADMIN_DB).await.expect("postgres is running (scripts/setup)");
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.expect("create database");
        admin.close().await;
        let pool = PgPool::connect(&format!("postgres://postgres@127.0.0.1:5432/{name}")).await.expect("connect");
        let before = self.media.path().join(format!("migrations-before-{version}"));
        std::fs::create_dir(&before).expect("a folder for the older migrations");
        let migrations = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
        for entry in std::fs::read_dir(&migrations).expect("migrations/") {
            let path = entry.expect("a migration").path();
            let file = path.file_name().and_then(|f| f.to_str()).unwrap_or_default();
            if file < version {
                std::fs::copy(&path, before.join(file)).expect("copy a migration");
            }
        }
        sqlx::migrate::Migrator::new(before.as_path()).await.expect("the older migrations").run(&pool).await.expect("the old schema");
        pool
    }

    /// Stops the workers and `heimdex serve` this world started, then deletes its queues and drops
    /// its databases.
    pub async fn cleanup(mut self) {
        self.cleaned = true;
        stop_children(&self.children.lock().expect("children"));
        self.pool.close().await;
        remove_world(&self.name, &self.settings).await;
    }
}

/// A test that panics never reaches [`TestEnv::cleanup`]: its processes are stopped and its database
/// and queues (quorum queues hold disk on every broker) removed here instead, on a thread and a
/// runtime of their own, since the test's runtime is unwinding.
impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        stop_children(&self.children.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        let (name, settings) = (self.name.clone(), self.settings.clone());
        let cleaner = std::thread::spawn(move || match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime.block_on(async {
                if tokio::time::timeout(Duration::from_secs(30), remove_world(&name, &settings)).await.is_err() {
                    eprintln!("test {name}: its database and queues were not removed within 30 s");
                }
            }),
            Err(e) => eprintln!("test {name}: no runtime to remove its database and queues: {e}"),
        });
        let _ = cleaner.join();
    }
}

/// Kills those of `pids` that are still this process's children and waits, at most 10 s, until each
/// has exited (a zombie counts: it holds no connection). A pid whose parent is another process was
/// reaped and reused, and is left alone.
fn stop_children(pids: &[u32]) {
    let ours = |pid: u32| proc_stat(pid).is_some_and(|(state, parent)| parent == std::process::id() && state != "Z");
    let alive: Vec<u32> = pids.iter().copied().filter(|&pid| ours(pid)).collect();
    for &pid in &alive {
        let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while alive.iter().any(|&pid| ours(pid)) {
        if std::time::Instant::now() > deadline {
            eprintln!("processes {alive:?} still run 10 s after SIGKILL; their queues may be declared again");
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A process's state letter (`Z` for a zombie) and parent pid from `/proc`; `None` once it is gone.
fn proc_stat(pid: u32) -> Option<(String, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the parenthesised name (which may hold spaces): state, then the parent's pid.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    Some((fields.next()?.to_string(), fields.next()?.parse().ok()?))
}

/// The database role of the world `name` ([`TestEnv::role`]).
fn role_of(name: &str) -> String {
    format!("heimdex_{name}_role")
}

/// Deletes the queues and exchanges of test `name` and drops its databases and its role.
async fn remove_world(name: &str, settings: &Settings) {
    // On a connection of its own (the test's may have died with a broker it restarted), and for
    // every retry step a worker of this test may have declared with more attempts than ours.
    let worker = heimdex_shared::config::WorkerSettings { max_attempts: 10, ..settings.worker.clone() };
    if let Ok((connection, channel)) = topology::connect(&settings.amqp, "heimdex-tests-cleanup").await {
        let _ = Topology::new(&settings.amqp).delete(&channel, &worker).await;
        let _ = connection.close(0, "cleaned up".into()).await;
    }
    if let Ok(admin) = PgPool::connect(ADMIN_DB).await {
        // FORCE ends the test's own connections, which may still be open.
        for db in [format!("heimdex_{name}"), format!("heimdex_{name}_before")] {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).execute(&admin).await;
        }
        // After the databases, which held its grants.
        let _ = sqlx::query(&format!("DROP ROLE IF EXISTS {}", role_of(name))).execute(&admin).await;
        admin.close().await;
    }
}

/// A running worker process; killed when dropped.
pub struct WorkerProcess {
    pub id: String,
    pub child: Child,
    pub log: PathBuf,
}

impl WorkerProcess {
    pub fn pid(&self) -> i32 {
        self.child.id().map_or(0, |p| p as i32)
    }

    /// Sends a signal (SIGKILL, SIGTERM) to the process.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status().expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Whether the process has exited (a zombie not yet reaped counts): `/proc` says so without
    /// reaping it, which would need `&mut`.
    pub fn exited(&self) -> bool {
        let Some(pid) = self.child.id() else { return true };
        proc_stat(pid).is_none_or(|(state, _)| state == "Z")
    }

    /// The worker's log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        tokio::time::timeout(timeout, self.child.wait()).await.expect("worker did not exit in time").ok()?.code()
    }
}

/// An HTTP GET on the worker's health port; returns (status, body).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    http(addr, "GET", path, None).await
}

/// One HTTP/1.1 request (`body` is sent as JSON); returns (status, body).
pub async fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    http_with(addr, method, path, &[], body).await
}

/// One HTTP/1.1 request with `Host: addr` and extra `headers` (`body` is sent as JSON); returns
/// (status, body).
pub async fn http_with(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> (u16, String) {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request += &format!("{name}: {value}\r\n");
    }
    if let Some(body) = body {
        request += &format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len());
    }
    let (code, _, answer) = http_raw(addr, &format!("{request}Connection: close\r\n\r\n{}", body.unwrap_or_default())).await;
    (code, answer)
}

/// Sends `request` as written (it should ask `Connection: close`) and reads to the end; returns
/// (status, the head, the body). Status 0: no response.
pub async fn http_raw(addr: &str, request: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response).into_owned();
    let code = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) =
        response.split_once("\r\n\r\n").map(|(h, b)| (h.to_string(), b.to_string())).unwrap_or((response.clone(), String::new()));
    (code, head, body)
}

/// Publishes a raw body as a task of `kind`, as a foreign or broken producer would.
pub async fn publish_raw(env: &TestEnv, kind: &str, body: &[u8], message_id: Option<Uuid>) {
    let mut props = lapin::BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(2);
    if let Some(id) = message_id {
        props = props.with_message_id(id.to_string().into());
    }
    topology::publish_confirmed(&env.channel, env.topology().exchange(), kind, body, props).await.expect("publish");
}

/// Reads every message of a dead-letter queue (and acks them): (message id, reason header).
pub async fn drain_dlq(env: &TestEnv, queue: &str) -> Vec<(Option<String>, String)> {
    use lapin::options::{BasicAckOptions, BasicGetOptions};
    let mut out = Vec::new();
    while let Some(m) = env.channel.basic_get(queue.into(), BasicGetOptions::default()).await.expect("basic_get") {
        let props = &m.delivery.properties;
        out.push((
            props.message_id().as_ref().map(|s| s.to_string()),
            topology::header_str(props, topology::ERROR_HEADER).unwrap_or_default(),
        ));
        m.delivery.ack(BasicAckOptions::default()).await.expect("ack");
    }
    out
}

/// Asserts that the results of a fully processed `sample.mp4` are there, exactly once, for every job of
/// the video that succeeded: 25 frames (1 fps) in 4 scenes with faces only in the two face scenes, and
/// a transcript whose first words are the reference's.
pub async fn assert_results(env: &TestEnv, video: Uuid) {
    let kinds: Vec<String> = sqlx::query_scalar("SELECT kind FROM jobs WHERE video_id = $1 AND status = 'succeeded'")
        .bind(video)
        .fetch_all(&env.pool)
        .await
        .expect("jobs");
    assert!(!kinds.is_empty(), "no succeeded job for {video}");
    for kind in kinds {
        if kind == "vision" {
            assert_eq!(env.count("SELECT count(*) FROM frames WHERE video_id = $1", video).await, 25);
            assert_eq!(env.count("SELECT count(*) FROM scenes WHERE video_id = $1", video).await, 4);
            let faces_by_scene: Vec<(i32, i64)> = sqlx::query_as(
                "SELECT s.idx, count(f.face_idx) FROM scenes s
                 LEFT JOIN frames fr ON fr.video_id = s.video_id AND fr.scene_idx = s.idx
                 LEFT JOIN faces f ON f.video_id = fr.video_id AND f.frame_idx = fr.idx
                 WHERE s.video_id = $1 GROUP BY s.idx ORDER BY s.idx",
            )
            .bind(video)
            .fetch_all(&env.pool)
            .await
            .expect("faces");
            let with_faces: Vec<bool> = faces_by_scene.iter().map(|(_, n)| *n > 0).collect();
            assert_eq!(with_faces, [true, false, true, false], "astronaut and camera scenes have faces: {faces_by_scene:?}");
        } else {
            let texts: Vec<String> = sqlx::query_scalar("SELECT text FROM transcript_segments WHERE video_id = $1 ORDER BY idx")
                .bind(video)
                .fetch_all(&env.pool)
                .await
                .expect("segments");
            let transcript = texts.join(" ").to_lowercase();
            assert!(transcript.contains("dashwood") || transcript.contains("family"), "{transcript}");
            let summary: serde_json::Value = sqlx::query_scalar("SELECT summary FROM jobs WHERE video_id = $1 AND kind = 'index'")
                .bind(video)
                .fetch_one(&env.pool)
                .await
                .expect("summary");
            assert_eq!(summary["segments"].as_u64(), Some(texts.len() as u64), "{summary}");
        }
    }
}

/// The bundle's short speech clips: (file, reference transcript), without the 25 s compilation.
pub fn speech_clips() -> Vec<(String, String)> {
    let tsv = std::fs::read_to_string(models_dir().join("media/speech/transcripts.tsv")).expect("transcripts.tsv");
    tsv.lines()
        .skip(1)
        .filter_map(|l| l.split_once('\t'))
        .filter(|(f, _)| !f.starts_with("librivox"))
        .map(|(f, t)| (f.to_string(), t.to_string()))
        .collect()
}

/// The share of the reference's words that occur in the hypothesis (case and punctuation ignored).
pub fn words_found(reference: &str, hypothesis: &str) -> f64 {
    let words =
        |s: &str| -> Vec<String> { s.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect() };
    let (reference, hypothesis) = (words(reference), words(hypothesis));
    let found = reference.iter().filter(|w| hypothesis.contains(w)).count();
    found as f64 / reference.len().max(1) as f64
}

/// How many jobs of this test's database are in one of `states`.
pub async fn count_jobs_in(env: &TestEnv, states: &[jobs::JobStatus]) -> usize {
    let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = ANY($1)")
        .bind(&states)
        .fetch_one(&env.pool)
        .await
        .expect("count jobs");
    n as usize
}

/// A job of a mixed load and what its results must hold.
#[derive(Debug, Clone)]
pub struct LoadJob {
    pub kind: TaskKind,
    pub video: Uuid,
    pub job: Uuid,
    /// The clip's reference transcript (index jobs).
    pub reference: Option<String>,
}

/// Copies short media into the test's media root and enqueues `vision` vision jobs (the 4 s
/// silent.mp4) and `index` index jobs (the bundle's short speech clips), interleaved.
pub async fn enqueue_load(env: &TestEnv, vision: usize, index: usize) -> Vec<LoadJob> {
    let producer = heimdex_producer::Producer::connect(&env.settings).await.expect("producer");
    let clips = speech_clips();
    let mut load = Vec::new();
    for i in 0..vision.max(index) {
        let add = |kind: TaskKind, name: String, reference: Option<String>| {
            let producer = &producer;
            async move {
                let mut req = heimdex_producer::EnqueueRequest::all(name);
                req.kinds = vec![kind];
                let e = producer.enqueue(&req).await.expect("enqueue");
                LoadJob { kind, video: e.video_id, job: e.jobs[0].job_id, reference }
            }
        };
        if i < vision {
            env.add_media("video/silent.mp4", &format!("v{i:02}.mp4"));
            load.push(add(TaskKind::Vision, format!("v{i:02}.mp4"), None).await);
        }
        if i < index {
            let (file, reference) = &clips[i % clips.len()];
            env.add_media(&format!("speech/{file}"), &format!("a{i:02}.wav"));
            load.push(add(TaskKind::Index, format!("a{i:02}.wav"), Some(reference.clone())).await);
        }
    }
    load
}

/// Asserts that every job of `load` succeeded with exactly one result set (rows = the summary's
/// count) and, for index jobs, a transcript of its clip; returns the deaths counted on them.
pub async fn assert_load_succeeded(env: &TestEnv, load: &[LoadJob]) -> i32 {
    let mut deaths = 0;
    for (i, l) in load.iter().enumerate() {
        let row = env.job(l.job).await.expect("job row");
        assert_eq!(row.status, jobs::JobStatus::Succeeded, "{} job {i}: {row:?}", l.kind);
        deaths += row.deaths;
        let summary = row.summary.clone().expect("summary");
        match &l.reference {
            None => {
                let frames = env.count("SELECT count(*) FROM frames WHERE video_id = $1", l.video).await;
                assert!(frames > 0 && summary["frames"].as_i64() == Some(frames), "vision {i}: {frames} rows, {summary}");
            }
            Some(reference) => {
                let texts: Vec<String> = sqlx::query_scalar("SELECT text FROM transcript_segments WHERE video_id = $1 ORDER BY idx")
                    .bind(l.video)
                    .fetch_all(&env.pool)
                    .await
                    .expect("segments");
                assert_eq!(summary["segments"].as_u64(), Some(texts.len() as u64), "index {i}: {summary}");
                // Digits ("10" for "ten") make up the rest; word accuracy is the index tests' business.
                let found = words_found(reference, &texts.join(" "));
                assert!(found >= 0.6, "index {i}: {:.0} % of the reference's words: {texts:?}", found * 100.0);
            }
        }
    }
    let jobs: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind IN ('index', 'vision')").fetch_one(&env.pool).await.expect("count");
    assert!(jobs as usize >= load.len(), "no job lost");
    deaths
}

/// A page as a browser shows it: headless Chromium (Debian's package, `scripts/setup` installs it) on
/// `url` in a `width`×`height` window at device scale 1, so page pixels are screenshot pixels. Returns
/// the DOM after the page's scripts ran (`--dump-dom`) and the screenshot, written to `png`, as RGB
/// rows. The two are separate runs of the same page, so the page must lay out the same way twice.
pub fn render_page(url: &str, png: &Path, width: u32, height: u32) -> (String, Vec<u8>) {
    let profile = tempfile::tempdir().expect("tempdir");
    let chromium = |extra: &[&str]| {
        let out = std::process::Command::new("chromium")
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1"])
            .arg(format!("--window-size={width},{height}"))
            .args(["--virtual-time-budget=5000", &format!("--user-data-dir={}", profile.path().display())])
            .args(extra)
            .arg(url)
            .output()
            .expect("chromium (scripts/setup installs it)");
        assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    let dom = String::from_utf8(chromium(&["--dump-dom"])).expect("utf-8 DOM");
    chromium(&[&format!("--screenshot={}", png.display())]);
    let rgb = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(png)
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .expect("ffmpeg");
    let expected = width as usize * height as usize * 3;
    assert!(rgb.status.success() && rgb.stdout.len() == expected, "a screenshot of {} bytes, not {expected}", rgb.stdout.len());
    (dom, rgb.stdout)
}
