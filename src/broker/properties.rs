//! AMQP properties of replies, events and dead letters, and reading the ones we consume.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use std::time::{SystemTime, UNIX_EPOCH};

const JSON: &str = "application/json";
const PERSISTENT: u8 = 2;

/// Header carrying the HTTP-like status on replies.
pub const STATUS_HEADER: &str = "status";
/// Headers we add to a dead letter to say why it is there.
pub const ERROR_CODE_HEADER: &str = "x-error-code";
pub const ERROR_REASON_HEADER: &str = "x-error-reason";
/// On a dead letter whose body was cut to the size limit: the body's size as sent.
pub const ORIGINAL_SIZE_HEADER: &str = "x-original-body-size";

/// Milliseconds since the epoch a publisher may put in this header (the name
/// RabbitMQ's message-timestamp plugin uses), since the AMQP `timestamp`
/// property has whole seconds only.
pub const TIMESTAMP_MS_HEADER: &str = "timestamp_in_ms";

pub fn now_secs() -> u64 {
    now_ms() / 1000
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// When the publisher sent this message, in epoch milliseconds: the
/// `timestamp_in_ms` header, else the `timestamp` property (whole seconds).
pub fn sent_at_ms(p: &BasicProperties) -> Option<u64> {
    p.headers()
        .as_ref()
        .and_then(|h| h.inner().get(TIMESTAMP_MS_HEADER))
        .and_then(|v| match v {
            AMQPValue::Timestamp(t) => Some(*t),
            v => as_u64(v),
        })
        .or_else(|| p.timestamp().map(|s| s.saturating_mul(1000)))
}

pub fn reply(
    reply_type: &str,
    correlation_id: Option<&str>,
    status: u16,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(STATUS_HEADER.into(), AMQPValue::LongInt(status as i32));
    insert_trace(&mut headers, traceparent, tracestate);
    let p = BasicProperties::default()
        .with_content_type(JSON.into())
        .with_type(reply_type.into())
        .with_delivery_mode(PERSISTENT)
        .with_timestamp(now_secs())
        .with_headers(headers);
    match correlation_id {
        Some(c) => p.with_correlation_id(c.into()),
        None => p,
    }
}

pub fn event(
    routing_key: &str,
    message_id: &str,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> BasicProperties {
    let p = BasicProperties::default()
        .with_content_type(JSON.into())
        .with_type(routing_key.into())
        .with_message_id(message_id.into())
        .with_delivery_mode(PERSISTENT)
        .with_timestamp(now_secs());
    if traceparent.is_none() {
        return p;
    }
    let mut headers = FieldTable::default();
    insert_trace(&mut headers, traceparent, tracestate);
    p.with_headers(headers)
}

/// W3C `traceparent`, and `tracestate` only with a traceparent (alone it means nothing).
fn insert_trace(headers: &mut FieldTable, traceparent: Option<&str>, tracestate: Option<&str>) {
    if let Some(t) = traceparent {
        headers.insert(
            crate::trace::TRACEPARENT.into(),
            AMQPValue::LongString(LongString::from(t)),
        );
        if let Some(s) = tracestate {
            headers.insert(
                crate::trace::TRACESTATE.into(),
                AMQPValue::LongString(LongString::from(s)),
            );
        }
    }
}

/// A header's value as text (publishers send strings as long or short strings).
pub fn header_text<'a>(p: &'a BasicProperties, name: &str) -> Option<&'a str> {
    match p.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// The original properties, plus headers saying why the worker dead-lettered it
/// (and, when its body was cut, how large it was).
pub fn dead_letter(
    original: &BasicProperties,
    code: &str,
    reason: &str,
    original_size: Option<usize>,
) -> BasicProperties {
    let mut headers = original.headers().clone().unwrap_or_default();
    if let Some(n) = original_size {
        headers.insert(
            ORIGINAL_SIZE_HEADER.into(),
            AMQPValue::LongLongInt(n as i64),
        );
    }
    headers.insert(
        ERROR_CODE_HEADER.into(),
        AMQPValue::LongString(LongString::from(code)),
    );
    headers.insert(
        ERROR_REASON_HEADER.into(),
        AMQPValue::LongString(LongString::from(reason)),
    );
    original
        .clone()
        .with_headers(headers)
        .with_delivery_mode(PERSISTENT)
}

pub fn short(s: &Option<ShortString>) -> Option<&str> {
    s.as_ref().map(|v| v.as_str()).filter(|v| !v.is_empty())
}

/// How many times the broker delivered this message before (quorum queues set
/// `x-delivery-count` on redeliveries).
pub fn delivery_count(p: &BasicProperties) -> u64 {
    p.headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count"))
        .and_then(as_u64)
        .unwrap_or(0)
}

/// The `status` header of a reply.
pub fn status(headers: &FieldTable) -> Option<u64> {
    headers.inner().get(STATUS_HEADER).and_then(as_u64)
}

/// A received reply's status, or -1 when it carries none.
pub fn reply_status(p: &BasicProperties) -> i64 {
    p.headers()
        .as_ref()
        .and_then(status)
        .map_or(-1, |s| s as i64)
}

pub fn as_u64(v: &AMQPValue) -> Option<u64> {
    match *v {
        AMQPValue::ShortShortInt(n) => u64::try_from(n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(n.into()),
        AMQPValue::ShortInt(n) => u64::try_from(n).ok(),
        AMQPValue::ShortUInt(n) => Some(n.into()),
        AMQPValue::LongInt(n) => u64::try_from(n).ok(),
        AMQPValue::LongUInt(n) => Some(n.into()),
        AMQPValue::LongLongInt(n) => u64::try_from(n).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sent_at_prefers_milliseconds_and_falls_back_to_the_timestamp() {
        let mut h = FieldTable::default();
        h.insert(
            TIMESTAMP_MS_HEADER.into(),
            AMQPValue::LongLongInt(1_700_000_000_123),
        );
        let p = BasicProperties::default()
            .with_timestamp(1_700_000_000)
            .with_headers(h);
        assert_eq!(sent_at_ms(&p), Some(1_700_000_000_123));
        let p = BasicProperties::default().with_timestamp(1_700_000_000);
        assert_eq!(sent_at_ms(&p), Some(1_700_000_000_000));
        assert_eq!(sent_at_ms(&BasicProperties::default()), None);
    }
}
