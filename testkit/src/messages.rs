//! What a test sends and receives: a command's options, a reply, any message.

use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: i64,
    pub kind: String,
    pub correlation_id: Option<String>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub body: Value,
    pub raw: String,
}

#[derive(Debug, Clone)]
pub struct Received {
    /// The exchange it was published to.
    pub exchange: String,
    pub routing_key: String,
    pub kind: String,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub headers: FieldTable,
    pub body: Vec<u8>,
}

impl Received {
    pub fn from_delivery(d: &lapin::message::Delivery) -> Self {
        let p = &d.properties;
        let text =
            |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| s.as_str().to_string());
        Received {
            exchange: d.exchange.as_str().to_string(),
            routing_key: d.routing_key.as_str().to_string(),
            kind: text(p.kind()).unwrap_or_default(),
            message_id: text(p.message_id()),
            correlation_id: text(p.correlation_id()),
            headers: p.headers().clone().unwrap_or_default(),
            body: d.data.clone(),
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("json body")
    }

    pub fn header(&self, name: &str) -> Option<String> {
        match self.headers.inner().get(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
            other => match profile_worker::broker::properties::as_u64(other) {
                Some(n) => Some(n.to_string()),
                None => Some(format!("{other:?}")),
            },
        }
    }
}

/// Options for one published command.
#[derive(Debug, Clone, Default)]
pub struct Send {
    pub kind: Option<String>,
    pub routing_key: Option<String>,
    pub content_type: Option<String>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    /// `None`: our reply queue; `Some("")`: no reply_to (fire-and-forget).
    pub reply_to: Option<String>,
    /// A W3C traceparent header.
    pub traceparent: Option<String>,
    /// A W3C tracestate header.
    pub tracestate: Option<String>,
}
