//! What log lines may carry and how they are written: the format, the caps on
//! the wire-level libraries, the error formatter and the access-token prefix.

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Libraries whose verbose levels print what crosses the wire: lapin logs whole
/// frames at trace (command bodies, so access token IDs; replies, so ticket
/// IDs), amq-protocol likewise, and tokio-postgres every statement's parameters
/// at debug (stored replies among them). Whatever `RUST_LOG` asks, they log
/// at most this much (CONTRACT §7: no log line holds a whole access token ID).
pub const WIRE_LOG_CAPS: [(&str, tracing::Level); 3] = [
    ("lapin", tracing::Level::DEBUG),
    ("amq_protocol", tracing::Level::INFO),
    ("tokio_postgres", tracing::Level::INFO),
];

pub(super) fn wire_safe() -> tracing_subscriber::filter::Targets {
    WIRE_LOG_CAPS.iter().fold(
        tracing_subscriber::filter::Targets::new()
            .with_default(tracing_subscriber::filter::LevelFilter::TRACE),
        |t, &(target, level)| t.with_target(target, level),
    )
}

/// An error and its causes on one line, `outer: inner: …`, for log fields and
/// the text of a dead letter's reason (`{:#}` of anyhow, for the library's own
/// errors, whose messages never repeat their source's).
pub struct Report<'a>(pub &'a (dyn std::error::Error + 'a));

impl std::fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

/// Access token IDs are bearer secrets: logs carry only enough to correlate.
/// At most 8 characters and at most a quarter of the ID, so a short token is
/// never logged whole.
pub fn token_prefix(id: &str) -> String {
    format!("{}…", id_prefix(id))
}

/// The part of an access token ID that may be shown (logs, `access-tokens
/// list`): at most 8 characters and at most a quarter of the ID.
pub fn id_prefix(id: &str) -> String {
    let n = (id.chars().count() / 4).min(8);
    id.chars().take(n).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_report_names_every_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("commit")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("connection reset"));
        assert_eq!(super::Report(&e).to_string(), "commit: connection reset");
    }

    #[test]
    fn token_prefix_is_short() {
        assert_eq!(
            super::token_prefix("e8f5170c-877b-416f-b70f-4b09772f8e2d"),
            "e8f5170c…"
        );
        assert_eq!(super::token_prefix("tok"), "…");
        assert_eq!(super::token_prefix("12345678"), "12…");
    }
}
