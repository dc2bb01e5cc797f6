//! W3C Trace Context (`traceparent`): a command's trace is continued on its reply
//! and events, so a publisher can follow one request through the worker to the
//! email dispatcher. Pure: parsing, and building the worker's own span's header.

use std::fmt;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
const SAMPLED: u8 = 0x01;

/// One position in a trace: the trace and the span that is current there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceContext {
    /// Parses a `traceparent` header. Anything invalid is `None`, and the
    /// worker then starts a new trace (the spec says to ignore such headers).
    pub fn parse(header: &str) -> Option<Self> {
        let h = header.trim();
        let version = hex_bytes::<1>(h.get(0..2)?)?[0];
        // Version 255 is forbidden; a later version may append fields after a dash.
        if version == 0xff
            || (version == 0 && h.len() != 55)
            || (h.len() > 55 && h.as_bytes()[55] != b'-')
        {
            return None;
        }
        let b = h.as_bytes();
        if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        // `get`, not indexing: a header is untrusted bytes and may not split on
        // character boundaries.
        let trace_id = hex_bytes::<16>(h.get(3..35)?)?;
        let span_id = hex_bytes::<8>(h.get(36..52)?)?;
        let flags = hex_bytes::<1>(h.get(53..55)?)?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The worker's span under `parent`, or the root of a new trace when the
    /// command came without one (sampled, so a collector keeps it).
    pub fn continue_or_start(
        parent: Option<TraceContext>,
        random: impl FnOnce() -> [u8; 24],
    ) -> Self {
        let r = random();
        let mut span_id: [u8; 8] = r[16..].try_into().expect("8 bytes");
        if span_id == [0; 8] {
            span_id[7] = 1;
        }
        match parent {
            Some(p) => TraceContext {
                trace_id: p.trace_id,
                span_id,
                flags: p.flags,
            },
            None => {
                let mut trace_id: [u8; 16] = r[..16].try_into().expect("16 bytes");
                if trace_id == [0; 16] {
                    trace_id[15] = 1;
                }
                TraceContext {
                    trace_id,
                    span_id,
                    flags: SAMPLED,
                }
            }
        }
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }
}

/// The header value, always version 00.
impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            self.flags
        )
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

/// Lower-case hex; by table, since every command formats two IDs at least twice.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// Lower-case hex only, as the spec requires.
fn hex_bytes<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_spec_example_and_prints_it_back() {
        let t = TraceContext::parse(EXAMPLE).unwrap();
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span_id_hex(), "00f067aa0ba902b7");
        assert_eq!(t.flags, 1);
        assert_eq!(t.to_string(), EXAMPLE);
    }

    #[test]
    fn rejects_what_the_spec_says_to_ignore() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
            "00-ééééééééééééééééé-00f067aa0ba902b7-01",
            "0é-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn no_header_makes_it_panic() {
        // Every position replaced by a multi-byte character, and every truncation.
        for i in 0..EXAMPLE.len() {
            let mut h = EXAMPLE.to_string();
            h.replace_range(i..i + 1, "é");
            assert_eq!(TraceContext::parse(&h), None, "{h}");
            let _ = TraceContext::parse(&EXAMPLE[..i]);
            let _ = TraceContext::parse(&format!("01{}é", &EXAMPLE[2..]));
        }
    }

    #[test]
    fn later_versions_are_read_by_their_first_fields() {
        let t = TraceContext::parse(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what-comes-next",
        )
        .unwrap();
        assert_eq!(t.flags, 0);
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00x")
                .is_none()
        );
    }

    #[test]
    fn continuing_keeps_trace_and_flags_with_a_new_span() {
        let parent = TraceContext::parse(EXAMPLE).unwrap();
        let child = TraceContext::continue_or_start(Some(parent), || [7; 24]);
        assert_eq!(child.trace_id, parent.trace_id);
        assert_eq!(child.flags, parent.flags);
        assert_eq!(child.span_id, [7; 8]);
        let unsampled = TraceContext { flags: 0, ..parent };
        assert_eq!(
            TraceContext::continue_or_start(Some(unsampled), || [7; 24]).flags,
            0
        );
    }

    #[test]
    fn starting_makes_a_valid_sampled_root() {
        let mut r = [0u8; 24];
        r[0] = 0xab;
        r[16] = 0xcd;
        let t = TraceContext::continue_or_start(None, || r);
        assert_eq!(t.trace_id[0], 0xab);
        assert_eq!(t.span_id[0], 0xcd);
        assert_eq!(t.flags, 1);
        // Even all-zero randomness gives IDs the spec accepts.
        let z = TraceContext::continue_or_start(None, || [0; 24]);
        assert_eq!(TraceContext::parse(&z.to_string()), Some(z));
    }

    #[test]
    fn random_ids_differ() {
        assert_ne!(random_ids(), random_ids());
    }
}
