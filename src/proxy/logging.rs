//! The proxy's log, for operators: plain text without colour unless a person is watching, or
//! one JSON object per line for a log pipeline; the level and targets come from `RUST_LOG`.

use std::io::IsTerminal;

use serde::Deserialize;

use crate::BoxError;

/// How `claude-proxy` writes its log (`--log-format`, `CLAUDE_PROXY_LOG_FORMAT`, `log_format`).
///
/// ```
/// use tower_claude::proxy::LogFormat;
///
/// assert_eq!(LogFormat::default(), LogFormat::Text);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines; colour only when the output is a terminal and `NO_COLOR` is unset.
    #[default]
    Text,
    /// One JSON object per line (fields, span and target included), never coloured.
    Json,
}

/// The filter used when `RUST_LOG` is not set.
///
/// ```
/// assert!(tower_claude::proxy::DEFAULT_LOG_FILTER.contains("tower_claude=info"));
/// ```
pub const DEFAULT_LOG_FILTER: &str = "claude_proxy=info,tower_claude=info";

/// Whether the text log may be coloured: only on a terminal, and never when `NO_COLOR` is set
/// to anything but the empty string (<https://no-color.org>).
///
/// ```
/// use tower_claude::proxy::log_colour;
///
/// assert!(log_colour(true, None));
/// assert!(!log_colour(false, None)); // a file or a pipe
/// assert!(!log_colour(true, Some("1".as_ref())));
/// assert!(log_colour(true, Some("".as_ref())));
/// ```
pub fn log_colour(is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the process-wide `tracing` subscriber of `claude-proxy`: to standard error, filtered
/// by `RUST_LOG` (else [`DEFAULT_LOG_FILTER`]), in `format`, coloured only as [`log_colour`]
/// allows. Fails when a subscriber is already installed.
///
/// ```no_run
/// use tower_claude::proxy::{LogFormat, init_logging};
///
/// init_logging(LogFormat::Json).expect("first subscriber");
/// tracing::info!(port = 8787, "listening");
/// ```
pub fn init_logging(format: LogFormat) -> Result<(), BoxError> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| DEFAULT_LOG_FILTER.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(log_colour(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR").as_deref(),
            ))
            .try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    }
}
