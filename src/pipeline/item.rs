//! One delivery as the pipeline carries it: what its properties say, decoded
//! once when it arrives.

use super::plan::Input;
use super::ports::Delivery;
use crate::broker::properties;
use crate::contract::{self, command, Command, CommandName, Incoming, Rejection};
use crate::trace::{self, TraceHeaders};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A delivery and what its properties say.
pub(super) struct Item {
    pub delivery: Delivery,
    pub decoded: Result<Command, Rejection>,
    pub message_id: Option<String>,
    /// Where the reply goes: only a reply queue (CONTRACT §2).
    pub reply_to: Option<String>,
    /// A `reply_to` that names no reply queue: the command is dead-lettered unprocessed.
    pub refused_reply_to: Option<String>,
    /// correlation_id, else message_id (CONTRACT §2).
    pub correlation: Option<String>,
    /// The command its `type` (else routing key) names, read once.
    name: Option<CommandName>,
    /// The worker's span for this command: its reply and events carry it.
    pub trace: SpanContext,
    pub trace_headers: TraceHeaders,
    /// Every log line about this command is in it: `message_id`, `command`, `trace_id`.
    pub span: tracing::Span,
}

impl Item {
    /// `random`: fresh trace and span IDs, for a command that starts a trace.
    pub fn new(
        delivery: Delivery,
        reply_prefixes: &[String],
        batch: &tracing::Span,
        random: impl FnOnce() -> [u8; 24],
    ) -> Self {
        let p = &delivery.properties;
        let (reply_to, refused_reply_to) = match properties::short(p.reply_to()) {
            Some(r) if contract::reply_to_allowed(r, reply_prefixes) => (Some(r.to_string()), None),
            Some(r) => (None, Some(r.to_string())),
            None => (None, None),
        };
        let incoming = Incoming {
            kind: properties::short(p.kind()),
            routing_key: &delivery.routing_key,
            content_type: properties::short(p.content_type()),
            message_id: properties::short(p.message_id()),
            correlation_id: properties::short(p.correlation_id()),
            body: &delivery.body,
        };
        let name = CommandName::parse(incoming.kind());
        let decoded = contract::decode(incoming);
        let message_id = properties::short(p.message_id()).map(str::to_string);
        let correlation = properties::short(p.correlation_id())
            .map(str::to_string)
            .or_else(|| message_id.clone());
        let parent = trace::extract(p.headers().as_ref());
        let span = tracing::info_span!(
            parent: batch,
            "command",
            message_id = message_id.as_deref().unwrap_or("-"),
            command = label(name),
            trace_id = tracing::field::Empty,
            otel.name = name.map_or(UNKNOWN_PROCESS_SPAN, CommandName::process_span_name),
            otel.kind = "consumer",
            messaging.system = "rabbitmq",
        );
        let trace = if crate::telemetry::exporting() {
            // The exported span is the publisher's child; the IDs are its own.
            if let Some(p) = &parent {
                let _ = span.set_parent(trace::remote_parent(p));
            }
            let own = span.context().span().span_context().clone();
            if own.is_valid() {
                own
            } else {
                trace::continue_or_start(parent.as_ref(), random)
            }
        } else {
            trace::continue_or_start(parent.as_ref(), random)
        };
        span.record("trace_id", tracing::field::display(trace.trace_id()));
        Item {
            span,
            trace_headers: trace::headers(&trace),
            trace,
            decoded,
            reply_to,
            refused_reply_to,
            message_id,
            correlation,
            name,
            delivery,
        }
    }

    /// This delivery as the plan sees it.
    pub fn input(&self) -> Input<'_> {
        Input {
            decoded: &self.decoded,
            message_id: self.message_id.as_deref(),
            trace: &self.trace_headers,
            reply_to_refused: self.refused_reply_to.is_some(),
        }
    }

    pub fn tag(&self) -> u64 {
        self.delivery.tag
    }

    /// The reply's `type`: `<command>.reply`, or `error.reply` when the command is unknown.
    pub fn reply_type(&self) -> &'static str {
        self.name
            .map_or(command::UNKNOWN_REPLY_TYPE, CommandName::reply_type)
    }

    /// The command's name for logs and metrics (`unknown` when it has none we know).
    pub fn command_label(&self) -> &'static str {
        label(self.name)
    }
}

/// The exported span's name for a command of no known name.
const UNKNOWN_PROCESS_SPAN: &str = "unknown process";

fn label(name: Option<CommandName>) -> &'static str {
    name.map_or(command::UNKNOWN_COMMAND, CommandName::as_str)
}
