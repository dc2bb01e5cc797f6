//! A batch's round trips: one load of everything the batch needs
//! (`sql/load.sql`; skipped when its rows are known, `pipeline/known.rs`), and
//! one statement that writes every row, idempotency record and outbox event in
//! one transaction if the rows it was decided on are unchanged (`sql/commit.sql`).

use super::rows::{
    EmailClaimRow, LoadedEmail, LoadedEvent, LoadedProfile, LoadedReply, LoadedToken, OutboxRow,
    ProfileVersionRow, RecordRow, TicketRow, TokenVersionRow, VerificationTokenRow,
};
use super::{access_token_hash, to_system_time, Store, StoreError};
use crate::contract::Reply;
use crate::domain::{AccessToken, Profile, Tenant, TenantPermission};
use crate::records::{
    Created, Loaded, NewRecord, OutboxEvent, ProfileVersion, StoredReply, Versions,
};
use std::collections::{HashMap, HashSet};

/// Everything a batch reads, in one statement (see the file's comments).
const LOAD: &str = include_str!("sql/load.sql");
/// Everything a batch writes, in one statement and transaction.
const COMMIT: &str = include_str!("sql/commit.sql");

/// One batch's connection, checked out once for the load and the commit together.
pub struct Batch {
    /// `None` only once dropped.
    client: Option<deadpool_postgres::Object>,
    /// The server answered that it is read-only (a standby, or a primary set
    /// read-only): the connection leaves the pool instead of being handed out
    /// again, so the next one is opened afresh (and, with
    /// `target_session_attrs=read-write`, to whichever server is now primary).
    read_only: std::sync::atomic::AtomicBool,
}

impl Store {
    /// A batch's connection, for its load and its commit.
    pub async fn batch(&self) -> Result<Batch, StoreError> {
        Ok(Batch {
            client: Some(self.client("connect").await?),
            read_only: Default::default(),
        })
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if self.read_only.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(client) = self.client.take() {
                tracing::info!("the database answered read-only; opening a new connection");
                drop(deadpool_postgres::Object::take(client));
            }
        }
    }
}

impl Batch {
    fn client(&self) -> &deadpool_postgres::Object {
        self.client
            .as_ref()
            .expect("a batch's connection until it is dropped")
    }

    /// Notes a read-only answer (see [`Batch::read_only`]) and passes the error on.
    fn noting_read_only(&self, e: StoreError) -> StoreError {
        if e.is_read_only() {
            self.read_only
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        e
    }

    /// Loads the tokens, profiles and earlier replies a batch refers to, in one
    /// statement.
    pub async fn load(
        &self,
        token_ids: &[&str],
        profile_ids: &[&str],
        message_ids: &[&str],
    ) -> Result<Loaded, StoreError> {
        if token_ids.is_empty() && profile_ids.is_empty() && message_ids.is_empty() {
            return Ok(Loaded::default());
        }
        let client = self.client();
        let err = |e| self.noting_read_only(StoreError::pg("load", e));
        // The table holds hashes only (CONTRACT §7): look up by the hash, keep
        // the rows under the IDs the commands name.
        let digests: Vec<[u8; 32]> = token_ids.iter().map(|id| access_token_hash(id)).collect();
        let hashes: Vec<&[u8]> = digests.iter().map(|h| h.as_slice()).collect();
        let stmt = client.prepare_cached(LOAD).await.map_err(err)?;
        let row = client
            .query_one(&stmt, &[&hashes, &profile_ids, &message_ids])
            .await
            .map_err(err)?;
        let tokens: Vec<LoadedToken> = row.try_get("tokens").map_err(err)?;
        let profiles: Vec<LoadedProfile> = row.try_get("profiles").map_err(err)?;
        let replies: Vec<LoadedReply> = row.try_get("replies").map_err(err)?;
        let pending: Vec<LoadedEvent> = row.try_get("pending_events").map_err(err)?;
        let last_emails: Vec<LoadedEmail> = row.try_get("last_emails").map_err(err)?;
        let server: i64 = row.try_get("server").map_err(err)?;
        let locales: Option<serde_json::Value> = row.try_get("locales").map_err(err)?;
        let locale_of = |id: &str| {
            locales
                .as_ref()
                .and_then(|l| l.get(id))
                .and_then(serde_json::Value::as_str)
                .and_then(crate::domain::locale)
        };

        let by_hash: HashMap<&[u8], (&str, &[u8; 32])> = digests
            .iter()
            .map(|d| d.as_slice())
            .zip(token_ids.iter().copied().zip(&digests))
            .collect();
        let mut loaded = Loaded::default();
        loaded.versions.server = Some(server);
        for t in tokens {
            let Some(&(id, hash)) = by_hash.get(t.id_sha256.as_slice()) else {
                continue;
            };
            let permissions = parse_permissions(&t.tenant_permissions).map_err(|m| {
                StoreError::permanent(
                    "load",
                    format!(
                        "access token {}: bad tenant_permissions: {m}",
                        crate::telemetry::token_prefix(id)
                    ),
                )
            })?;
            loaded.versions.tokens.insert(*hash, t.xmin);
            loaded.tokens.insert(
                id.to_string(),
                AccessToken {
                    application: t.application,
                    expires_on: t.expires_ms,
                    tenant_permissions: permissions,
                },
            );
        }
        for p in profiles {
            loaded.versions.profiles.insert(
                p.id.clone(),
                ProfileVersion {
                    xmin: p.xmin,
                    tenant: p.tenant.clone(),
                    tenant_xmin: p.tenant_xmin,
                },
            );
            loaded.tenants.insert(
                p.tenant.clone(),
                Tenant {
                    link_hosts: p.link_hosts.unwrap_or_default(),
                },
            );
            loaded.profiles.insert(
                p.id.clone(),
                Profile {
                    locale: locale_of(&p.id),
                    id: p.id,
                    tenant: p.tenant,
                    email: p.email,
                    enabled: p.enabled,
                },
            );
        }
        for r in replies {
            loaded.processed.insert(
                r.message_id,
                StoredReply {
                    command: r.command,
                    reply: Reply {
                        status: r.status as u16,
                        body: r.reply,
                    },
                    fingerprint: r.fingerprint,
                    pending_events: vec![],
                },
            );
        }
        // Confirmed ones included: the pipeline knows which those are.
        for e in pending {
            if let Some(stored) = loaded.processed.get_mut(&e.message_id) {
                stored.pending_events.push(OutboxEvent {
                    event_id: e.event_id,
                    message_id: Some(e.message_id),
                    routing_key: e.routing_key,
                    body: e.body,
                    traceparent: e.traceparent,
                    tracestate: e.tracestate,
                });
            }
        }
        for e in last_emails {
            loaded
                .last_emails
                .insert((e.profile_id, e.purpose), e.requested_ms);
        }
        Ok(loaded)
    }

    /// Writes the batch in one transaction, deleting the rows of the
    /// `confirmed` events on the way, if every token and profile
    /// row is still the version in `versions` (else a [`StoreError`] for which
    /// [`StoreError::is_rows_changed`] holds, and nothing is written). A record whose message_id
    /// another transaction committed first (two workers, or a publisher retry
    /// racing the original) writes nothing; its index is returned so the caller
    /// can answer with the stored reply instead.
    /// `email_cooldown` is how old the last email of a record's email claim must be.
    pub async fn commit(
        &mut self,
        records: &[NewRecord],
        versions: &Versions,
        confirmed: &[uuid::Uuid],
        email_cooldown: std::time::Duration,
    ) -> Result<HashSet<usize>, StoreError> {
        let rows = Rows::of(records);
        let (token_versions, profile_versions) = version_rows(versions);
        let err = |e| self.noting_read_only(StoreError::pg("commit", e));
        let stmt = self.client().prepare_cached(COMMIT).await.map_err(err)?;
        let kept: HashSet<usize> = self
            .client()
            .query(
                &stmt,
                &[
                    &rows.records,
                    &confirmed,
                    &rows.tickets,
                    &rows.tokens,
                    &rows.events,
                    &rows.claims,
                    &email_cooldown.as_secs_f64(),
                    &token_versions,
                    &profile_versions,
                    &versions.server,
                ],
            )
            .await
            .map_err(err)?
            .into_iter()
            .filter_map(|r| r.get::<_, Option<i32>>("n"))
            .map(|n| n as usize)
            .collect();
        Ok((0..records.len()).filter(|n| !kept.contains(n)).collect())
    }
}

/// The versions a batch was decided on, as [`COMMIT`]'s checks.
fn version_rows(v: &Versions) -> (Vec<TokenVersionRow>, Vec<ProfileVersionRow<'_>>) {
    let tokens = v
        .tokens
        .iter()
        .map(|(hash, &xmin)| TokenVersionRow {
            id_sha256: hash.to_vec(),
            xmin,
        })
        .collect();
    let profiles = v
        .profiles
        .iter()
        .map(|(id, p)| ProfileVersionRow {
            id,
            xmin: p.xmin,
            tenant: &p.tenant,
            tenant_xmin: p.tenant_xmin,
        })
        .collect();
    (tokens, profiles)
}

/// A batch's records as [`COMMIT`]'s row-sets, each row tied to its record by
/// the record's index.
struct Rows<'a> {
    records: Vec<RecordRow<'a>>,
    tickets: Vec<TicketRow<'a>>,
    tokens: Vec<VerificationTokenRow<'a>>,
    events: Vec<OutboxRow<'a>>,
    claims: Vec<EmailClaimRow<'a>>,
}

impl<'a> Rows<'a> {
    fn of(records: &'a [NewRecord]) -> Self {
        let mut rows = Rows {
            records: Vec::with_capacity(records.len()),
            tickets: Vec::new(),
            tokens: Vec::new(),
            events: Vec::new(),
            claims: Vec::new(),
        };
        for (n, r) in records.iter().enumerate() {
            let n = n as i32;
            rows.records.push(RecordRow {
                n,
                message_id: r.message_id.as_deref(),
                command: r.command,
                status: r.reply.status as i16,
                reply: &r.reply.body,
                fingerprint: &r.fingerprint,
            });
            match &r.created {
                Created::Ticket(t) => rows.tickets.push(TicketRow {
                    n,
                    id: t.id,
                    tenant: &t.tenant,
                    profile_id: &t.profile_id,
                    last_request_time: to_system_time(t.last_request_time),
                }),
                Created::VerificationToken(t) => rows.tokens.push(VerificationTokenRow {
                    n,
                    id: t.id,
                    tenant: &t.tenant,
                    profile_id: &t.profile_id,
                    timestamp: to_system_time(t.timestamp),
                }),
                Created::Nothing => {}
            }
            rows.events.extend(r.events.iter().map(|e| OutboxRow {
                n,
                event_id: e.event_id,
                routing_key: &e.routing_key,
                body: &e.body,
                traceparent: e.traceparent.as_deref(),
                tracestate: e.tracestate.as_deref(),
            }));
            if let Some(c) = &r.email {
                rows.claims.push(EmailClaimRow {
                    n,
                    profile_id: &c.profile_id,
                    purpose: c.purpose,
                    requested_at: to_system_time(c.at_ms),
                });
            }
        }
        rows
    }
}

fn parse_permissions(v: &serde_json::Value) -> Result<Vec<TenantPermission>, serde_json::Error> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Raw {
        tenant: String,
        #[serde(default)]
        allowed_actions: Vec<String>,
    }
    let raw: Vec<Raw> = serde::Deserialize::deserialize(v)?;
    Ok(raw
        .into_iter()
        .map(|r| TenantPermission {
            tenant: r.tenant,
            allowed_actions: r.allowed_actions,
        })
        .collect())
}
