//! Tracing set-up for every binary: coloured lines for a person at a terminal, JSON lines for a file
//! or a log collector. A worker's stderr is a terminal only when someone runs it by hand; the demo
//! (`2>file`), compose and Kubernetes all collect it from a pipe or a file, where colour escapes are
//! noise and one JSON object per line is what collectors parse. So the default (`auto`) looks at
//! stderr, and colours are never written anywhere but a terminal.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// What [`init`] writes: JSON or compact lines, with or without colour escapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Output {
    pub json: bool,
    pub ansi: bool,
}

/// Decides the output for `format` given whether stderr is a terminal and whether `NO_COLOR` is set
/// (<https://no-color.org>). JSON never carries colour; compact lines carry it only on a terminal.
pub fn output(format: LogFormat, stderr_is_terminal: bool, no_color: bool) -> Output {
    let json = match format {
        LogFormat::Auto => !stderr_is_terminal,
        LogFormat::Json => true,
        LogFormat::Pretty => false,
    };
    Output { json, ansi: !json && stderr_is_terminal && !no_color }
}

/// Installs the global subscriber on stderr. `RUST_LOG` overrides the configured filter. Calling it
/// twice is harmless (the second call keeps the first subscriber).
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.filter));
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let out = output(settings.format, std::io::stderr().is_terminal(), no_color);
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(out.ansi);
    let _ = if out.json { builder.json().flatten_event(true).with_current_span(true).try_init() } else { builder.compact().try_init() };
}

/// Formats an error with its whole cause chain (`outer: inner: root`).
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_json_off_a_terminal_and_colour_only_reaches_a_terminal() {
        let plain = Output { json: false, ansi: false };
        let json = Output { json: true, ansi: false };
        assert_eq!(output(LogFormat::Auto, false, false), json, "a file or a pipe gets JSON");
        assert_eq!(output(LogFormat::Auto, true, false), Output { json: false, ansi: true });
        assert_eq!(output(LogFormat::Auto, true, true), plain, "NO_COLOR");
        assert_eq!(output(LogFormat::Pretty, false, false), plain, "pretty to a file: no escapes");
        assert_eq!(output(LogFormat::Pretty, true, false), Output { json: false, ansi: true });
        assert_eq!(output(LogFormat::Json, true, false), json, "JSON on a terminal too, never coloured");
    }
}
