//! The batch statements' rows (migration 6's composite types), bound by field
//! name: a field the SQL type does not have, or one of another type, fails the
//! statement's preparation instead of writing into the wrong column.

use postgres_types::{FromSql, ToSql};
use serde_json::Value;
use std::time::SystemTime;
use uuid::Uuid;

#[derive(Debug, ToSql)]
#[postgres(name = "profile_worker_record_row")]
pub(super) struct RecordRow<'a> {
    pub n: i32,
    pub message_id: Option<&'a str>,
    pub command: &'a str,
    pub status: i16,
    pub reply: &'a str,
    pub fingerprint: &'a [u8],
}

#[derive(Debug, ToSql)]
#[postgres(name = "profile_worker_ticket_row")]
pub(super) struct TicketRow<'a> {
    pub n: i32,
    pub id: Uuid,
    pub tenant: &'a str,
    pub profile_id: &'a str,
    pub last_request_time: SystemTime,
}

#[derive(Debug, ToSql)]
#[postgres(name = "profile_worker_verification_token_row")]
pub(super) struct VerificationTokenRow<'a> {
    pub n: i32,
    pub id: Uuid,
    pub tenant: &'a str,
    pub profile_id: &'a str,
    pub timestamp: SystemTime,
}

#[derive(Debug, ToSql)]
#[postgres(name = "profile_worker_outbox_row")]
pub(super) struct OutboxRow<'a> {
    pub n: i32,
    pub event_id: Uuid,
    pub routing_key: &'a str,
    pub body: &'a str,
    pub traceparent: Option<&'a str>,
    pub tracestate: Option<&'a str>,
}

#[derive(Debug, ToSql)]
#[postgres(name = "profile_worker_token_version")]
pub(super) struct TokenVersionRow {
    pub id_sha256: Vec<u8>,
    pub xmin: i64,
}

#[derive(Debug, ToSql)]
#[postgres(name = "profile_worker_profile_version")]
pub(super) struct ProfileVersionRow<'a> {
    pub id: &'a str,
    pub xmin: i64,
    pub tenant: &'a str,
    pub tenant_xmin: Option<i64>,
}

#[derive(Debug, ToSql)]
#[postgres(name = "profile_worker_email_claim_row")]
pub(super) struct EmailClaimRow<'a> {
    pub n: i32,
    pub profile_id: &'a str,
    pub purpose: &'a str,
    pub requested_at: SystemTime,
}

#[derive(Debug, FromSql)]
#[postgres(name = "profile_worker_known_token")]
pub(super) struct LoadedToken {
    pub id_sha256: Vec<u8>,
    pub application: String,
    pub expires_ms: Option<i64>,
    pub tenant_permissions: Value,
    pub xmin: i64,
}

#[derive(Debug, FromSql)]
#[postgres(name = "profile_worker_known_profile")]
pub(super) struct LoadedProfile {
    pub id: String,
    pub tenant: String,
    pub email: String,
    pub enabled: bool,
    pub link_hosts: Option<Vec<String>>,
    pub xmin: i64,
    pub tenant_xmin: Option<i64>,
}

#[derive(Debug, FromSql)]
#[postgres(name = "profile_worker_loaded_reply")]
pub(super) struct LoadedReply {
    pub message_id: String,
    pub command: String,
    pub status: i16,
    pub reply: String,
    pub fingerprint: Option<Vec<u8>>,
}

#[derive(Debug, FromSql)]
#[postgres(name = "profile_worker_loaded_event")]
pub(super) struct LoadedEvent {
    pub message_id: String,
    pub event_id: Uuid,
    pub routing_key: String,
    pub body: String,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

#[derive(Debug, FromSql)]
#[postgres(name = "profile_worker_loaded_email")]
pub(super) struct LoadedEmail {
    pub profile_id: String,
    pub purpose: String,
    pub requested_ms: i64,
}
