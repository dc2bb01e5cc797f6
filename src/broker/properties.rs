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
    sent_at_ms_exactly(p).or_else(|| p.timestamp().map(|s| s.saturating_mul(1000)))
}

/// The `timestamp_in_ms` header alone: the send time to the millisecond.
pub fn sent_at_ms_exactly(p: &BasicProperties) -> Option<u64> {
    p.headers()
        .as_ref()
        .and_then(|h| h.inner().get(TIMESTAMP_MS_HEADER))
        .and_then(|v| match v {
            AMQPValue::Timestamp(t) => Some(*t),
            v => as_u64(v),
        })
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

/// On a dead letter whose command's headers would not fit in one frame beside
/// the worker's reasons: how many bytes of headers were dropped.
pub const HEADERS_DROPPED_HEADER: &str = "x-original-headers-dropped";
/// On a dead letter of a command that named a `user_id`: it, as a header (the
/// broker refuses a `user_id` that is not the publishing connection's user).
pub const ORIGINAL_USER_ID_HEADER: &str = "x-original-user-id";

/// A content header frame's bytes besides its headers table: frame header and
/// end (8); class, weight, body size and property flags (14); and at most the
/// other properties a dead letter keeps (seven short strings of at most 256
/// bytes, delivery mode and timestamp).
const CONTENT_HEADER_OVERHEAD: usize = 8 + 14 + 7 * 256 + 1 + 8;

/// A `BasicProperties::with_…` for a short-string property.
type SetShort = fn(BasicProperties, ShortString) -> BasicProperties;

/// The encoded size of a headers table, with amq-protocol's own encoder.
pub fn encoded_len(table: &FieldTable) -> usize {
    cookie_factory::gen_simple(lapin::types::generation::gen_field_table(table), Vec::new())
        .map_or(usize::MAX, |v| v.len())
}

/// A dead letter built from the command's properties: why the worker put it
/// there (`x-error-code`, `x-error-reason`, and the body's size when it was
/// cut), and nothing that lets the broker drop it, reorder it or refuse it.
/// `expiration` and `priority` are not copied (a prober could otherwise make
/// its own traces expire), nor `user_id` (kept as a header). The command's
/// headers are kept when the whole fits in one frame of `frame_max` bytes;
/// otherwise they are dropped, the worker's own kept, and a header says so.
pub fn dead_letter(
    original: &BasicProperties,
    code: &str,
    reason: &str,
    original_size: Option<usize>,
    frame_max: usize,
) -> BasicProperties {
    let mut ours = FieldTable::default();
    if let Some(n) = original_size {
        ours.insert(
            ORIGINAL_SIZE_HEADER.into(),
            AMQPValue::LongLongInt(n as i64),
        );
    }
    if let Some(user) = original.user_id() {
        ours.insert(
            ORIGINAL_USER_ID_HEADER.into(),
            AMQPValue::LongString(LongString::from(user.as_str())),
        );
    }
    ours.insert(
        ERROR_CODE_HEADER.into(),
        AMQPValue::LongString(LongString::from(code)),
    );
    ours.insert(
        ERROR_REASON_HEADER.into(),
        AMQPValue::LongString(LongString::from(reason)),
    );
    let mut headers = original.headers().clone().unwrap_or_default();
    for (k, v) in ours.inner() {
        headers.insert(k.clone(), v.clone());
    }
    let room = frame_max.saturating_sub(CONTENT_HEADER_OVERHEAD);
    let size = encoded_len(&headers);
    if size > room {
        ours.insert(
            HEADERS_DROPPED_HEADER.into(),
            AMQPValue::LongLongInt(original.headers().as_ref().map_or(0, encoded_len) as i64),
        );
        headers = ours;
    }
    let mut p = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(PERSISTENT);
    let keep: [(&Option<ShortString>, SetShort); 7] = [
        (original.content_type(), BasicProperties::with_content_type),
        (
            original.content_encoding(),
            BasicProperties::with_content_encoding,
        ),
        (
            original.correlation_id(),
            BasicProperties::with_correlation_id,
        ),
        (original.reply_to(), BasicProperties::with_reply_to),
        (original.message_id(), BasicProperties::with_message_id),
        (original.kind(), BasicProperties::with_type),
        (original.app_id(), BasicProperties::with_app_id),
    ];
    for (value, set) in keep {
        if let Some(v) = value {
            p = set(p, v.clone());
        }
    }
    if let Some(t) = original.timestamp() {
        p = p.with_timestamp(*t);
    }
    p
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
    fn a_dead_letter_neither_expires_nor_outgrows_a_frame() {
        let mut big = FieldTable::default();
        big.insert(
            "padding".into(),
            AMQPValue::LongString(LongString::from("x".repeat(120_000))),
        );
        let command = BasicProperties::default()
            .with_expiration("1000".into())
            .with_priority(9)
            .with_user_id("caller".into())
            .with_message_id("m-1".into())
            .with_correlation_id("c-1".into())
            .with_type("create-ticket".into())
            .with_headers(big.clone());
        let d = dead_letter(
            &command,
            "PARAM_DESERIALIZATION_ERROR",
            "why",
            None,
            131_072,
        );
        assert_eq!(d.expiration(), &None);
        assert_eq!(d.priority(), &None);
        assert_eq!(
            d.user_id(),
            &None,
            "the broker checks user_id against the publisher"
        );
        assert_eq!(d.message_id().as_ref().map(|m| m.as_str()), Some("m-1"));
        assert_eq!(d.correlation_id().as_ref().map(|m| m.as_str()), Some("c-1"));
        assert_eq!(d.delivery_mode(), &Some(PERSISTENT));
        let h = d.headers().as_ref().unwrap();
        // The command's headers fit a frame of 128 KiB, and so stay.
        assert!(h.inner().contains_key("padding"));
        assert!(!h.inner().contains_key(HEADERS_DROPPED_HEADER));
        assert_eq!(
            h.inner().get(ORIGINAL_USER_ID_HEADER),
            Some(&AMQPValue::LongString(LongString::from("caller")))
        );
        assert!(encoded_len(h) + CONTENT_HEADER_OVERHEAD <= 131_072);
        // With the reasons they would not fit a smaller frame: dropped, and said so.
        let d = dead_letter(
            &command,
            "PARAM_DESERIALIZATION_ERROR",
            "why",
            Some(70_000),
            121_000,
        );
        let h = d.headers().as_ref().unwrap();
        assert!(!h.inner().contains_key("padding"));
        assert_eq!(
            h.inner().get(ERROR_CODE_HEADER),
            Some(&AMQPValue::LongString(LongString::from(
                "PARAM_DESERIALIZATION_ERROR"
            )))
        );
        assert!(h.inner().contains_key(ERROR_REASON_HEADER));
        assert!(h.inner().contains_key(ORIGINAL_SIZE_HEADER));
        assert_eq!(
            h.inner().get(HEADERS_DROPPED_HEADER),
            Some(&AMQPValue::LongLongInt(encoded_len(&big) as i64))
        );
    }

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
