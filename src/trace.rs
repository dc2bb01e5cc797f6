//! W3C Trace Context on commands, replies and events, read and written by
//! OpenTelemetry's propagator (`traceparent` and `tracestate`): a command's
//! trace is continued on its reply and events, so a publisher can follow one
//! request through the worker to the email dispatcher. With an OTLP endpoint
//! set the worker's spans are exported in that trace (`telemetry`); without
//! one the IDs are made here, and nothing else is done with them.

use lapin::types::FieldTable;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::collections::HashMap;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

pub use crate::records::TraceHeaders;

/// A command's headers as the propagator reads them.
struct Headers<'a>(Option<&'a FieldTable>);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0?.inner().get(key)? {
            lapin::types::AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            lapin::types::AMQPValue::ShortString(s) => Some(s.as_str()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .map(|h| h.inner().keys().map(|k| k.as_str()).collect())
            .unwrap_or_default()
    }
}

struct Written(HashMap<String, String>);

impl Injector for Written {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

/// The publisher's span, from a command's `traceparent` and `tracestate`;
/// `None` when absent or invalid (the spec says to ignore such headers, and the
/// worker then starts a new trace).
pub fn extract(headers: Option<&FieldTable>) -> Option<SpanContext> {
    let carrier = Headers(headers);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return None;
    }
    // The propagator takes a tracestate with empty keys or control characters
    // as it is; the worker would copy it onto every reply and event. One that
    // breaks the W3C grammar is dropped whole, as the spec allows.
    if carrier
        .get(TRACESTATE)
        .is_some_and(|t| !valid_tracestate(t))
    {
        return Some(SpanContext::new(
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags(),
            sc.is_remote(),
            TraceState::NONE,
        ));
    }
    Some(sc)
}

/// W3C tracestate: at most 32 `key=value` members, 512 bytes in all; a key of
/// lower-case letters, digits and `_-*/` (with one `@` for multi-tenant keys),
/// starting with a letter or digit, at most 256 bytes; a value of printable
/// ASCII but `,` and `=`, at most 256 bytes, not ending in a space.
pub fn valid_tracestate(s: &str) -> bool {
    let members: Vec<&str> = s
        .split(',')
        .map(|m| m.trim_matches([' ', '\t']))
        .filter(|m| !m.is_empty())
        .collect();
    let key_char = |c: char| matches!(c, 'a'..='z' | '0'..='9' | '_' | '-' | '*' | '/');
    let key_ok = |k: &str| {
        let (tenant, system) = match k.split_once('@') {
            Some((t, sys)) => (t, Some(sys)),
            None => (k, None),
        };
        let part_ok = |p: &str| {
            !p.is_empty()
                && p.len() <= 256
                && p.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && p.chars().all(key_char)
        };
        part_ok(tenant) && system.is_none_or(part_ok)
    };
    let value_ok = |v: &str| {
        !v.is_empty()
            && v.len() <= 256
            && !v.ends_with(' ')
            && v.chars()
                .all(|c| (' '..='~').contains(&c) && c != ',' && c != '=')
    };
    s.len() <= 512
        && !members.is_empty()
        && members.len() <= 32
        && members.iter().all(|m| match m.split_once('=') {
            Some((k, v)) => key_ok(k) && value_ok(v),
            None => false,
        })
}

/// The publisher's context, for an exported span's parent.
pub fn remote_parent(sc: &SpanContext) -> Context {
    Context::new().with_remote_span_context(sc.clone())
}

/// The worker's span under `parent` (its trace, flags and tracestate, a new
/// span ID), or the root of a new, sampled trace when the command had none.
pub fn continue_or_start(
    parent: Option<&SpanContext>,
    random: impl FnOnce() -> [u8; 24],
) -> SpanContext {
    let r = random();
    let mut span_id: [u8; 8] = r[16..].try_into().expect("8 bytes");
    if span_id == [0; 8] {
        span_id[7] = 1;
    }
    let span_id = SpanId::from_bytes(span_id);
    match parent {
        Some(p) => SpanContext::new(
            p.trace_id(),
            span_id,
            p.trace_flags(),
            false,
            p.trace_state().clone(),
        ),
        None => {
            let mut trace_id: [u8; 16] = r[..16].try_into().expect("16 bytes");
            if trace_id == [0; 16] {
                trace_id[15] = 1;
            }
            SpanContext::new(
                TraceId::from_bytes(trace_id),
                span_id,
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            )
        }
    }
}

/// The headers that put a message in span `sc`'s trace, as its child.
pub fn headers(sc: &SpanContext) -> TraceHeaders {
    let mut out = Written(HashMap::new());
    TraceContextPropagator::new().inject_context(&remote_parent(sc), &mut out);
    TraceHeaders {
        traceparent: out.0.remove(TRACEPARENT).unwrap_or_default(),
        tracestate: out.0.remove(TRACESTATE).filter(|s| !s.is_empty()),
    }
}

/// Random bytes for new trace and span IDs.
pub fn random_ids() -> [u8; 24] {
    let mut b = [0u8; 24];
    // The OS generator failing is not a reason to drop a command: the IDs are
    // then only less random (the zero checks above keep them valid).
    let _ = getrandom::fill(&mut b);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, LongString};

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn table(pairs: &[(&str, &str)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), AMQPValue::LongString(LongString::from(*v)));
        }
        t
    }

    #[test]
    fn reads_the_spec_example_with_its_tracestate() {
        let h = table(&[
            (TRACEPARENT, EXAMPLE),
            (TRACESTATE, "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
        ]);
        let sc = extract(Some(&h)).unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled());
        assert_eq!(sc.trace_state().get("congo"), Some("t61rcWkgMzE"));
    }

    #[test]
    fn invalid_or_missing_headers_are_ignored() {
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-é4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(
                extract(Some(&table(&[(TRACEPARENT, bad)]))),
                None,
                "{bad:?}"
            );
        }
        assert_eq!(extract(None), None);
        assert_eq!(extract(Some(&FieldTable::default())), None);
    }

    #[test]
    fn the_workers_span_continues_the_trace_and_its_state() {
        let h = table(&[(TRACEPARENT, EXAMPLE), (TRACESTATE, "congo=t61rcWkgMzE")]);
        let parent = extract(Some(&h)).unwrap();
        let mine = continue_or_start(Some(&parent), || [7; 24]);
        assert_eq!(mine.trace_id(), parent.trace_id());
        assert_ne!(mine.span_id(), parent.span_id());
        let out = headers(&mine);
        assert_eq!(
            out.traceparent,
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", mine.span_id())
        );
        assert_eq!(out.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
    }

    /// A publisher's tracestate is passed on to replies, events and the outbox
    /// only as the propagator accepts it: a malformed one (or one past the
    /// spec's 32 entries) is dropped, not copied.
    #[test]
    fn a_malformed_or_oversized_tracestate_is_not_passed_on() {
        let too_many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        for state in [
            "not a tracestate",
            "k=v\u{1}",
            too_many.join(",").as_str(),
            "=v",
        ] {
            let h = table(&[(TRACEPARENT, EXAMPLE), (TRACESTATE, state)]);
            let parent = extract(Some(&h)).expect("the traceparent itself is valid");
            let mine = continue_or_start(Some(&parent), || [7; 24]);
            assert_eq!(headers(&mine).tracestate, None, "{state:?}");
        }
        for good in [
            "congo=t61rcWkgMzE",
            "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
            "tenant@vendor=v v",
        ] {
            assert!(valid_tracestate(good), "{good}");
        }
    }

    #[test]
    fn without_a_parent_a_sampled_trace_starts() {
        let mine = continue_or_start(None, || [0; 24]);
        assert!(mine.is_valid() && mine.is_sampled());
        let out = headers(&mine);
        assert_eq!(
            out.traceparent,
            "00-00000000000000000000000000000001-0000000000000001-01"
        );
        assert_eq!(out.tracestate, None);
    }
}
