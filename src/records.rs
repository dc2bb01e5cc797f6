//! What `plan` decides, `render` fills in and `store` reads and writes: the
//! records a batch loads and commits. Plain data, no I/O; it sits below all
//! three so that none of them owns the others' types.

use crate::contract::command::Fingerprint;
use crate::contract::Reply;
use crate::domain::{AccessToken, Profile, Tenant, Ticket, VerificationToken};
use std::collections::HashMap;
use uuid::Uuid;

/// The trace headers of a message the worker publishes (W3C Trace Context;
/// `trace` reads and writes them, the pure core only carries them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceHeaders {
    pub traceparent: String,
    pub tracestate: Option<String>,
}

/// An event as the outbox keeps it until the broker confirms it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    pub event_id: Uuid,
    /// The command's message_id, when it had one.
    pub message_id: Option<String>,
    pub routing_key: String,
    pub body: String,
    /// W3C traceparent of the worker's span for the command that caused it.
    pub traceparent: Option<String>,
    /// The W3C tracestate that goes with it, when the command had one.
    pub tracestate: Option<String>,
}

/// The reply stored for a message_id that was already processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredReply {
    pub command: String,
    pub reply: Reply,
    /// The fingerprint of the command it answered (`None` for records older than
    /// fingerprints, which match no repeat).
    pub fingerprint: Option<Vec<u8>>,
    /// Events of that command still unconfirmed (a crash between commit and publish).
    pub pending_events: Vec<OutboxEvent>,
}

/// Everything a batch's commands refer to, as loaded before planning.
#[derive(Debug, Default)]
pub struct Loaded {
    /// By access token ID (as the commands name them; the table has only hashes).
    pub tokens: HashMap<String, AccessToken>,
    pub profiles: HashMap<String, Profile>,
    /// The loaded profiles' tenants, by name.
    pub tenants: HashMap<String, Tenant>,
    pub processed: HashMap<String, StoredReply>,
    /// When the last email was requested, by (profile id, purpose), epoch ms.
    pub last_emails: HashMap<(String, String), i64>,
    /// The versions of the token and profile rows above, which the commit checks.
    pub versions: Versions,
}

/// Which version of each token and profile row a batch was decided on: the
/// commit writes nothing if one of them has changed since (migration 7).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Versions {
    /// By the SHA-256 of the access token's ID, as the table keys it and the
    /// commit checks it.
    pub tokens: HashMap<[u8; 32], i64>,
    /// By profile ID.
    pub profiles: HashMap<String, ProfileVersion>,
    /// The server these versions were read on (its start time, µs since the
    /// epoch): a transaction ID names a write on that server only, so the
    /// commit checks it is the same server. `None`: nothing was read.
    pub server: Option<i64>,
}

/// A profile row's version, and that of its tenant's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileVersion {
    pub xmin: i64,
    pub tenant: String,
    /// `None`: the tenant had no row (any link host allowed).
    pub tenant_xmin: Option<i64>,
}

/// A verification email's claim on its profile's and purpose's cooldown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailClaim {
    pub profile_id: String,
    pub purpose: &'static str,
    pub at_ms: i64,
}

/// What a command created besides its idempotency record: one row, in the
/// table of its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// A refusal that is remembered: the record alone.
    Nothing,
    Ticket(Ticket),
    VerificationToken(VerificationToken),
}

/// One command's effect, to be written atomically with all others of its batch.
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub message_id: Option<String>,
    pub command: &'static str,
    pub fingerprint: Fingerprint,
    pub reply: Reply,
    pub created: Created,
    /// Set when the email cooldown is on and this record requests an email.
    pub email: Option<EmailClaim>,
    pub events: Vec<OutboxEvent>,
}
