//! What the worker sends: reply bodies (CONTRACT §4) and event bodies (§5).
//! Field order in these structs is the order on the wire.

use super::error::ErrorCode;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// 200 reply to `create-ticket`. The ticket ID is a session credential: it goes
/// to the caller only, never onto an event (see [`TicketCreatedEvent`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TicketCreated {
    pub tenant: String,
    pub profile_id: String,
    /// Epoch milliseconds.
    pub last_request_time: i64,
    pub id: Uuid,
}

/// 200 reply to `create-verification-token`. The token ID verifies an account or
/// resets a password: it goes to the caller and the email dispatcher only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VerificationTokenCreated {
    pub tenant: String,
    pub profile_id: String,
    /// Epoch milliseconds.
    pub timestamp: i64,
    pub id: Uuid,
}

/// `ticket.created` on the events exchange: the ticket announced by the SHA-256
/// of its ID, so a reader of events can match it to a reply it holds but cannot
/// use it (CONTRACT §5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TicketCreatedEvent {
    pub tenant: String,
    pub profile_id: String,
    /// Epoch milliseconds.
    pub last_request_time: i64,
    /// Lowercase hex SHA-256 of the ticket ID's canonical (hyphenated, lowercase) text.
    #[schemars(regex(pattern = "^[0-9a-f]{64}$"))]
    pub id_sha256: String,
}

/// `verification-token.created` on the events exchange, without the token ID
/// (CONTRACT §5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VerificationTokenCreatedEvent {
    pub tenant: String,
    pub profile_id: String,
    /// Epoch milliseconds.
    pub timestamp: i64,
    /// Lowercase hex SHA-256 of the token ID's canonical (hyphenated, lowercase) text.
    #[schemars(regex(pattern = "^[0-9a-f]{64}$"))]
    pub id_sha256: String,
}

impl From<&TicketCreated> for TicketCreatedEvent {
    fn from(t: &TicketCreated) -> Self {
        TicketCreatedEvent {
            tenant: t.tenant.clone(),
            profile_id: t.profile_id.clone(),
            last_request_time: t.last_request_time,
            id_sha256: id_sha256(t.id),
        }
    }
}

impl From<&VerificationTokenCreated> for VerificationTokenCreatedEvent {
    fn from(t: &VerificationTokenCreated) -> Self {
        VerificationTokenCreatedEvent {
            tenant: t.tenant.clone(),
            profile_id: t.profile_id.clone(),
            timestamp: t.timestamp,
            id_sha256: id_sha256(t.id),
        }
    }
}

/// `idSha256` of an event: the lowercase hex SHA-256 of the ID's canonical text,
/// the form a holder of the reply has (`7f036af3-1ab9-…`).
pub fn id_sha256(id: Uuid) -> String {
    use sha2::{Digest, Sha256};
    hex(&Sha256::digest(id.hyphenated().to_string().as_bytes()))
}

/// Lowercase hex, two digits a byte.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Body of every 4xx reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ErrorReply {
    pub error_code: ErrorCode,
    pub message: String,
}

/// Body of a 500 reply, sent only after transient failures exhausted their retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InternalErrorReply {
    pub message: String,
}

impl Default for InternalErrorReply {
    fn default() -> Self {
        InternalErrorReply {
            message: "Internal server error".into(),
        }
    }
}

/// `email.requested`: what the email dispatcher needs to send one email.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EmailRequested {
    /// Deterministic per token: equals the AMQP `message_id`, so dispatchers can dedupe.
    pub id: Uuid,
    pub tenant: String,
    pub profile_id: String,
    pub to: String,
    /// `verify-account` or `reset-password`.
    pub template: String,
    pub token_id: Uuid,
    pub verification_link: String,
    /// Epoch milliseconds (the token's timestamp).
    pub timestamp: i64,
    /// The profile's `locale` attribute (a language tag such as `fr-CA`),
    /// when it has one: the dispatcher picks its templates by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
}

/// Routing keys of events: `email.requested` on the email exchange, the others
/// on the events exchange.
pub mod routing {
    pub const TICKET_CREATED: &str = "ticket.created";
    pub const VERIFICATION_TOKEN_CREATED: &str = "verification-token.created";
    pub const EMAIL_REQUESTED: &str = "email.requested";
}

/// The events there are. Adding one is a variant here, and the compiler then
/// asks for its routing key, its exchange and how its body is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::EnumIter)]
pub enum EventKind {
    TicketCreated,
    VerificationTokenCreated,
    EmailRequested,
}

impl EventKind {
    pub fn routing_key(self) -> &'static str {
        match self {
            EventKind::TicketCreated => routing::TICKET_CREATED,
            EventKind::VerificationTokenCreated => routing::VERIFICATION_TOKEN_CREATED,
            EventKind::EmailRequested => routing::EMAIL_REQUESTED,
        }
    }

    /// The event a routing key names; `None` for one this version does not know.
    pub fn parse(routing_key: &str) -> Option<EventKind> {
        use strum::IntoEnumIterator;
        EventKind::iter().find(|k| k.routing_key() == routing_key)
    }

    /// Whether it goes to the email exchange, which only the email dispatcher
    /// reads (it carries the verification link), rather than to the events
    /// exchange, which any subscriber may read.
    pub fn is_email(self) -> bool {
        match self {
            EventKind::EmailRequested => true,
            EventKind::TicketCreated | EventKind::VerificationTokenCreated => false,
        }
    }
}

/// Whether an event goes to the email exchange ([`EventKind::is_email`]).
pub fn is_email(routing_key: &str) -> bool {
    EventKind::parse(routing_key).is_some_and(EventKind::is_email)
}

/// An event's body as it may leave on its exchange. Bodies this version renders
/// are returned as they are. An earlier version wrote `ticket.created` and
/// `verification-token.created` with the whole `id` into the outbox; such a
/// row, whoever wrote it, is re-shaped here to carry `idSha256` instead
/// (CONTRACT §5, upgrading). `None`: a body on the events exchange that is
/// neither shape, withheld rather than risk a secret on the bus.
pub fn publishable_event_body<'a>(
    routing_key: &str,
    body: &'a str,
) -> Option<std::borrow::Cow<'a, str>> {
    use std::borrow::Cow;
    fn reshape<Old, New>(body: &str) -> Option<Cow<'_, str>>
    where
        Old: serde::de::DeserializeOwned,
        New: Serialize + serde::de::DeserializeOwned + for<'o> From<&'o Old>,
    {
        if serde_json::from_str::<New>(body).is_ok() {
            return Some(Cow::Borrowed(body));
        }
        let old: Old = serde_json::from_str(body).ok()?;
        serde_json::to_string(&New::from(&old)).ok().map(Cow::Owned)
    }
    // An unknown event is not published where anyone reads.
    match EventKind::parse(routing_key)? {
        EventKind::TicketCreated => reshape::<TicketCreated, TicketCreatedEvent>(body),
        EventKind::VerificationTokenCreated => {
            reshape::<VerificationTokenCreated, VerificationTokenCreatedEvent>(body)
        }
        EventKind::EmailRequested => Some(Cow::Borrowed(body)),
    }
}

/// Namespace for the deterministic (UUID v5) message ids of events and replies.
const EVENT_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2d5e_8a3b_4c7d_9e0f_1a2b_3c4d_5e6f);

/// The event's `message_id`: the same for every publication of the same event,
/// derived from the created entity's id, so redeliveries and the outbox relay
/// produce ids a subscriber can dedupe on.
pub fn event_message_id(routing_key: &str, entity_id: Uuid) -> Uuid {
    let mut name = Vec::with_capacity(routing_key.len() + 17);
    name.extend_from_slice(routing_key.as_bytes());
    name.push(b'/');
    name.extend_from_slice(entity_id.as_bytes());
    Uuid::new_v5(&EVENT_NAMESPACE, &name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticket_reply_has_contract_field_order() {
        let t = TicketCreated {
            tenant: "default".into(),
            profile_id: "5925a68def86951f895cf497".into(),
            last_request_time: 1495660441508,
            id: "7f036af3-1ab9-4791-b615-ecaece3f0010".parse().unwrap(),
        };
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#"{"tenant":"default","profileId":"5925a68def86951f895cf497","lastRequestTime":1495660441508,"id":"7f036af3-1ab9-4791-b615-ecaece3f0010"}"#
        );
    }

    #[test]
    fn public_events_carry_the_ids_hash_not_the_id() {
        let id: Uuid = "7f036af3-1ab9-4791-b615-ecaece3f0010".parse().unwrap();
        let t = TicketCreated {
            tenant: "default".into(),
            profile_id: "5925a68def86951f895cf497".into(),
            last_request_time: 1495660441508,
            id,
        };
        let event = serde_json::to_string(&TicketCreatedEvent::from(&t)).unwrap();
        // echo -n 7f036af3-1ab9-4791-b615-ecaece3f0010 | sha256sum
        assert_eq!(
            event,
            r#"{"tenant":"default","profileId":"5925a68def86951f895cf497","lastRequestTime":1495660441508,"idSha256":"3198614c36cbeb7f819204b251b466c19b7230547acd8a6c37b9afd358718d07"}"#
        );
        assert!(!event.contains("7f036af3"));
    }

    #[test]
    fn old_outbox_bodies_are_reshaped_and_new_ones_kept() {
        let id: Uuid = "055d58c4-fabb-44da-96eb-261e24e1d0c9".parse().unwrap();
        let old = serde_json::to_string(&VerificationTokenCreated {
            tenant: "sample-tenant".into(),
            profile_id: "p".into(),
            timestamp: 1,
            id,
        })
        .unwrap();
        let new = publishable_event_body(routing::VERIFICATION_TOKEN_CREATED, &old).unwrap();
        assert_eq!(
            new,
            format!(
                r#"{{"tenant":"sample-tenant","profileId":"p","timestamp":1,"idSha256":"{}"}}"#,
                id_sha256(id)
            )
        );
        assert!(matches!(
            publishable_event_body(routing::VERIFICATION_TOKEN_CREATED, &new),
            Some(std::borrow::Cow::Borrowed(_))
        ));
        let old_ticket =
            format!(r#"{{"tenant":"t","profileId":"p","lastRequestTime":2,"id":"{id}"}}"#);
        let reshaped = publishable_event_body(routing::TICKET_CREATED, &old_ticket).unwrap();
        assert!(!reshaped.contains(&id.to_string()), "{reshaped}");
        // Neither shape, or an unknown key: withheld, never published as it is.
        for (key, body) in [
            (routing::TICKET_CREATED, format!(r#"{{"secret":"{id}"}}"#)),
            (routing::TICKET_CREATED, "not json".to_string()),
            ("ticket.deleted", "{}".to_string()),
        ] {
            assert_eq!(publishable_event_body(key, &body), None, "{key} {body}");
        }
        let email = r#"{"tokenId":"x"}"#;
        assert_eq!(
            publishable_event_body(routing::EMAIL_REQUESTED, email).as_deref(),
            Some(email),
            "the dispatcher's event is its own business"
        );
    }

    #[test]
    fn error_reply_shape() {
        let e = ErrorReply {
            error_code: ErrorCode::NoSuchProfile,
            message: "No profile found for ID \"x\"".into(),
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"errorCode":"NO_SUCH_PROFILE","message":"No profile found for ID \"x\""}"#
        );
        assert_eq!(
            serde_json::to_string(&InternalErrorReply::default()).unwrap(),
            r#"{"message":"Internal server error"}"#
        );
    }

    #[test]
    fn event_ids_are_deterministic_and_distinct_per_kind() {
        let id = Uuid::new_v4();
        assert_eq!(
            event_message_id("email.requested", id),
            event_message_id("email.requested", id)
        );
        assert_ne!(
            event_message_id("email.requested", id),
            event_message_id("verification-token.created", id)
        );
        assert_ne!(
            event_message_id("email.requested", id),
            event_message_id("email.requested", Uuid::new_v4())
        );
    }
}
