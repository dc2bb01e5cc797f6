//! The outside of the system (CONTRACT.md): commands, replies, events, error codes.
//! Pure types and decoding; no I/O.

pub mod command;
pub mod error;
pub mod message;
pub mod schema;

pub use command::{
    decode, Command, CommandName, CreateTicket, CreateVerificationToken, Incoming, Purpose,
};
pub use error::{ErrorCode, Rejection};
pub use message::{
    EmailRequested, ErrorReply, InternalErrorReply, TicketCreated, TicketCreatedEvent,
    VerificationTokenCreated, VerificationTokenCreatedEvent,
};

/// A reply as it is stored and sent: its `status` header and its JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

/// RabbitMQ's direct reply-to pseudo-queue (and the names it gives replies).
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Whether a command's `reply_to` names a reply queue (CONTRACT §2): direct
/// reply-to, or a queue named with one of the configured prefixes. Anything
/// else (another service's queue, the command queue) is never published to.
///
/// A name holding U+FFFD (bytes that were not UTF-8, decoded lossily by the
/// AMQP parser) or a control character names no queue anyone declared: it is
/// refused as well, rather than a reply published to a name the broker will
/// never match.
pub fn reply_to_allowed(reply_to: &str, prefixes: &[String]) -> bool {
    if reply_to
        .chars()
        .any(|c| c == char::REPLACEMENT_CHARACTER || c.is_control())
    {
        return false;
    }
    let direct = reply_to
        .strip_prefix(DIRECT_REPLY_TO)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'));
    direct
        || prefixes
            .iter()
            .any(|p| !p.is_empty() && reply_to.starts_with(p.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reply_queues_may_be_replied_to() {
        let prefixes = vec!["amq.gen-".to_string()];
        for ok in [
            "amq.rabbitmq.reply-to",
            "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAyNjI2NDk1OQAAd4cAAAAAZ0nDTA==",
            "amq.gen-JzTY20BRgKO-HjmUJj0wLg",
        ] {
            assert!(reply_to_allowed(ok, &prefixes), "{ok}");
        }
        for bad in [
            "profile.commands",
            "billing.inbox",
            "amq.ge",
            "",
            " amq.gen-x",
            "AMQ.GEN-x",
            "amq.rabbitmq.reply-tox",
        ] {
            assert!(!reply_to_allowed(bad, &prefixes), "{bad:?}");
        }
        assert!(
            !reply_to_allowed("x", &[String::new()]),
            "an empty prefix allows nothing"
        );
        assert!(reply_to_allowed("replies.svc-1", &["replies.".into()]));
    }

    #[test]
    fn a_reply_to_that_was_not_utf8_is_no_reply_queue() {
        let prefixes = vec!["amq.gen-".to_string()];
        for bad in [
            "amq.gen-\u{fffd}abc",
            "amq.rabbitmq.reply-to.\u{fffd}",
            "amq.gen-x\u{0}",
            "amq.gen-x\u{7f}",
        ] {
            assert!(!reply_to_allowed(bad, &prefixes), "{bad:?}");
        }
        // The 255-byte form the AMQP parser makes of 254 bytes and an invalid one.
        let capped = format!("amq.gen-{}\u{fffd}", "a".repeat(244));
        assert_eq!(capped.len(), 255);
        assert!(!reply_to_allowed(&capped, &prefixes));
    }
}
