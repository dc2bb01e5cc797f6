//! How each command was answered, tallied once it is settled: one log line in
//! the command's span, and the metrics.

use super::answer::Answer;
use super::item::Item;
use crate::broker::properties;
use crate::telemetry::{self, token_prefix};

/// The command's log line (debug: one per command is too many for info at
/// thousands per second; refusals and failures are logged at warn and error
/// where they happen) and its metrics.
pub(super) fn record(item: &Item, a: Answer, lane: &'static str) {
    let command = item.command_label();
    tracing::debug!(
        parent: &item.span,
        outcome = a.disposition.as_str(),
        status = a.status,
        code = a.code.unwrap_or("-"),
        token = item
            .decoded
            .as_ref()
            .map(|c| token_prefix(c.access_token_id()))
            .unwrap_or_default(),
        span_id = %item.trace.span_id(),
        "answered"
    );
    metrics::counter!(telemetry::COMMANDS, "command" => command, "status" => status_label(a.status), "lane" => lane)
        .increment(1);
    // Counted here, once the dead letter is confirmed, like the answer itself.
    if let (true, Some(code)) = (a.disposition.dead_lettered(), a.code) {
        metrics::counter!(telemetry::DEAD_LETTERS, "code" => code).increment(1);
    }
    if let Some(sent) = properties::sent_at_ms(&item.delivery.properties) {
        let age = properties::now_ms().saturating_sub(sent);
        metrics::histogram!(telemetry::COMMAND_AGE_SECONDS).record(age as f64 / 1000.0);
    }
}

/// Status codes as static labels (no allocation per command).
fn status_label(status: u16) -> &'static str {
    match status {
        0 => "none",
        200 => "200",
        400 => "400",
        403 => "403",
        404 => "404",
        409 => "409",
        429 => "429",
        500 => "500",
        _ => "other",
    }
}
