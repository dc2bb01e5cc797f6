//! What the worker sends: reply bodies (CONTRACT §4) and event bodies (§5).
//! Field order in these structs is the order on the wire.

use super::error::ErrorCode;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// 200 reply to `create-ticket`; also the body of `ticket.created`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TicketCreated {
    pub tenant: String,
    pub profile_id: String,
    /// Epoch milliseconds.
    pub last_request_time: i64,
    pub id: Uuid,
}

/// 200 reply to `create-verification-token`; also the body of `verification-token.created`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VerificationTokenCreated {
    pub tenant: String,
    pub profile_id: String,
    /// Epoch milliseconds.
    pub timestamp: i64,
    pub id: Uuid,
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
}

/// Routing keys on the events exchange.
pub mod routing {
    pub const TICKET_CREATED: &str = "ticket.created";
    pub const VERIFICATION_TOKEN_CREATED: &str = "verification-token.created";
    pub const EMAIL_REQUESTED: &str = "email.requested";
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
