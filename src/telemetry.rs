//! Logging. Human-readable by default, JSON lines for log shippers.

use tracing_subscriber::{fmt, EnvFilter};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber; `RUST_LOG` filters (default `info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,tokio_postgres=warn"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Access token IDs are bearer secrets: logs carry only enough to correlate.
pub fn token_prefix(id: &str) -> String {
    let prefix: String = id.chars().take(8).collect();
    format!("{prefix}…")
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_prefix_is_short() {
        assert_eq!(
            super::token_prefix("e8f5170c-877b-416f-b70f-4b09772f8e2d"),
            "e8f5170c…"
        );
    }
}
