//! What the worker binaries share: `--config FILE`, settings, tracing, the shutdown signal.

use std::path::PathBuf;

use clap::Parser;
use heimdex_shared::Settings;

/// Command line of `worker-index` and `worker-vision`. Everything else is configuration:
/// `HEIMDEX__SECTION__KEY` environment variables override the file.
#[derive(Debug, Parser)]
pub struct WorkerArgs {
    /// TOML configuration file (see deploy/heimdex.example.toml).
    #[arg(long, env = "HEIMDEX_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Caps glibc's malloc at two arenas; called first in `main`, before any thread exists.
///
/// Why: glibc gives each thread that allocates while another holds the lock an arena of its own, up
/// to eight per core, and an arena keeps what was freed in it. The index worker's blocking threads
/// (audio decoding, mel, VAD) and ONNX Runtime's each took one, so the 600 s recording's peak RSS
/// swung between 622 and 974 MB from run to run; with two arenas it was 659–713 MB, and no slower
/// (bench-index `--parts peer`, 3 rounds each, AVX2 machine). The same as `MALLOC_ARENA_MAX=2`,
/// without depending on the environment. Other C libraries keep their own policy. The one `unsafe`
/// in the workspace: a foreign call with no pointer in it.
#[allow(unsafe_code)]
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a parameter of the allocator; M_ARENA_MAX takes any positive value.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Parses arguments, loads settings and installs tracing.
///
/// # Errors
/// Invalid configuration.
pub fn init() -> anyhow::Result<Settings> {
    let args = WorkerArgs::parse();
    let settings = heimdex_shared::config::load(args.config.as_deref())?;
    heimdex_shared::telemetry::init(&settings.log);
    Ok(settings)
}

/// Ends the process with the worker's result (exit code 0 or 1, the error and its causes on stderr).
///
/// Why not return from `main`: dropping the tokio runtime waits for blocking tasks, and a model load
/// interrupted by SIGTERM may still be running on one; the worker must stop promptly in any state.
/// The error is a log event like every other line (a JSON line where the logs are JSON), unless it
/// came before logging was set up (invalid configuration): then it is plain text.
pub fn exit(result: anyhow::Result<()>) -> ! {
    if let Err(e) = &result {
        if tracing::dispatcher::has_been_set() {
            tracing::error!(error = %format_args!("{e:#}"), "fatal: the worker exits");
        } else {
            eprintln!("Error: {e:?}");
        }
    }
    std::process::exit(i32::from(result.is_err()))
}
