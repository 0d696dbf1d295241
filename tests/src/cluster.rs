//! A real three-node RabbitMQ cluster on loopback, private to one test: three `rabbitmq-server`
//! processes (Debian's RabbitMQ, run directly as `/usr/lib/rabbitmq/bin/*` so that nothing of the
//! system broker's configuration applies), each with its own node name, AMQP and distribution ports,
//! data and log folders in a temporary folder, no plugins, and a cookie of their own. Nodes 2 and 3
//! join node 1. The system broker (rabbit@localhost, 5672/25672) is never touched; only epmd (4369)
//! is shared, as it is meant to be.
//!
//! Dropping the [`Cluster`] kills every node's process group (SIGKILL: nothing of a test cluster is
//! worth a graceful stop) and removes its folder, on success and on panic alike.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

/// One node of the cluster.
pub struct Node {
    /// `hdxq<run><i>@localhost`.
    pub name: String,
    pub amqp_port: u16,
    pid_file: PathBuf,
    log: PathBuf,
    process: std::process::Child,
}

impl Node {
    /// The node's AMQP URL (guest is allowed from loopback only, which is where the test is).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    dir: tempfile::TempDir,
}

/// A free loopback port, outside the range RabbitMQ's command-line tools take for themselves
/// (35672-35682) and away from the system broker's.
fn free_port(taken: &[u16]) -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        if !(35600..=35700).contains(&port) && !taken.contains(&port) && port != 5672 && port != 25672 {
            return port;
        }
    }
}

impl Cluster {
    /// Starts three nodes and joins them into one cluster; panics (after stopping them) with the
    /// logs of a node that did not come up within `timeout`.
    pub fn start(timeout: Duration) -> Self {
        let dir = tempfile::Builder::new().prefix("heimdex-cluster-").tempdir().expect("tempdir");
        let run = &uuid::Uuid::new_v4().simple().to_string()[..6];
        std::fs::create_dir_all(dir.path().join("home")).expect("home");
        let cookie = dir.path().join("home/.erlang.cookie");
        std::fs::write(&cookie, uuid::Uuid::new_v4().simple().to_string().to_uppercase()).expect("cookie");
        std::fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o400)).expect("cookie mode");
        std::fs::write(dir.path().join("enabled_plugins"), "").expect("plugins file");
        std::fs::write(dir.path().join("rabbitmq-env.conf"), "").expect("env file");
        let mut cluster = Self { nodes: Vec::new(), dir };
        let mut taken = Vec::new();
        for i in 1..=3 {
            let (amqp_port, dist_port) = (free_port(&taken), free_port(&taken));
            taken.extend([amqp_port, dist_port]);
            let name = format!("hdxq{run}{i}@localhost");
            let base = cluster.dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&base).expect("node folder");
            let config = base.join("rabbitmq.conf");
            std::fs::write(&config, format!("listeners.tcp.default = 127.0.0.1:{amqp_port}\nloopback_users.guest = true\n"))
                .expect("config");
            let log = base.join("server.log");
            let process = std::os::unix::process::CommandExt::process_group(
                cluster
                    .env(&mut Command::new(SERVER))
                    .env("RABBITMQ_NODENAME", &name)
                    .env("RABBITMQ_NODE_PORT", amqp_port.to_string())
                    .env("RABBITMQ_DIST_PORT", dist_port.to_string())
                    .env("RABBITMQ_MNESIA_BASE", base.join("mnesia"))
                    .env("RABBITMQ_LOG_BASE", base.join("log"))
                    .env("RABBITMQ_PID_FILE", base.join("pid"))
                    .env("RABBITMQ_CONFIG_FILE", &config)
                    .stdin(Stdio::null())
                    .stdout(std::fs::File::create(&log).expect("log"))
                    .stderr(Stdio::null()),
                0,
            )
            .spawn()
            .expect("rabbitmq-server (Debian's rabbitmq-server package)");
            cluster.nodes.push(Node { name, amqp_port, pid_file: base.join("pid"), log, process });
        }
        let started = Instant::now();
        for i in 0..3 {
            let left = timeout.saturating_sub(started.elapsed()).as_secs().max(1).to_string();
            let pid_file = cluster.nodes[i].pid_file.display().to_string();
            cluster.ctl_ok(i, &["wait", "--timeout", &left, &pid_file]);
        }
        let first = cluster.nodes[0].name.clone();
        for i in 1..3 {
            cluster.ctl_ok(i, &["stop_app"]);
            cluster.ctl_ok(i, &["join_cluster", &first]);
            cluster.ctl_ok(i, &["start_app"]);
        }
        cluster
    }

    /// The environment of every server and command-line tool of this cluster: its cookie, and none of
    /// the system broker's settings.
    fn env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("HOME", self.dir.path().join("home"))
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.path().join("rabbitmq-env.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", self.dir.path().join("enabled_plugins"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
    }

    /// Runs `rabbitmqctl -n <node i> args`.
    pub fn ctl(&self, i: usize, args: &[&str]) -> Output {
        self.env(&mut Command::new(CTL)).args(["-n", &self.nodes[i].name, "-q"]).args(args).output().expect("rabbitmqctl")
    }

    /// Runs `rabbitmqctl -n <node i> args` and returns its output; panics with the node's log if it
    /// fails.
    pub fn ctl_ok(&self, i: usize, args: &[&str]) -> String {
        let out = self.ctl(i, args);
        assert!(
            out.status.success(),
            "rabbitmqctl -n {} {args:?}: {}{}\n{}",
            self.nodes[i].name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(i)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The last lines of a node's own log.
    pub fn log_tail(&self, i: usize) -> String {
        let dir = self.nodes[i].log.parent().expect("node folder").join("log");
        let path = dir.join(format!("{}.log", self.nodes[i].name));
        let text = std::fs::read_to_string(&path).or_else(|_| std::fs::read_to_string(&self.nodes[i].log)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!("last lines of {}:\n{}", self.nodes[i].name, lines[lines.len().saturating_sub(20)..].join("\n"))
    }

    /// Every node's AMQP URL, starting with node `first` (the order a client prefers them in).
    pub fn urls_from(&self, first: usize) -> String {
        (0..self.nodes.len()).map(|k| self.nodes[(first + k) % self.nodes.len()].url()).collect::<Vec<_>>().join(",")
    }

    /// The index of the node that leads quorum queue `queue`, and the names of its online members,
    /// asked of node `via`.
    pub fn leader(&self, via: usize, queue: &str) -> Option<(usize, String)> {
        let out = self.ctl_ok(via, &["list_queues", "--no-table-headers", "name", "leader", "online"]);
        let line = out.lines().find(|l| l.split_whitespace().next() == Some(queue))?;
        let mut fields = line.splitn(3, char::is_whitespace);
        let (_, leader, online) = (fields.next()?, fields.next()?.trim(), fields.next().unwrap_or_default().trim().to_string());
        self.nodes.iter().position(|n| n.name == leader).map(|i| (i, online))
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            // The whole process group: the shell script, beam.smp and its port programs.
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", node.process.id())]).status();
            let _ = node.process.wait();
        }
    }
}
