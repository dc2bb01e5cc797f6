//! The AMQP frame parser (amq-protocol, with the vendored amq-protocol-types)
//! against a peer's bytes: whatever a frame holds, parsing it returns a frame
//! or an error and never panics. A panic there kills the connection's I/O
//! thread, and with it every delivery in flight (issue 31). What parses must
//! also encode again, and encode the same the second time round: no string
//! the parser makes is too long for the encoder.
//!
//! RabbitMQ passes a publisher's content header through to consumers, so the
//! generated frames are content headers whose properties and header tables
//! are built byte by byte (any bytes in strings, lengths that lie, unknown
//! field types, nesting), then as often mangled at random.

use lapin::types::{ShortString, MAX_SHORT_STRING_LENGTH};
use proptest::collection::vec;
use proptest::prelude::*;

const FRAME_HEADER: u8 = 2;
const FRAME_END: u8 = 0xCE;

/// A frame around `payload` (type, channel, size, payload, end).
fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![kind];
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f.push(FRAME_END);
    f
}

/// A short string's bytes: anything up to 255 bytes, often the worst case of
/// valid text up to the limit with an invalid byte at the end.
fn short_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..=255),
        (0usize..=254, any::<u8>()).prop_map(|(n, b)| {
            let mut v = vec![b'a'; n];
            v.push(0x80 | b);
            v
        }),
        (0usize..=127).prop_map(|n| {
            let mut v = "é".repeat(n).into_bytes();
            v.push(0xff);
            v.truncate(255);
            v
        }),
    ]
}

fn short(body: &[u8]) -> Vec<u8> {
    let mut v = vec![body.len() as u8];
    v.extend_from_slice(body);
    v
}

/// A length prefix: usually the truth, sometimes a lie.
fn long(body: &[u8], lie: Option<u32>) -> Vec<u8> {
    let mut v = lie.unwrap_or(body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

/// One field value with its type tag, nested tables and arrays included.
fn value() -> impl Strategy<Value = Vec<u8>> {
    let fixed = |tag: u8, n: usize| vec(any::<u8>(), n).prop_map(move |b| [vec![tag], b].concat());
    let leaf = prop_oneof![
        fixed(b't', 1),
        fixed(b'b', 1),
        fixed(b'B', 1),
        fixed(b's', 2),
        fixed(b'u', 2),
        fixed(b'I', 4),
        fixed(b'i', 4),
        fixed(b'l', 8),
        fixed(b'f', 4),
        fixed(b'd', 8),
        fixed(b'D', 5),
        fixed(b'T', 8),
        Just(vec![b'V']),
        (
            vec(any::<u8>(), 0..300),
            proptest::option::weighted(0.1, any::<u32>())
        )
            .prop_map(|(b, lie)| [vec![b'S'], long(&b, lie)].concat()),
        (
            vec(any::<u8>(), 0..64),
            proptest::option::weighted(0.1, any::<u32>())
        )
            .prop_map(|(b, lie)| [vec![b'x'], long(&b, lie)].concat()),
        // A type tag no one defined, and whatever follows it.
        (any::<u8>(), vec(any::<u8>(), 0..16)).prop_map(|(t, b)| [vec![t], b].concat()),
    ];
    leaf.prop_recursive(5, 96, 6, |inner| {
        prop_oneof![
            (
                vec(inner.clone(), 0..6),
                proptest::option::weighted(0.1, any::<u32>())
            )
                .prop_map(|(vals, lie)| [vec![b'A'], long(&vals.concat(), lie)].concat()),
            (
                vec((short_bytes(), inner), 0..6),
                proptest::option::weighted(0.1, any::<u32>())
            )
                .prop_map(|(entries, lie)| {
                    let body: Vec<u8> = entries
                        .iter()
                        .flat_map(|(k, v)| [short(k), v.clone()].concat())
                        .collect();
                    [vec![b'F'], long(&body, lie)].concat()
                }),
        ]
    })
}

/// A header table's bytes (without the `F` tag a nested one has).
fn table() -> impl Strategy<Value = Vec<u8>> {
    vec((short_bytes(), value()), 0..8).prop_map(|entries| {
        let body: Vec<u8> = entries
            .iter()
            .flat_map(|(k, v)| [short(k), v.clone()].concat())
            .collect();
        long(&body, None)
    })
}

/// A basic content header: class, weight, body size, property flags and the
/// properties those flags announce, in the order AMQP 0-9-1 gives them.
fn content_header() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just(60u16), any::<u16>()],
        any::<u64>(),
        any::<u16>(),
        vec(short_bytes(), 11),
        table(),
        any::<[u8; 2]>(),
        any::<u64>(),
    )
        .prop_map(|(class, size, flags, strings, headers, modes, timestamp)| {
            let mut p = class.to_be_bytes().to_vec();
            p.extend_from_slice(&0u16.to_be_bytes());
            p.extend_from_slice(&size.to_be_bytes());
            p.extend_from_slice(&flags.to_be_bytes());
            let mut strings = strings.iter().map(|s| short(s));
            let mut next = || strings.next().unwrap_or_default();
            for bit in (2..=15).rev() {
                if flags & (1 << bit) == 0 {
                    continue;
                }
                match bit {
                    13 => p.extend_from_slice(&headers),
                    12 => p.push(modes[0]),
                    11 => p.push(modes[1]),
                    6 => p.extend_from_slice(&timestamp.to_be_bytes()),
                    _ => p.extend_from_slice(&next()),
                }
            }
            frame(FRAME_HEADER, 1, &p)
        })
}

/// A frame as a peer might send it: a content header, or one mangled (bytes
/// overwritten, cut short), or bytes with a frame's outline and nothing else.
fn peer_frame() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => content_header(),
        3 => (content_header(), vec((any::<prop::sample::Index>(), any::<u8>()), 1..8))
            .prop_map(|(mut f, edits)| {
                for (at, b) in edits {
                    let i = at.index(f.len());
                    f[i] = b;
                }
                f
            }),
        1 => (content_header(), any::<prop::sample::Index>())
            .prop_map(|(f, at)| f[..at.index(f.len())].to_vec()),
        1 => (any::<u8>(), any::<u16>(), vec(any::<u8>(), 0..512))
            .prop_map(|(kind, channel, payload)| frame(kind % 9, channel, &payload)),
        1 => vec(any::<u8>(), 0..512),
    ]
}

fn parse(bytes: &[u8]) -> Option<amq_protocol::frame::AMQPFrame> {
    amq_protocol::frame::parse_frame(bytes).ok().map(|(_, f)| f)
}

fn encode(f: &amq_protocol::frame::AMQPFrame) -> Vec<u8> {
    cookie_factory::gen_simple(amq_protocol::frame::gen_frame(f), Vec::new())
        .unwrap_or_else(|e| panic!("a parsed frame encodes again: {e:?}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn no_frame_a_peer_sends_panics_the_parser(bytes in peer_frame()) {
        if let Some(f) = parse(&bytes) {
            // What parses encodes, and is stable from then on: no short
            // string longer than its length byte, nothing truncated.
            let once = encode(&f);
            let again = parse(&once).expect("its own encoding parses");
            prop_assert_eq!(encode(&again), once);
        }
    }
}

#[test]
fn a_255_byte_property_that_is_not_utf8_parses_within_the_limit() {
    // The case: 254 ASCII bytes and one invalid byte in each short
    // string of the properties and in a header's name.
    let mut bad = vec![b'm'; 254];
    bad.push(0xff);
    let headers = {
        let entry = [short(&bad), vec![b'V']].concat();
        long(&entry, None)
    };
    let mut p = 60u16.to_be_bytes().to_vec();
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&2u64.to_be_bytes());
    // content_type, headers, correlation_id, reply_to, message_id, type.
    let flags: u16 = (1 << 15) | (1 << 13) | (1 << 10) | (1 << 9) | (1 << 7) | (1 << 5);
    p.extend_from_slice(&flags.to_be_bytes());
    p.extend_from_slice(&short(&bad)); // content_type
    p.extend_from_slice(&headers);
    for _ in 0..4 {
        p.extend_from_slice(&short(&bad)); // correlation_id, reply_to, message_id, type
    }
    let f = parse(&frame(FRAME_HEADER, 1, &p)).expect("parses");
    let amq_protocol::frame::AMQPFrame::Header(_, h) = &f else {
        panic!("a content header: {f:?}")
    };
    let props = &h.properties;
    let strings: Vec<&ShortString> = [
        props.content_type(),
        props.correlation_id(),
        props.reply_to(),
        props.message_id(),
        props.kind(),
    ]
    .into_iter()
    .map(|s| s.as_ref().expect("present"))
    .chain(props.headers().as_ref().expect("headers").inner().keys())
    .collect();
    for s in strings {
        assert!(s.as_str().len() <= MAX_SHORT_STRING_LENGTH, "{s:?}");
        assert!(
            s.as_str().ends_with('\u{fffd}'),
            "still says it was not UTF-8"
        );
    }
    encode(&f);
}
