//! An in-memory PostgreSQL, as far as the pipeline relies on it: the load's
//! rows with their versions, and the commit's one transaction (sql/commit.sql):
//! a unique message_id (a record another transaction committed first is
//! reported lost and writes nothing), the email cooldown claim (taken: a
//! serialization failure), the versions of the rows a batch was decided on
//! (changed: rows changed), the outbox. A call may fail before it does
//! anything, and a commit may be applied while its result is lost.

use super::sim::{Sim, State};
use profile_worker::contract::Reply;
use profile_worker::domain::{AccessToken, Profile, Tenant, Ticket, VerificationToken};
use profile_worker::pipeline::ports::{self, OutboxRows};
use profile_worker::records::{
    Created, Loaded, NewRecord, OutboxEvent, ProfileVersion, StoredReply, Versions,
};
use profile_worker::store::{access_token_hash, StoreError};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;
use uuid::Uuid;

/// A stored idempotency record.
#[derive(Debug, Clone)]
pub struct Processed {
    pub command: String,
    pub reply: Reply,
    pub fingerprint: Vec<u8>,
}

#[derive(Default)]
pub struct StoreState {
    pub tokens: BTreeMap<[u8; 32], (String, AccessToken, i64)>,
    pub profiles: BTreeMap<String, (Profile, i64)>,
    pub tenants: BTreeMap<String, (Tenant, i64)>,
    pub processed: BTreeMap<String, Processed>,
    pub tickets: Vec<(Ticket, Option<String>)>,
    pub verification_tokens: Vec<(VerificationToken, Option<String>)>,
    pub cooldowns: BTreeMap<(String, String), i64>,
    /// Every claim taken: (profile, purpose, at ms).
    pub claims: Vec<(String, String, i64)>,
    /// Rows, with when they were written or leased (ms).
    pub outbox: BTreeMap<Uuid, (OutboxEvent, i64)>,
    /// Every event ever written, for the invariants.
    pub written: BTreeMap<Uuid, OutboxEvent>,
    /// Revoked tokens (IDs) and disabled profiles, from when.
    pub revoked: BTreeSet<String>,
    pub disabled: BTreeSet<String>,
    /// The command each message_id carries, as the callers published it:
    /// (command, token, profile).
    pub commands: BTreeMap<String, (&'static str, String, String)>,
    xid: i64,
    server: i64,
}

impl StoreState {
    pub fn next_xid(&mut self) -> i64 {
        self.xid += 1;
        self.xid
    }

    pub fn with_server(mut self, server: i64) -> Self {
        self.server = server;
        self
    }
}

#[derive(Clone)]
pub struct SimStore(pub Sim);

pub struct SimBatch {
    sim: Sim,
}

fn down(s: &mut State, what: &'static str) -> Result<(), StoreError> {
    let p = s.faults.store_down;
    if s.chance(p) {
        s.note(format!("store down at {what}"));
        return Err(StoreError::transient(what, "connection lost (simulated)"));
    }
    Ok(())
}

impl ports::Store for SimStore {
    type Batch<'a> = SimBatch;

    async fn batch(&self) -> Result<SimBatch, StoreError> {
        self.0.pause().await;
        down(&mut self.0.lock(), "connect")?;
        Ok(SimBatch {
            sim: self.0.clone(),
        })
    }
}

impl ports::StoreBatch for SimBatch {
    async fn load(
        &self,
        token_ids: &[&str],
        profile_ids: &[&str],
        message_ids: &[&str],
    ) -> Result<Loaded, StoreError> {
        self.sim.pause().await;
        let mut s = self.sim.lock();
        down(&mut s, "load")?;
        let st = &s.store;
        let mut loaded = Loaded::default();
        loaded.versions.server = Some(st.server);
        for id in token_ids {
            let hash = access_token_hash(id);
            if let Some((_, token, xmin)) = st.tokens.get(&hash) {
                loaded.tokens.insert(id.to_string(), token.clone());
                loaded.versions.tokens.insert(hash, *xmin);
            }
        }
        for id in profile_ids {
            let Some((p, xmin)) = st.profiles.get(*id) else {
                continue;
            };
            let tenant = st.tenants.get(&p.tenant);
            loaded.versions.profiles.insert(
                p.id.clone(),
                ProfileVersion {
                    xmin: *xmin,
                    tenant: p.tenant.clone(),
                    tenant_xmin: tenant.map(|(_, x)| *x),
                },
            );
            loaded.tenants.insert(
                p.tenant.clone(),
                tenant.map_or_else(Tenant::default, |(t, _)| t.clone()),
            );
            loaded.profiles.insert(p.id.clone(), p.clone());
        }
        for id in message_ids {
            let Some(p) = st.processed.get(*id) else {
                continue;
            };
            let pending_events = st
                .outbox
                .values()
                .filter(|(e, _)| e.message_id.as_deref() == Some(*id))
                .map(|(e, _)| e.clone())
                .collect();
            loaded.processed.insert(
                id.to_string(),
                StoredReply {
                    command: p.command.clone(),
                    reply: p.reply.clone(),
                    fingerprint: Some(p.fingerprint.clone()),
                    pending_events,
                },
            );
        }
        for ((profile, purpose), at) in &st.cooldowns {
            if profile_ids.contains(&profile.as_str()) {
                loaded
                    .last_emails
                    .insert((profile.clone(), purpose.clone()), *at);
            }
        }
        Ok(loaded)
    }

    async fn commit(
        &mut self,
        records: &[NewRecord],
        versions: &Versions,
        confirmed: &[Uuid],
        email_cooldown: Duration,
    ) -> Result<HashSet<usize>, StoreError> {
        self.sim.pause().await;
        let mut s = self.sim.lock();
        down(&mut s, "commit")?;
        let lost = apply(&mut s, records, versions, confirmed, email_cooldown)?;
        let p = s.faults.commit_result_lost;
        if s.chance(p) {
            s.note("commit applied, its result lost".into());
            return Err(StoreError::transient(
                "commit",
                "connection lost after the commit (simulated)",
            ));
        }
        Ok(lost)
    }
}

/// sql/commit.sql, in memory: every check first, then every write.
fn apply(
    s: &mut State,
    records: &[NewRecord],
    versions: &Versions,
    confirmed: &[Uuid],
    cooldown: Duration,
) -> Result<HashSet<usize>, StoreError> {
    let st = &s.store;
    let changed = |what: String| Err(StoreError::rows_changed("commit", what));
    if versions.server.is_some_and(|v| v != st.server) {
        return changed("another server".into());
    }
    let mut token_versions: Vec<_> = versions.tokens.iter().collect();
    token_versions.sort();
    for (hash, xmin) in token_versions {
        if st.tokens.get(hash).map(|(_, _, x)| x) != Some(xmin) {
            return changed("a token changed".into());
        }
    }
    let mut profile_versions: Vec<_> = versions.profiles.iter().collect();
    profile_versions.sort_by(|a, b| a.0.cmp(b.0));
    for (id, v) in profile_versions {
        if st.profiles.get(id).map(|(_, x)| *x) != Some(v.xmin) {
            return changed(format!("profile {id} changed"));
        }
        let tenant = st.tenants.get(&v.tenant).map(|(_, x)| *x);
        if tenant != v.tenant_xmin {
            return changed(format!("tenant {} changed", v.tenant));
        }
    }
    // Which records this transaction wins (a message_id committed before: lost).
    let mut lost = HashSet::new();
    let mut seen = HashSet::new();
    for (n, r) in records.iter().enumerate() {
        if let Some(id) = &r.message_id {
            if st.processed.contains_key(id) || !seen.insert(id.clone()) {
                lost.insert(n);
            }
        }
    }
    let now = s.now_ms();
    let window = cooldown.as_millis() as i64;
    for (n, r) in records.iter().enumerate() {
        if lost.contains(&n) {
            continue;
        }
        if let Some(c) = &r.email {
            let key = (c.profile_id.clone(), c.purpose.to_string());
            if let Some(last) = st.cooldowns.get(&key) {
                if *last > c.at_ms - window {
                    return Err(StoreError::serialization_failure(
                        "commit",
                        "the email cooldown was claimed",
                    ));
                }
            }
        }
    }
    // Every check passed: write.
    for id in confirmed {
        s.store.outbox.remove(id);
    }
    for (n, r) in records.iter().enumerate() {
        if lost.contains(&n) {
            continue;
        }
        if let Some(id) = &r.message_id {
            s.store.processed.insert(
                id.clone(),
                Processed {
                    command: r.command.to_string(),
                    reply: r.reply.clone(),
                    fingerprint: r.fingerprint.to_vec(),
                },
            );
            if r.reply.status == 200 {
                check_authority(s, id);
            }
        }
        match &r.created {
            Created::Ticket(t) => s.store.tickets.push((t.clone(), r.message_id.clone())),
            Created::VerificationToken(t) => s
                .store
                .verification_tokens
                .push((t.clone(), r.message_id.clone())),
            Created::Nothing => {}
        }
        for e in &r.events {
            let mut e = e.clone();
            e.message_id = r.message_id.clone();
            s.store.written.insert(e.event_id, e.clone());
            s.store.outbox.insert(e.event_id, (e, now));
        }
        if let Some(c) = &r.email {
            s.store
                .cooldowns
                .insert((c.profile_id.clone(), c.purpose.to_string()), c.at_ms);
            s.store
                .claims
                .push((c.profile_id.clone(), c.purpose.to_string(), c.at_ms));
        }
    }
    s.note(format!(
        "commit: {} records, {} lost",
        records.len(),
        lost.len()
    ));
    Ok(lost)
}

/// A command created now must rest on a token that is valid now, and a ticket
/// on a profile that is enabled now: a revocation or a disable counts from the
/// next batch. (A disabled profile may still be sent a verification email.)
fn check_authority(s: &mut State, message_id: &str) {
    let Some((command, token, profile)) = s.store.commands.get(message_id).cloned() else {
        return;
    };
    if s.store.revoked.contains(&token) {
        s.violation(format!(
            "{message_id} created with token {token}, revoked before its commit"
        ));
    }
    if command == "create-ticket" && s.store.disabled.contains(&profile) {
        s.violation(format!(
            "{message_id} created for profile {profile}, disabled before its commit"
        ));
    }
}

impl OutboxRows for SimStore {
    async fn pending(&self) -> Result<u64, StoreError> {
        Ok(self.0.lock().store.outbox.len() as u64)
    }

    async fn lease_stale(
        &self,
        grace: Duration,
        limit: i64,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        self.0.pause().await;
        let mut s = self.0.lock();
        down(&mut s, "outbox")?;
        let now = s.now_ms();
        let cutoff = now - grace.as_millis() as i64;
        let mut stale: Vec<(i64, Uuid)> = s
            .store
            .outbox
            .iter()
            .filter(|(_, (_, at))| *at < cutoff)
            .map(|(id, (_, at))| (*at, *id))
            .collect();
        stale.sort();
        stale.truncate(limit.max(0) as usize);
        let mut out = Vec::new();
        for (_, id) in stale {
            let row = s.store.outbox.get_mut(&id).expect("listed");
            row.1 = now;
            out.push(row.0.clone());
        }
        Ok(out)
    }

    async fn delete(&self, event_ids: &[Uuid]) -> Result<u64, StoreError> {
        self.0.pause().await;
        let mut s = self.0.lock();
        down(&mut s, "outbox")?;
        let mut n = 0;
        for id in event_ids {
            n += u64::from(s.store.outbox.remove(id).is_some());
        }
        Ok(n)
    }
}
