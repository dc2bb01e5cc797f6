//! Access tokens and profiles read by earlier batches, each with the version
//! of its row, so that a batch whose commands all name rows read before is
//! decided on those and skips its load: one round trip and one transaction
//! instead of two.
//!
//! It is safe because the commit checks every version a batch was decided on
//! and writes nothing if one has changed (`store/sql/commit.sql`, migration
//! 7): a token revoked or a profile disabled after it was read here fails the
//! next commit that relies on it, and that batch is loaded and decided again.
//! So only decisions the commit writes may rest on what is known here; the
//! pipeline loads a batch whose plan rejects a command (a rejection writes
//! nothing, so nothing would check it).
//!
//! A profile is kept with its last email per purpose, as loaded (all of them:
//! the load reads every purpose of the profile) and as this worker's commits
//! claim them since. Another worker's claim is not seen here; the commit's
//! cooldown check is (`claimed` in commit.sql): it aborts, and the batch is
//! loaded and decided again like one decided on a changed row.
//!
//! Only rows that exist are kept, and at most `capacity` of each kind, so a
//! caller naming made-up IDs fills nothing. A token is kept under the SHA-256
//! of its ID, as the table keeps it (CONTRACT §7): the bearer secret itself
//! stays no longer than the batch that carried it. A row is kept at most [`MAX_AGE`]:
//! the version is a transaction ID, which wraps around after 2^32 transactions,
//! and a minute is far too short for that.
//!
//! A version means something only on the server that wrote it: after a
//! failover to an asynchronous standby, or a restore, another server may have
//! handed the same transaction ID to another write. So every load says which
//! server it read (its start time), the rows are kept for that server only,
//! and a load from another drops them all; the commit checks the server too.

use super::plan::Keys;
use crate::domain::{AccessToken, Profile, Tenant};
use crate::records::{EmailClaim, Loaded, ProfileVersion};
use crate::store::access_token_hash;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a row read once may decide batches without being read again.
pub const MAX_AGE: Duration = Duration::from_secs(60);

/// Tokio's clock, which a simulation's paused runtime drives.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// What the worker's batches have read, shared by its consumers.
#[derive(Clone)]
pub struct SharedKnown(Arc<Mutex<Known>>);

impl SharedKnown {
    /// `capacity` rows of each kind at most; 0 keeps nothing (every batch is loaded).
    pub fn new(capacity: usize) -> Self {
        SharedKnown(Arc::new(Mutex::new(Known::new(capacity))))
    }

    fn with<T>(&self, f: impl FnOnce(&mut Known) -> T) -> T {
        // A panic while holding the lock left maps that are merely incomplete.
        let mut known = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut known)
    }

    pub fn recall(&self, keys: &Keys<'_>) -> Option<Loaded> {
        self.with(|k| k.recall(keys, now()))
    }

    pub fn learn(&self, loaded: &Loaded) {
        self.with(|k| k.learn(loaded, now()))
    }

    pub fn forget(&self, keys: &Keys<'_>) {
        self.with(|k| k.forget(keys))
    }

    pub fn note_emails<'c>(&self, claims: impl IntoIterator<Item = &'c EmailClaim>) {
        self.with(|k| k.note_emails(claims))
    }
}

/// A profile as known: the row, its tenant's, and its last emails.
struct KnownProfile {
    profile: Profile,
    tenant: Tenant,
    /// When the last email was requested, by purpose (epoch ms).
    last_emails: HashMap<String, i64>,
}

struct Entry<T, V> {
    row: T,
    version: V,
    read: Instant,
}

/// The rows themselves, without the lock; `now` is given so tests control time.
pub struct Known {
    /// By the SHA-256 of the token's ID.
    tokens: HashMap<[u8; 32], Entry<AccessToken, i64>>,
    profiles: HashMap<String, Entry<KnownProfile, ProfileVersion>>,
    /// The server every row here was read on ([`Versions::server`]).
    server: Option<i64>,
    capacity: usize,
}

impl Known {
    pub fn new(capacity: usize) -> Self {
        Known {
            tokens: HashMap::new(),
            profiles: HashMap::new(),
            server: None,
            capacity,
        }
    }

    /// Everything `keys` names, with versions, if every token and profile is
    /// known and young enough; else `None` (the batch is loaded). Known only
    /// as rows that exist: a batch naming an unknown ID is always loaded.
    pub fn recall(&self, keys: &Keys<'_>, now: Instant) -> Option<Loaded> {
        if self.capacity == 0 {
            return None;
        }
        let fresh = |read: Instant| now.saturating_duration_since(read) < MAX_AGE;
        let mut loaded = Loaded::default();
        loaded.versions.server = self.server;
        for &id in &keys.access_token_ids {
            let hash = access_token_hash(id);
            let e = self.tokens.get(&hash).filter(|e| fresh(e.read))?;
            loaded.tokens.insert(id.to_string(), e.row.clone());
            loaded.versions.tokens.insert(hash, e.version);
        }
        for &id in &keys.profile_ids {
            let e = self.profiles.get(id).filter(|e| fresh(e.read))?;
            let known = &e.row;
            loaded
                .tenants
                .insert(known.profile.tenant.clone(), known.tenant.clone());
            loaded
                .profiles
                .insert(id.to_string(), known.profile.clone());
            for (purpose, &at) in &known.last_emails {
                loaded
                    .last_emails
                    .insert((id.to_string(), purpose.clone()), at);
            }
            loaded
                .versions
                .profiles
                .insert(id.to_string(), e.version.clone());
        }
        Some(loaded)
    }

    /// Keeps the tokens and profiles a load found, as read `now`. When a kind
    /// is full it starts again empty: simpler than eviction, and a full map
    /// means the traffic names more rows than it keeps anyway.
    pub fn learn(&mut self, loaded: &Loaded, now: Instant) {
        if self.capacity == 0 {
            return;
        }
        if loaded.versions.server.is_some() && loaded.versions.server != self.server {
            // Another server (or this one restarted): nothing read before
            // can be checked there.
            self.tokens.clear();
            self.profiles.clear();
            self.server = loaded.versions.server;
        }
        for (id, token) in &loaded.tokens {
            let key = access_token_hash(id);
            let Some(&version) = loaded.versions.tokens.get(&key) else {
                continue;
            };
            if self.tokens.len() >= self.capacity && !self.tokens.contains_key(&key) {
                self.tokens.clear();
            }
            self.tokens.insert(
                key,
                Entry {
                    row: token.clone(),
                    version,
                    read: now,
                },
            );
        }
        // The load read every purpose of each profile it returned.
        let mut emails: HashMap<&str, HashMap<String, i64>> = HashMap::new();
        for ((profile, purpose), &at) in &loaded.last_emails {
            emails
                .entry(profile.as_str())
                .or_default()
                .insert(purpose.clone(), at);
        }
        for (id, profile) in &loaded.profiles {
            let Some(version) = loaded.versions.profiles.get(id) else {
                continue;
            };
            let tenant = loaded
                .tenants
                .get(&profile.tenant)
                .cloned()
                .unwrap_or_default();
            let last_emails = emails.remove(id.as_str()).unwrap_or_default();
            if self.profiles.len() >= self.capacity && !self.profiles.contains_key(id) {
                self.profiles.clear();
            }
            self.profiles.insert(
                id.clone(),
                Entry {
                    row: KnownProfile {
                        profile: profile.clone(),
                        tenant,
                        last_emails,
                    },
                    version: version.clone(),
                    read: now,
                },
            );
        }
    }

    /// Drops what `keys` names: a commit found one of them changed (which one
    /// it does not say), or failed otherwise.
    pub fn forget(&mut self, keys: &Keys<'_>) {
        for id in &keys.access_token_ids {
            self.tokens.remove(&access_token_hash(id));
        }
        for id in &keys.profile_ids {
            self.profiles.remove(*id);
        }
    }

    /// Emails this worker's commit just claimed: the next batch for the same
    /// profile and purpose sees them, as it would after a load.
    pub fn note_emails<'c>(&mut self, claims: impl IntoIterator<Item = &'c EmailClaim>) {
        for c in claims {
            if let Some(e) = self.profiles.get_mut(&c.profile_id) {
                let last = e.row.last_emails.entry(c.purpose.to_string()).or_default();
                *last = (*last).max(c.at_ms);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        (self.tokens.len(), self.profiles.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::plan::tests::loaded as sample;

    /// The plan tests' sample rows, each with a version.
    /// The server the sample rows were read on.
    const SERVER: i64 = 1_765_000_000_000_000;

    fn loaded() -> Loaded {
        let mut l = sample();
        l.versions.server = Some(SERVER);
        for (n, id) in l.tokens.keys().enumerate() {
            l.versions
                .tokens
                .insert(access_token_hash(id), 100 + n as i64);
        }
        for id in l.profiles.keys() {
            l.versions.profiles.insert(
                id.clone(),
                ProfileVersion {
                    xmin: 7,
                    tenant: "default".into(),
                    tenant_xmin: None,
                },
            );
        }
        l
    }

    fn keys<'a>(tokens: &[&'a str], profiles: &[&'a str]) -> Keys<'a> {
        Keys {
            access_token_ids: tokens.to_vec(),
            profile_ids: profiles.to_vec(),
            message_ids: vec![],
        }
    }

    #[test]
    fn recalls_what_it_learned_with_its_versions() {
        let now = Instant::now();
        let mut k = Known::new(100);
        let l = loaded();
        k.learn(&l, now);
        let got = k.recall(&keys(&["admin"], &["p1"]), now).expect("known");
        assert_eq!(got.tokens["admin"], l.tokens["admin"]);
        assert_eq!(got.profiles["p1"], l.profiles["p1"]);
        let admin = access_token_hash("admin");
        assert_eq!(got.versions.tokens[&admin], l.versions.tokens[&admin]);
        assert_eq!(got.versions.profiles["p1"], l.versions.profiles["p1"]);
        // Only what the batch names goes into its checks.
        assert!(!got
            .versions
            .tokens
            .contains_key(&access_token_hash("other")));
        assert!(got.tenants.contains_key("default"));
        assert!(got.processed.is_empty() && got.last_emails.is_empty());
    }

    #[test]
    fn rows_are_dropped_when_a_load_reaches_another_server() {
        let now = Instant::now();
        let mut k = Known::new(100);
        k.learn(&loaded(), now);
        let both = keys(&["admin"], &["p1"]);
        assert_eq!(k.recall(&both, now).unwrap().versions.server, Some(SERVER));
        // A load from a promoted standby (or the same server restarted).
        let mut elsewhere = Loaded::default();
        elsewhere.versions.server = Some(SERVER + 1);
        k.learn(&elsewhere, now);
        assert_eq!(k.len(), (0, 0), "every row read on the old server is gone");
        assert!(k.recall(&both, now).is_none());
        // What is learned from then on is that server's.
        let mut l = loaded();
        l.versions.server = Some(SERVER + 1);
        k.learn(&l, now);
        assert_eq!(
            k.recall(&both, now).unwrap().versions.server,
            Some(SERVER + 1)
        );
        // A load that read nothing (no keys) says nothing about the server.
        k.learn(&Loaded::default(), now);
        assert!(k.recall(&both, now).is_some());
    }

    #[test]
    fn a_token_is_kept_under_its_hash_never_its_id() {
        let mut k = Known::new(100);
        k.learn(&loaded(), Instant::now());
        let mut kept: Vec<[u8; 32]> = k.tokens.keys().copied().collect();
        let mut hashes = vec![access_token_hash("admin"), access_token_hash("other")];
        kept.sort();
        hashes.sort();
        assert_eq!(kept, hashes);
    }

    #[test]
    fn one_unknown_row_means_the_batch_is_loaded() {
        let now = Instant::now();
        let mut k = Known::new(100);
        k.learn(&loaded(), now);
        assert!(k
            .recall(&keys(&["admin", "nobody"], &["p1"]), now)
            .is_none());
        assert!(k.recall(&keys(&["admin"], &["p1", "p2"]), now).is_none());
        // No keys at all (every command malformed): nothing to load.
        assert!(k.recall(&keys(&[], &[]), now).is_some());
    }

    #[test]
    fn a_row_without_a_version_is_not_kept() {
        let now = Instant::now();
        let mut k = Known::new(100);
        let mut l = loaded();
        l.versions.tokens.remove(&access_token_hash("admin"));
        l.versions.profiles.clear();
        k.learn(&l, now);
        assert!(k.recall(&keys(&["admin"], &[]), now).is_none());
        assert!(k.recall(&keys(&[], &["p1"]), now).is_none());
        assert!(k.recall(&keys(&["other"], &[]), now).is_some());
    }

    #[test]
    fn rows_older_than_max_age_are_read_again() {
        let then = Instant::now();
        let mut k = Known::new(100);
        k.learn(&loaded(), then);
        let ks = keys(&["admin"], &["p1"]);
        assert!(k
            .recall(&ks, then + MAX_AGE - Duration::from_millis(1))
            .is_some());
        assert!(k.recall(&ks, then + MAX_AGE).is_none());
        // Learning again renews it.
        k.learn(&loaded(), then + MAX_AGE);
        assert!(k.recall(&ks, then + MAX_AGE).is_some());
    }

    #[test]
    fn a_profile_is_known_with_all_its_last_emails_and_those_claimed_since() {
        let now = Instant::now();
        let mut k = Known::new(100);
        let mut l = loaded();
        l.last_emails
            .insert(("p1".into(), "verify-account".into()), 1_000);
        l.last_emails
            .insert(("p2".into(), "verify-account".into()), 5_000);
        k.learn(&l, now);
        let ks = keys(&[], &["p1"]);
        let got = k.recall(&ks, now).unwrap();
        assert_eq!(
            got.last_emails,
            HashMap::from([(("p1".into(), "verify-account".into()), 1_000)]),
            "p1's only, though the load had p2's too"
        );
        let claim = |purpose, at_ms| EmailClaim {
            profile_id: "p1".into(),
            purpose,
            at_ms,
        };
        k.note_emails(&[
            claim("reset-password", 2_000),
            claim("verify-account", 3_000),
        ]);
        // Never moved back by an older claim.
        k.note_emails(&[claim("verify-account", 500)]);
        let got = k.recall(&ks, now).unwrap();
        assert_eq!(
            got.last_emails[&("p1".into(), "reset-password".into())],
            2_000
        );
        assert_eq!(
            got.last_emails[&("p1".into(), "verify-account".into())],
            3_000
        );
        // A profile not known is not made known by a claim.
        k.note_emails(&[EmailClaim {
            profile_id: "p9".into(),
            purpose: "verify-account",
            at_ms: 1,
        }]);
        assert!(k.recall(&keys(&[], &["p9"]), now).is_none());
    }

    #[test]
    fn forgets_what_a_failed_commit_named() {
        let now = Instant::now();
        let mut k = Known::new(100);
        k.learn(&loaded(), now);
        k.forget(&keys(&["admin"], &["p1"]));
        assert!(k.recall(&keys(&["admin"], &[]), now).is_none());
        assert!(k.recall(&keys(&[], &["p1"]), now).is_none());
        assert!(k.recall(&keys(&["other"], &[]), now).is_some());
    }

    #[test]
    fn never_holds_more_than_its_capacity() {
        let now = Instant::now();
        let mut k = Known::new(1);
        k.learn(&loaded(), now); // two tokens, one profile
        assert_eq!(k.len(), (1, 1));
        let mut off = Known::new(0);
        off.learn(&loaded(), now);
        assert_eq!(off.len(), (0, 0));
        assert!(off.recall(&keys(&[], &[]), now).is_none());
    }
}
