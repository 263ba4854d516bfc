//! Logging: tracing to stderr, text or JSON, filtered by `[log] level` or `WSGATE_LOG`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Environment variable that overrides `[log] level` with an EnvFilter string.
pub const LOG_ENV: &str = "WSGATE_LOG";

/// Installs the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init(config: &LogConfig) {
    let filter = std::env::var(LOG_ENV)
        .ok()
        .and_then(|s| EnvFilter::try_new(s).ok())
        .or_else(|| EnvFilter::try_new(&config.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // Colour only for a person at a terminal; journald and log shippers get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
