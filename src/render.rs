//! Turns a domain outcome into what is stored and sent: the reply body with its
//! status, and the events with their deterministic ids. Pure.

use crate::contract::message::{event_message_id, routing};
use crate::contract::{
    EmailRequested, ErrorReply, Rejection, Reply, TicketCreated, TicketCreatedEvent,
    VerificationTokenCreated, VerificationTokenCreatedEvent,
};
use crate::domain::Outcome;
use crate::records::OutboxEvent;
use crate::records::TraceHeaders;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub reply: Reply,
    pub events: Vec<OutboxEvent>,
}

fn json<T: serde::Serialize>(v: &T) -> String {
    // These types contain only strings, integers and UUIDs: serialization cannot fail.
    serde_json::to_string(v).expect("reply types always serialize")
}

pub fn rejection(r: &Rejection) -> Reply {
    Reply {
        status: r.status(),
        body: json(&ErrorReply {
            error_code: r.code,
            message: r.message.clone(),
        }),
    }
}

/// `trace` is the worker's span for the command: its events carry it.
pub fn outcome(outcome: &Outcome, message_id: Option<&str>, trace: &TraceHeaders) -> Rendered {
    let event = |routing_key: &str, entity: uuid::Uuid, body: String| OutboxEvent {
        event_id: event_message_id(routing_key, entity),
        message_id: message_id.map(str::to_string),
        routing_key: routing_key.to_string(),
        body,
        traceparent: Some(trace.traceparent.clone()),
        tracestate: trace.tracestate.clone(),
    };
    match outcome {
        Outcome::Rejected(r) => Rendered {
            reply: rejection(r),
            events: vec![],
        },
        Outcome::TicketCreated(t) => {
            let reply = TicketCreated {
                tenant: t.tenant.clone(),
                profile_id: t.profile_id.clone(),
                last_request_time: t.last_request_time,
                id: t.id,
            };
            // The caller gets the ticket; the events exchange only its hash.
            let announced = json(&TicketCreatedEvent::from(&reply));
            Rendered {
                reply: Reply {
                    status: 200,
                    body: json(&reply),
                },
                events: vec![event(routing::TICKET_CREATED, t.id, announced)],
            }
        }
        Outcome::VerificationTokenCreated(t, email) => {
            let reply = VerificationTokenCreated {
                tenant: t.tenant.clone(),
                profile_id: t.profile_id.clone(),
                timestamp: t.timestamp,
                id: t.id,
            };
            let announced = json(&VerificationTokenCreatedEvent::from(&reply));
            let email_id = event_message_id(routing::EMAIL_REQUESTED, t.id);
            let email_body = json(&EmailRequested {
                id: email_id,
                tenant: t.tenant.clone(),
                profile_id: t.profile_id.clone(),
                to: email.to.clone(),
                template: email.purpose.as_str().to_string(),
                token_id: t.id,
                verification_link: email.verification_link.clone(),
                timestamp: t.timestamp,
                locale: email.locale.clone(),
            });
            Rendered {
                reply: Reply {
                    status: 200,
                    body: json(&reply),
                },
                events: vec![
                    event(routing::VERIFICATION_TOKEN_CREATED, t.id, announced),
                    event(routing::EMAIL_REQUESTED, t.id, email_body),
                ],
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Purpose;
    use crate::domain::{EmailRequest, VerificationToken};

    #[test]
    fn verification_token_renders_reply_and_two_events() {
        let id: uuid::Uuid = "055d58c4-fabb-44da-96eb-261e24e1d0c9".parse().unwrap();
        let o = Outcome::VerificationTokenCreated(
            VerificationToken {
                id,
                tenant: "sample-tenant".into(),
                profile_id: "592715d4d4c650e226b03b62".into(),
                timestamp: 1495746285875,
            },
            EmailRequest {
                to: "john.doe@example.com".into(),
                purpose: Purpose::VerifyAccount,
                verification_link: format!("https://example.com/verify?tokenId={id}"),
                locale: Some("fr-CA".into()),
            },
        );
        let trace = TraceHeaders {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: None,
        };
        let r = outcome(&o, Some("m1"), &trace);
        assert_eq!(r.reply.status, 200);
        assert_eq!(
            r.reply.body,
            r#"{"tenant":"sample-tenant","profileId":"592715d4d4c650e226b03b62","timestamp":1495746285875,"id":"055d58c4-fabb-44da-96eb-261e24e1d0c9"}"#
        );
        assert_eq!(r.events.len(), 2);
        assert_eq!(r.events[0].routing_key, "verification-token.created");
        assert_eq!(
            r.events[0].body,
            format!(
                r#"{{"tenant":"sample-tenant","profileId":"592715d4d4c650e226b03b62","timestamp":1495746285875,"idSha256":"{}"}}"#,
                crate::contract::message::id_sha256(id)
            ),
            "the public event carries the token's hash, not the token"
        );
        assert!(!r.events[0].body.contains(&id.to_string()));
        let email: serde_json::Value = serde_json::from_str(&r.events[1].body).unwrap();
        assert_eq!(
            email["id"],
            r.events[1].event_id.to_string(),
            "body id equals message_id"
        );
        assert_eq!(email["template"], "verify-account");
        assert_eq!(email["to"], "john.doe@example.com");
        assert_eq!(
            email["locale"], "fr-CA",
            "the profile's locale, for the templates"
        );
        assert!(r
            .events
            .iter()
            .all(|e| e.message_id.as_deref() == Some("m1")));
        assert!(
            r.events
                .iter()
                .all(|e| e.traceparent.as_deref() == Some(trace.traceparent.as_str())),
            "events carry the command's trace"
        );
        assert_eq!(
            outcome(&o, Some("m1"), &trace),
            r,
            "rendering is deterministic"
        );
    }
}
