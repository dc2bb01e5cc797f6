//! How a planned batch is answered, decided without I/O: for each delivery its
//! reply, the events it (re-)announces and its dead letter, in one
//! [`Publications`], and how it was answered ([`Answer`]) for the tally.

use super::item::Item;
use super::plan::{Plan, Step};
use super::publish::Publications;
use crate::broker::{properties, Outgoing};
use crate::config::BrokerSettings;
use crate::contract::{self, InternalErrorReply, Reply};

/// Dead-letter code for a command that failed on every allowed delivery.
pub const POISON_CODE: &str = "INTERNAL_SERVER_ERROR";
/// Dead-letter code for a command whose `reply_to` names no reply queue (CONTRACT §2).
pub const REPLY_TO_NOT_ALLOWED: &str = "REPLY_TO_NOT_ALLOWED";

/// How one command was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Answer {
    /// The reply's status; 0 when nothing is replied (reply_to refused).
    pub status: u16,
    pub disposition: Disposition,
    pub code: Option<&'static str>,
}

/// What became of a command, as logs and metrics tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Disposition {
    /// Created and stored.
    Created,
    /// Answered with a refusal, acked.
    Rejected,
    /// Answered 400 and dead-lettered.
    Malformed,
    /// A stored reply sent again for a message_id seen before.
    Repeated,
    /// reply_to not allowed: dead-lettered, no reply.
    ReplyToRefused,
    /// Failed on every allowed delivery: 500 and dead-lettered.
    Failed,
}

impl Disposition {
    /// The `outcome` field of the command's log line.
    pub fn as_str(self) -> &'static str {
        match self {
            Disposition::Created => "created",
            Disposition::Rejected => "rejected",
            Disposition::Malformed => "malformed",
            Disposition::Repeated => "repeated",
            Disposition::ReplyToRefused => "refused",
            Disposition::Failed => "failed",
        }
    }

    pub fn dead_lettered(self) -> bool {
        matches!(
            self,
            Disposition::Malformed | Disposition::ReplyToRefused | Disposition::Failed
        )
    }
}

/// Where answers go: the topology's names and the connection's frame size (a
/// dead letter's properties must fit one frame, or the broker closes the
/// connection with FRAME_ERROR).
#[derive(Clone, Copy)]
pub(super) struct Routes<'a> {
    pub broker: &'a BrokerSettings,
    pub frame_max: usize,
}

/// A batch's publications and answers. `plan` has one step per item, in order.
pub(super) fn batch(items: &[Item], plan: &Plan, to: Routes<'_>) -> (Publications, Vec<Answer>) {
    debug_assert_eq!(items.len(), plan.steps.len(), "one step per delivery");
    let mut out = Publications::default();
    let mut answers = Vec::with_capacity(items.len());
    for (i, (item, step)) in items.iter().zip(&plan.steps).enumerate() {
        let status = match plan.reply(i) {
            Some(reply) => {
                let status = reply.status;
                out.replies.extend(reply_message(item, reply));
                status
            }
            None => 0,
        };
        let answer = |disposition, code| Answer {
            status,
            disposition,
            code,
        };
        answers.push(match step {
            Step::ReplyToRefused => {
                let reason = reply_to_refusal(item, to.broker);
                tracing::warn!(
                    parent: &item.span,
                    outcome = Disposition::ReplyToRefused.as_str(),
                    code = REPLY_TO_NOT_ALLOWED,
                    reason = %reason,
                    "command with a reply_to that is no reply queue dead-lettered unprocessed"
                );
                out.dead_letters.push((
                    dead_letter_message(item, REPLY_TO_NOT_ALLOWED, &reason, to),
                    item.tag(),
                ));
                answer(Disposition::ReplyToRefused, Some(REPLY_TO_NOT_ALLOWED))
            }
            Step::Malformed(r) => {
                tracing::warn!(
                    parent: &item.span,
                    outcome = Disposition::Malformed.as_str(),
                    code = r.code.as_str(),
                    reason = %r.message,
                    "malformed command answered 400 and dead-lettered"
                );
                out.dead_letters.push((
                    dead_letter_message(item, r.code.as_str(), &r.message, to),
                    item.tag(),
                ));
                answer(Disposition::Malformed, Some(r.code.as_str()))
            }
            Step::Rejected(r) => answer(Disposition::Rejected, Some(r.code.as_str())),
            Step::Stored(s) => {
                for e in &s.pending_events {
                    out.push_event(to.broker, e);
                }
                answer(Disposition::Repeated, None)
            }
            Step::New { record, rejected } => {
                for e in &plan.records[*record].events {
                    out.push_event(to.broker, e);
                }
                match rejected {
                    Some(c) => answer(Disposition::Rejected, Some(c.as_str())),
                    None => answer(Disposition::Created, None),
                }
            }
            Step::SameAs(_) => answer(Disposition::Repeated, None),
        });
    }
    (out, answers)
}

/// A command that failed on every allowed delivery: 500 to its caller, and
/// dead-lettered with the reason.
pub(super) fn failed(item: &Item, reason: &str, to: Routes<'_>) -> (Publications, Answer) {
    let mut out = Publications::default();
    let body = serde_json::to_string(&InternalErrorReply::default()).unwrap_or_default();
    out.replies
        .extend(reply_message(item, Reply { status: 500, body }));
    out.dead_letters.push((
        dead_letter_message(item, POISON_CODE, reason, to),
        item.tag(),
    ));
    let answer = Answer {
        status: 500,
        disposition: Disposition::Failed,
        code: Some(POISON_CODE),
    };
    (out, answer)
}

/// The reply, to the command's reply queue; `None` for fire-and-forget.
fn reply_message(item: &Item, reply: Reply) -> Option<Outgoing> {
    let reply_to = item.reply_to.as_ref()?;
    Some(Outgoing {
        exchange: String::new(),
        routing_key: reply_to.clone(),
        properties: properties::reply(
            item.reply_type(),
            item.correlation.as_deref(),
            reply.status,
            Some(&item.trace_headers.traceparent),
            item.trace_headers.tracestate.as_deref(),
        ),
        body: reply.body.into_bytes(),
    })
}

fn reply_to_refusal(item: &Item, broker: &BrokerSettings) -> String {
    format!(
        "reply_to \"{}\" is not a reply queue: replies go only to amq.rabbitmq.reply-to or a queue named with one of the prefixes {:?}",
        item.refused_reply_to.as_deref().unwrap_or_default().escape_default(),
        broker.reply_to_prefixes
    )
}

/// The command as it came, with why it is here. An oversized body is cut to
/// the limit (a header gives its size), so a caller cannot make the dead-letter
/// queue hold more than the command queue would process.
fn dead_letter_message(item: &Item, code: &str, reason: &str, to: Routes<'_>) -> Outgoing {
    let data = &item.delivery.body;
    let keep = data.len().min(contract::command::MAX_BODY_BYTES);
    let original_size = (keep < data.len()).then_some(data.len());
    Outgoing {
        exchange: to.broker.dead_letter_exchange.clone(),
        routing_key: item.delivery.routing_key.clone(),
        properties: properties::dead_letter(
            &item.delivery.properties,
            code,
            reason,
            original_size,
            to.frame_max,
        ),
        body: data[..keep].to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{HeaderValue, Properties};
    use crate::pipeline::plan::tests::loaded;
    use crate::pipeline::ports::Delivery;
    use crate::records::{Loaded, OutboxEvent, StoredReply};
    use clap::Parser;

    #[derive(Parser)]
    struct BrokerArgs {
        #[command(flatten)]
        broker: BrokerSettings,
    }

    fn broker() -> BrokerSettings {
        BrokerArgs::parse_from([
            "test",
            "--events-exchange=events",
            "--email-exchange=email",
            "--dead-letter-exchange=dlx",
            "--reply-to-prefixes=amq.gen-",
        ])
        .broker
    }

    const TICKET: &str = r#"{"accessTokenId":"admin","profileId":"p1"}"#;

    /// A delivery of `command` with `body`; `reply_to` `None` is fire-and-forget.
    fn item(tag: u64, command: &str, body: &str, reply_to: Option<&str>) -> Item {
        let mut properties = Properties::default()
            .with_type(command.into())
            .with_message_id(format!("m{tag}").into());
        if let Some(r) = reply_to {
            properties = properties.with_reply_to(r.into());
        }
        let d = Delivery {
            tag,
            routing_key: command.into(),
            properties,
            body: body.as_bytes().to_vec(),
        };
        Item::new(
            d,
            &broker().reply_to_prefixes,
            &tracing::Span::none(),
            || [7; 24],
        )
    }

    fn plan(items: &[Item], l: Loaded) -> Plan {
        let inputs: Vec<_> = items.iter().map(Item::input).collect();
        let params = crate::pipeline::plan::Params {
            now_ms: 1_700_000_000_000,
            default_verification_url: "https://example.com/verify",
            email_cooldown_secs: 0,
        };
        crate::pipeline::plan::plan(&inputs, l, params, uuid::Uuid::new_v4)
    }

    fn header<'a>(o: &'a Outgoing, name: &str) -> Option<&'a HeaderValue> {
        o.properties.headers().as_ref()?.inner().get(name)
    }

    fn text(v: Option<&HeaderValue>) -> String {
        match v {
            Some(HeaderValue::LongString(s)) => s.to_string(),
            other => panic!("not a long string: {other:?}"),
        }
    }

    fn routes(broker: &BrokerSettings) -> Routes<'_> {
        Routes {
            broker,
            frame_max: 131_072,
        }
    }

    #[test]
    fn every_delivery_is_answered_in_order_by_its_step() {
        let items = [
            item(1, "create-ticket", TICKET, Some("amq.rabbitmq.reply-to")),
            item(2, "create-ticket", TICKET, Some("billing.inbox")),
            item(3, "create-ticket", "{", Some("amq.gen-abc")),
            item(4, "create-ticket", TICKET, None),
        ];
        let plan = plan(&items, loaded());
        let broker = broker();
        let (out, answers) = batch(&items, &plan, routes(&broker));

        let seen: Vec<(Disposition, u16)> =
            answers.iter().map(|a| (a.disposition, a.status)).collect();
        assert_eq!(
            seen,
            [
                (Disposition::Created, 200),
                (Disposition::ReplyToRefused, 0),
                (Disposition::Malformed, 400),
                (Disposition::Created, 200),
            ]
        );
        // Replies only to reply queues, never to the refused one or fire-and-forget.
        let to: Vec<&str> = out.replies.iter().map(|r| r.routing_key.as_str()).collect();
        assert_eq!(to, ["amq.rabbitmq.reply-to", "amq.gen-abc"]);
        assert!(out.replies.iter().all(|r| r.exchange.is_empty()));
        let first = &out.replies[0];
        assert_eq!(
            first.properties.kind().as_ref().map(|k| k.as_str()),
            Some("create-ticket.reply")
        );
        assert_eq!(
            first
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str()),
            Some("m1"),
            "correlation_id, else message_id"
        );
        assert_eq!(
            header(first, properties::STATUS_HEADER),
            Some(&HeaderValue::LongInt(200))
        );
        // Dead letters: the refused reply_to and the malformed command, each
        // with its delivery's tag, its code and the command's own body.
        let dead: Vec<(u64, String)> = out
            .dead_letters
            .iter()
            .map(|(o, tag)| (*tag, text(header(o, properties::ERROR_CODE_HEADER))))
            .collect();
        assert_eq!(
            dead,
            [
                (2, REPLY_TO_NOT_ALLOWED.to_string()),
                (3, "PARAM_DESERIALIZATION_ERROR".to_string())
            ]
        );
        assert!(out.dead_letters.iter().all(|(o, _)| o.exchange == "dlx"));
        assert_eq!(out.dead_letters[0].0.body, TICKET.as_bytes());
        // The two created tickets' events, with their own command's trace.
        let events: Vec<(&str, &str)> = out
            .events
            .iter()
            .map(|(o, _)| (o.exchange.as_str(), o.routing_key.as_str()))
            .collect();
        assert_eq!(
            events,
            [("events", "ticket.created"), ("events", "ticket.created")]
        );
    }

    #[test]
    fn a_repeat_sends_its_stored_reply_and_its_pending_events_once() {
        let pending = OutboxEvent {
            event_id: uuid::Uuid::from_u128(7),
            message_id: Some("m1".into()),
            routing_key: "email.requested".into(),
            body: "{}".into(),
            traceparent: None,
            tracestate: None,
        };
        let items = [
            item(1, "create-ticket", TICKET, Some("amq.gen-a")),
            item(1, "create-ticket", TICKET, Some("amq.gen-a")),
        ];
        let mut l = loaded();
        let fingerprint = items[0].decoded.as_ref().unwrap().fingerprint();
        l.processed.insert(
            "m1".into(),
            StoredReply {
                command: "create-ticket".into(),
                reply: Reply {
                    status: 200,
                    body: "stored".into(),
                },
                fingerprint: Some(fingerprint.to_vec()),
                pending_events: vec![pending],
            },
        );
        let plan = plan(&items, l);
        let broker = broker();
        let (out, answers) = batch(&items, &plan, routes(&broker));
        assert!(answers
            .iter()
            .all(|a| a.disposition == Disposition::Repeated && a.status == 200));
        assert!(out.replies.iter().all(|r| r.body == b"stored"));
        assert_eq!(out.events.len(), 1, "the batch's second copy adds none");
        assert_eq!(
            out.events[0].0.exchange, "email",
            "email goes to its own exchange"
        );
        assert_eq!(out.events[0].1, uuid::Uuid::from_u128(7));
    }

    #[test]
    fn a_failed_command_gets_500_and_a_dead_letter_with_the_reason() {
        let it = item(9, "create-ticket", TICKET, Some("amq.gen-a"));
        let broker = broker();
        let (out, answer) = failed(&it, "failed on 20 deliveries: boom", routes(&broker));
        assert_eq!(
            answer,
            Answer {
                status: 500,
                disposition: Disposition::Failed,
                code: Some(POISON_CODE)
            }
        );
        assert_eq!(out.replies.len(), 1);
        assert_eq!(
            header(&out.replies[0], properties::STATUS_HEADER),
            Some(&HeaderValue::LongInt(500))
        );
        let (dead, tag) = &out.dead_letters[0];
        assert_eq!(*tag, 9);
        assert_eq!(
            text(header(dead, properties::ERROR_REASON_HEADER)),
            "failed on 20 deliveries: boom"
        );
    }
}
