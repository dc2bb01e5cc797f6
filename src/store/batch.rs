//! The two round trips of a batch: one load of everything the batch needs, and one
//! transaction that writes every row, idempotency record and outbox event.

use super::{access_token_hash, to_system_time, OutboxEvent, Store, StoreError};
use crate::contract::Reply;
use crate::domain::{AccessToken, Profile, Tenant, TenantPermission, Ticket, VerificationToken};
use std::collections::{HashMap, HashSet};
use std::time::SystemTime;
use uuid::Uuid;

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
}

/// A verification email's claim on its profile's and purpose's cooldown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailClaim {
    pub profile_id: String,
    pub purpose: &'static str,
    pub at_ms: i64,
}

/// One command's effect, to be written atomically with all others of its batch.
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub message_id: Option<String>,
    pub command: &'static str,
    pub fingerprint: crate::contract::command::Fingerprint,
    pub reply: Reply,
    pub ticket: Option<Ticket>,
    pub token: Option<VerificationToken>,
    /// Set when the email cooldown is on and this record requests an email.
    pub email: Option<EmailClaim>,
    pub events: Vec<OutboxEvent>,
}

// Everything a batch needs to read, as one statement: one Bind/Execute/Sync and
// one reply to wait for. Pipelined as separate statements, each reply is its own
// wake-up of the connection task and the caller, which cost more than the
// lookups themselves (BENCHMARKS.md, "Where the time goes").
// Rows are told apart by `kind` (see `Kind`); the columns each kind uses:
//   1 access token:    key hex SHA-256 of the id, a application, n expiry (epoch
//                      ms), j tenant permissions
//   2 profile:         key id, a tenant, b email, flag enabled, hosts the
//                      tenant's link hosts
//   3 earlier reply:   key message_id, a command, b reply, n status, fp its
//                      fingerprint, and one of its still-unconfirmed outbox events
//                      (NULLs when it has none)
//   4 last email:      key profile id, a purpose, n when (epoch ms)
// Every lookup is `= ANY(...)` on a primary key: with sequential scans off (see
// `Store::connect`) an index scan, whatever the table's size and statistics and
// the batch's size. (A join against `unnest($1)` was planned as a hash join over
// a sequential scan of the whole table while the table was small.)
// The outbox side of an earlier reply is a lateral subquery fenced with
// `OFFSET 0`, an index lookup per reply; flattened into a join, the plan
// hash-joins the whole outbox, which is large exactly when the broker has been away.
const LOAD: &str = "SELECT 1::int2 AS kind, encode(t.id_sha256, 'hex') AS key, t.application AS a, \
       NULL::text AS b, (extract(epoch FROM t.expires_on) * 1000)::bigint AS n, NULL::bool AS flag, \
       t.tenant_permissions AS j, NULL::uuid AS event_id, NULL::text AS routing_key, \
       NULL::text AS body, NULL::text AS traceparent, NULL::timestamptz AS created_at, \
       NULL::text[] AS hosts, NULL::bytea AS fp, NULL::text AS tracestate \
     FROM access_tokens t WHERE t.id_sha256 = ANY($1) \
     UNION ALL \
     SELECT 2::int2, p.id, p.tenant, p.email, NULL, p.enabled, NULL, NULL, NULL, NULL, NULL, NULL, \
       tn.link_hosts, NULL, NULL \
     FROM profiles p LEFT JOIN tenants tn ON tn.name = p.tenant WHERE p.id = ANY($2) \
     UNION ALL \
     SELECT 3::int2, p.message_id, p.command, p.reply, p.status::bigint, NULL, NULL, \
       o.event_id, o.routing_key, o.body, o.traceparent, o.created_at, NULL, p.fingerprint, \
       o.tracestate \
     FROM processed_commands p LEFT JOIN LATERAL ( \
       SELECT event_id, routing_key, body, traceparent, tracestate, created_at FROM outbox \
       WHERE outbox.message_id = p.message_id OFFSET 0) o ON true \
     WHERE p.message_id = ANY($3) \
     UNION ALL \
     SELECT 4::int2, c.profile_id, c.purpose, NULL, \
       (extract(epoch FROM c.requested_at) * 1000)::bigint, NULL, NULL, NULL, NULL, NULL, NULL, \
       NULL, NULL, NULL, NULL \
     FROM email_cooldowns c WHERE c.profile_id = ANY($2)";

/// What a row of [`LOAD`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    AccessToken = 1,
    Profile = 2,
    EarlierReply = 3,
    LastEmail = 4,
}

impl Kind {
    fn of(row: &tokio_postgres::Row) -> Option<Kind> {
        match row.get::<_, i16>(0) {
            1 => Some(Kind::AccessToken),
            2 => Some(Kind::Profile),
            3 => Some(Kind::EarlierReply),
            4 => Some(Kind::LastEmail),
            _ => None,
        }
    }
}

/// The whole batch as one statement, so one round trip and one implicit
/// transaction: idempotency records first; rows, outbox events and email claims
/// only for the message_ids this statement won (a message_id another transaction
/// committed first writes nothing here and is answered from the stored record);
/// and the outbox rows of events already confirmed are deleted on the way.
/// An email claim takes its (profile, purpose) row only if the last email there
/// is a whole cooldown old; a claim that finds it taken (another batch committed
/// one in the meantime) aborts the statement as a serialization failure, so the
/// batch is retried and decided again against what was committed.
const COMMIT: &str = "WITH won AS ( \
       INSERT INTO processed_commands (message_id, command, status, reply, fingerprint) \
       SELECT * FROM unnest($1::text[], $2::text[], $3::int2[], $4::text[], $21::bytea[]) \
       ON CONFLICT (message_id) DO NOTHING RETURNING message_id), \
     forgotten AS (DELETE FROM outbox WHERE event_id = ANY($5::uuid[])), \
     t AS (INSERT INTO tickets (id, tenant, profile_id, last_request_time) \
       SELECT x.id, x.tenant, x.profile_id, x.at \
       FROM unnest($6::uuid[], $7::text[], $8::text[], $9::timestamptz[], $10::text[]) \
         AS x(id, tenant, profile_id, at, mid) \
       WHERE x.mid IS NULL OR x.mid IN (SELECT message_id FROM won)), \
     v AS (INSERT INTO verification_tokens (id, tenant, profile_id, \"timestamp\") \
       SELECT x.id, x.tenant, x.profile_id, x.at \
       FROM unnest($11::uuid[], $12::text[], $13::text[], $14::timestamptz[], $15::text[]) \
         AS x(id, tenant, profile_id, at, mid) \
       WHERE x.mid IS NULL OR x.mid IN (SELECT message_id FROM won)), \
     o AS (INSERT INTO outbox (event_id, message_id, routing_key, body, traceparent, tracestate) \
       SELECT x.id, x.mid, x.key, x.body, x.trace, x.state \
       FROM unnest($16::uuid[], $17::text[], $18::text[], $19::text[], $20::text[], $27::text[]) \
         AS x(id, mid, key, body, trace, state) \
       WHERE x.mid IS NULL OR x.mid IN (SELECT message_id FROM won)), \
     wanted AS (SELECT x.profile_id, x.purpose, x.at \
       FROM unnest($22::text[], $23::text[], $24::timestamptz[], $25::text[]) \
         AS x(profile_id, purpose, at, mid) \
       WHERE x.mid IS NULL OR x.mid IN (SELECT message_id FROM won)), \
     claimed AS (INSERT INTO email_cooldowns AS c (profile_id, purpose, requested_at) \
       SELECT * FROM wanted \
       ON CONFLICT (profile_id, purpose) DO UPDATE SET requested_at = EXCLUDED.requested_at \
       WHERE c.requested_at <= EXCLUDED.requested_at - make_interval(secs => $26::float8) \
       RETURNING 1) \
     SELECT message_id FROM won \
     UNION ALL \
     SELECT NULL WHERE CASE WHEN (SELECT count(*) FROM claimed) <> (SELECT count(*) FROM wanted) \
       THEN profile_worker_cooldown_taken() ELSE false END";

/// One batch's connection, checked out once for the load and the commit together.
pub struct Batch<'a> {
    store: &'a Store,
    /// `None` only once dropped.
    client: Option<deadpool_postgres::Object>,
    /// The server answered that it is read-only (a standby, or a primary set
    /// read-only): the connection leaves the pool instead of being handed out
    /// again, so the next one is opened afresh (and, with
    /// `target_session_attrs=read-write`, to whichever server is now primary).
    read_only: std::sync::atomic::AtomicBool,
}

impl Store {
    pub async fn batch(&self) -> Result<Batch<'_>, StoreError> {
        Ok(Batch {
            store: self,
            client: Some(self.client("connect").await?),
            read_only: Default::default(),
        })
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if self.read_only.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(client) = self.client.take() {
                tracing::info!("the database answered read-only; opening a new connection");
                drop(deadpool_postgres::Object::take(client));
            }
        }
    }
}

impl Batch<'_> {
    fn client(&self) -> &deadpool_postgres::Object {
        self.client
            .as_ref()
            .expect("a batch's connection until it is dropped")
    }

    /// Notes a read-only answer (see [`Batch::read_only`]) and passes the error on.
    fn failed(&self, e: StoreError) -> StoreError {
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
        let mut loaded = Loaded::default();
        if token_ids.is_empty() && profile_ids.is_empty() && message_ids.is_empty() {
            return Ok(loaded);
        }
        let client = self.client();
        let err = |e| self.failed(StoreError::pg("load", e));
        // The table holds hashes only (CONTRACT §7): look up by the hash, keep
        // the rows under the IDs the commands name.
        let digests: Vec<[u8; 32]> = token_ids.iter().map(|id| access_token_hash(id)).collect();
        let by_hash: HashMap<String, &str> = digests
            .iter()
            .zip(token_ids)
            .map(|(h, id)| (hex(h), *id))
            .collect();
        let hashes: Vec<&[u8]> = digests.iter().map(|h| h.as_slice()).collect();
        let stmt = client.prepare_cached(LOAD).await.map_err(err)?;
        let rows = client
            .query(&stmt, &[&hashes, &profile_ids, &message_ids])
            .await
            .map_err(err)?;

        let mut pending: Vec<(SystemTime, OutboxEvent)> = Vec::new();
        for row in rows {
            match Kind::of(&row) {
                Some(Kind::AccessToken) => {
                    let hash: String = row.get(1);
                    let Some(id) = by_hash.get(&hash).map(|id| id.to_string()) else {
                        continue;
                    };
                    let permissions: serde_json::Value = row.get(6);
                    let token = AccessToken {
                        application: row.get(2),
                        expires_on: row.get(4),
                        tenant_permissions: parse_permissions(&permissions).map_err(|m| {
                            StoreError::permanent(
                                "load",
                                format!(
                                    "access token {}: bad tenant_permissions: {m}",
                                    crate::telemetry::token_prefix(&id)
                                ),
                            )
                        })?,
                    };
                    loaded.tokens.insert(id, token);
                }
                Some(Kind::Profile) => {
                    let profile = Profile {
                        id: row.get(1),
                        tenant: row.get(2),
                        email: row.get(3),
                        enabled: row.get(5),
                    };
                    let link_hosts: Option<Vec<String>> = row.get(12);
                    loaded.tenants.insert(
                        profile.tenant.clone(),
                        Tenant {
                            link_hosts: link_hosts.unwrap_or_default(),
                        },
                    );
                    loaded.profiles.insert(profile.id.clone(), profile);
                }
                Some(Kind::EarlierReply) => {
                    let message_id: String = row.get(1);
                    loaded
                        .processed
                        .entry(message_id.clone())
                        .or_insert_with(|| StoredReply {
                            command: row.get(2),
                            reply: Reply {
                                status: row.get::<_, i64>(4) as u16,
                                body: row.get(3),
                            },
                            fingerprint: row.get(13),
                            pending_events: vec![],
                        });
                    if let Some(event_id) = row.get::<_, Option<Uuid>>(7) {
                        let event = OutboxEvent {
                            event_id,
                            message_id: Some(message_id),
                            routing_key: row.get(8),
                            body: row.get(9),
                            traceparent: row.get(10),
                            tracestate: row.get(14),
                        };
                        pending.push((row.get(11), event));
                    }
                }
                Some(Kind::LastEmail) => {
                    loaded
                        .last_emails
                        .insert((row.get(1), row.get(2)), row.get(4));
                }
                None => {
                    return Err(StoreError::permanent(
                        "load",
                        "a row of unknown kind".to_string(),
                    ))
                }
            }
        }
        if !pending.is_empty() {
            // Confirmed but not yet deleted: not pending. Only read when there
            // are earlier events, which most batches have none of.
            let forgotten: HashSet<Uuid> = self.store.forgotten().iter().copied().collect();
            pending.retain(|(_, e)| !forgotten.contains(&e.event_id));
        }
        // Pending events keep the order they were written in: re-published in it.
        pending.sort_by(|(a, x), (b, y)| (a, x.event_id).cmp(&(b, y.event_id)));
        for (_, event) in pending {
            let mid = event.message_id.as_deref().unwrap_or_default();
            if let Some(stored) = loaded.processed.get_mut(mid) {
                stored.pending_events.push(event);
            }
        }
        Ok(loaded)
    }

    /// How this connection plans [`Batch::load`]'s statement (`EXPLAIN` text),
    /// to see that every lookup in it takes its index.
    pub async fn lookup_plan(&self) -> Result<String, StoreError> {
        let keys: &[&str] = &["k"];
        let hashes: &[&[u8]] = &[&[0u8; 32]];
        let rows = self
            .client()
            .query(&format!("EXPLAIN {LOAD}"), &[&hashes, &keys, &keys])
            .await
            .map_err(|e| StoreError::pg("explain", e))?;
        let lines: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        Ok(lines.join("\n"))
    }

    /// Writes the batch in one transaction. A record whose message_id another
    /// transaction committed first (two workers, or a publisher retry racing the
    /// original) writes nothing; its index is returned so the caller can answer
    /// with the stored reply instead.
    /// `email_cooldown` is how old the last email of a record's email claim must be.
    pub async fn commit(
        &mut self,
        records: &[NewRecord],
        email_cooldown: std::time::Duration,
    ) -> Result<HashSet<usize>, StoreError> {
        let forget = std::mem::take(&mut *self.store.forgotten());
        let result = self
            .commit_forgetting(records, &forget, email_cooldown)
            .await;
        if result.is_err() {
            self.store.forget_outbox(forget);
        }
        result
    }

    async fn commit_forgetting(
        &mut self,
        records: &[NewRecord],
        forget: &[Uuid],
        email_cooldown: std::time::Duration,
    ) -> Result<HashSet<usize>, StoreError> {
        let ids: Vec<Option<&str>> = records.iter().map(|r| r.message_id.as_deref()).collect();
        let keyed: Vec<usize> = (0..records.len()).filter(|&i| ids[i].is_some()).collect();
        let p_ids: Vec<&str> = keyed.iter().filter_map(|&i| ids[i]).collect();
        let p_commands: Vec<&str> = keyed.iter().map(|&i| records[i].command).collect();
        let p_statuses: Vec<i16> = keyed
            .iter()
            .map(|&i| records[i].reply.status as i16)
            .collect();
        let p_replies: Vec<&str> = keyed
            .iter()
            .map(|&i| records[i].reply.body.as_str())
            .collect();
        let p_fingerprints: Vec<&[u8]> = keyed
            .iter()
            .map(|&i| records[i].fingerprint.as_slice())
            .collect();
        let claims: Vec<(&EmailClaim, Option<&str>)> = records
            .iter()
            .filter_map(|r| Some((r.email.as_ref()?, r.message_id.as_deref())))
            .collect();
        let c_profiles: Vec<&str> = claims.iter().map(|(c, _)| c.profile_id.as_str()).collect();
        let c_purposes: Vec<&str> = claims.iter().map(|(c, _)| c.purpose).collect();
        let c_times: Vec<SystemTime> = claims
            .iter()
            .map(|(c, _)| to_system_time(c.at_ms))
            .collect();
        let c_mids: Vec<Option<&str>> = claims.iter().map(|(_, m)| *m).collect();

        let tickets: Vec<(&Ticket, Option<&str>)> = records
            .iter()
            .filter_map(|r| Some((r.ticket.as_ref()?, r.message_id.as_deref())))
            .collect();
        let tokens: Vec<(&VerificationToken, Option<&str>)> = records
            .iter()
            .filter_map(|r| Some((r.token.as_ref()?, r.message_id.as_deref())))
            .collect();
        let events: Vec<&OutboxEvent> = records.iter().flat_map(|r| r.events.iter()).collect();

        let t_ids: Vec<Uuid> = tickets.iter().map(|(t, _)| t.id).collect();
        let t_tenants: Vec<&str> = tickets.iter().map(|(t, _)| t.tenant.as_str()).collect();
        let t_profiles: Vec<&str> = tickets.iter().map(|(t, _)| t.profile_id.as_str()).collect();
        let t_times: Vec<SystemTime> = tickets
            .iter()
            .map(|(t, _)| to_system_time(t.last_request_time))
            .collect();
        let t_mids: Vec<Option<&str>> = tickets.iter().map(|(_, m)| *m).collect();
        let v_ids: Vec<Uuid> = tokens.iter().map(|(t, _)| t.id).collect();
        let v_tenants: Vec<&str> = tokens.iter().map(|(t, _)| t.tenant.as_str()).collect();
        let v_profiles: Vec<&str> = tokens.iter().map(|(t, _)| t.profile_id.as_str()).collect();
        let v_times: Vec<SystemTime> = tokens
            .iter()
            .map(|(t, _)| to_system_time(t.timestamp))
            .collect();
        let v_mids: Vec<Option<&str>> = tokens.iter().map(|(_, m)| *m).collect();
        let e_ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
        let e_mids: Vec<Option<&str>> = events.iter().map(|e| e.message_id.as_deref()).collect();
        let e_keys: Vec<&str> = events.iter().map(|e| e.routing_key.as_str()).collect();
        let e_bodies: Vec<&str> = events.iter().map(|e| e.body.as_str()).collect();
        let e_traces: Vec<Option<&str>> = events.iter().map(|e| e.traceparent.as_deref()).collect();
        let e_states: Vec<Option<&str>> = events.iter().map(|e| e.tracestate.as_deref()).collect();

        let err = |e| self.failed(StoreError::pg("commit", e));
        let stmt = self.client().prepare_cached(COMMIT).await.map_err(err)?;
        let won: HashSet<String> = self
            .client()
            .query(
                &stmt,
                &[
                    &p_ids,
                    &p_commands,
                    &p_statuses,
                    &p_replies,
                    &forget,
                    &t_ids,
                    &t_tenants,
                    &t_profiles,
                    &t_times,
                    &t_mids,
                    &v_ids,
                    &v_tenants,
                    &v_profiles,
                    &v_times,
                    &v_mids,
                    &e_ids,
                    &e_mids,
                    &e_keys,
                    &e_bodies,
                    &e_traces,
                    &p_fingerprints,
                    &c_profiles,
                    &c_purposes,
                    &c_times,
                    &c_mids,
                    &email_cooldown.as_secs_f64(),
                    &e_states,
                ],
            )
            .await
            .map_err(err)?
            .into_iter()
            .filter_map(|r| r.get(0))
            .collect();
        Ok(keyed
            .into_iter()
            .filter(|&i| !won.contains(ids[i].unwrap_or_default()))
            .collect())
    }

    /// Replies stored by other transactions, for records [`Batch::commit`] reported lost.
    pub async fn stored_replies(
        &self,
        message_ids: &[&str],
    ) -> Result<HashMap<String, StoredReply>, StoreError> {
        Ok(self.load(&[], &[], message_ids).await?.processed)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
