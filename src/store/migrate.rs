//! Embedded SQL migrations, applied in order, each in its own transaction, under an
//! advisory lock so that several workers starting at once do not race.

use super::{Store, StoreError};
use crate::contract::message::hex;

struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

/// Every file of `migrations/`, in order (listed by build.rs).
const MIGRATIONS: &[Migration] = include!(concat!(env!("OUT_DIR"), "/migrations.rs"));

impl Migration {
    /// What `schema_migrations.checksum` holds for it: the SHA-256 of its SQL.
    fn checksum(&self) -> Vec<u8> {
        use sha2::{Digest, Sha256};
        Sha256::digest(self.sql.as_bytes()).to_vec()
    }
}

/// One embedded migration against the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStatus {
    pub version: i32,
    pub name: &'static str,
    pub state: MigrationState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationState {
    Pending,
    /// Applied, with the file's checksum (`None`: applied before checksums
    /// were kept; `migrate` records it).
    Applied {
        at: String,
        checksum: Option<bool>,
    },
}

impl MigrationStatus {
    /// Applied, and its file changed since: a release must never edit one.
    pub fn changed(&self) -> bool {
        matches!(
            self.state,
            MigrationState::Applied {
                checksum: Some(false),
                ..
            }
        )
    }
}

/// Arbitrary, fixed: "profile-worker migrations".
const LOCK_KEY: i64 = 0x7072_6f66_696c_6501;

/// The worker's row rights (CONTRACT §9): what `run` needs and nothing more;
/// no DDL, no rights on the tables it only reads but to read them.
const RUNTIME_GRANTS: &[&str] = &[
    "GRANT SELECT ON schema_migrations, tenants, access_tokens, profiles TO {role}",
    "GRANT SELECT, INSERT, DELETE ON tickets, verification_tokens, processed_commands TO {role}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON outbox, email_cooldowns TO {role}",
];

impl Store {
    /// Every embedded migration, applied or pending, with its checksum checked
    /// against what was applied; no DDL (a role without DDL rights may ask).
    pub async fn migration_status(&self) -> Result<Vec<MigrationStatus>, StoreError> {
        let client = self.client("migrate").await?;
        let err = |e| StoreError::pg("migrate", e);
        let exists: bool = client
            .query_one(
                "SELECT to_regclass('schema_migrations') IS NOT NULL AS present",
                &[],
            )
            .await
            .map_err(err)?
            .get("present");
        let mut applied: std::collections::HashMap<i32, (String, Option<String>)> =
            Default::default();
        if exists {
            // Through jsonb, so a table from before checksums reads as none.
            for row in client
                .query(
                    "SELECT version, applied_at::text AS at, to_jsonb(m)->>'checksum' AS checksum \
                     FROM schema_migrations m",
                    &[],
                )
                .await
                .map_err(err)?
            {
                applied.insert(
                    row.get("version"),
                    (row.get("at"), row.get::<_, Option<String>>("checksum")),
                );
            }
        }
        Ok(MIGRATIONS
            .iter()
            .map(|m| MigrationStatus {
                version: m.version,
                name: m.name,
                state: match applied.get(&m.version) {
                    None => MigrationState::Pending,
                    Some((at, stored)) => MigrationState::Applied {
                        at: at.clone(),
                        checksum: stored
                            .as_deref()
                            .map(|stored| stored == format!("\\x{}", hex(&m.checksum()))),
                    },
                },
            })
            .collect())
    }

    /// Versions not yet applied. An applied migration whose file changed
    /// since is an error: the schema is not what this build expects.
    pub async fn pending_migrations(&self) -> Result<Vec<i32>, StoreError> {
        let status = self.migration_status().await?;
        if let Some(m) = status.iter().find(|m| m.changed()) {
            return Err(changed(m.version, m.name));
        }
        Ok(status
            .iter()
            .filter(|m| m.state == MigrationState::Pending)
            .map(|m| m.version)
            .collect())
    }

    /// Grants the worker's row rights to `role` (idempotent), so `run` can
    /// connect as a role that owns nothing.
    pub async fn grant_runtime(&self, role: &str) -> Result<(), StoreError> {
        let client = self.client("migrate").await?;
        let quoted = format!("\"{}\"", role.replace('"', "\"\""));
        for g in RUNTIME_GRANTS {
            client
                .batch_execute(&g.replace("{role}", &quoted))
                .await
                .map_err(|e| StoreError::pg("grant", e))?;
        }
        Ok(())
    }

    /// Applies pending migrations; returns the versions applied now. Runs no
    /// DDL at all when nothing is pending and every checksum is recorded.
    pub async fn migrate(&self) -> Result<Vec<i32>, StoreError> {
        let status = self.migration_status().await?;
        let recorded = status.iter().all(|m| {
            !matches!(
                m.state,
                MigrationState::Applied { checksum: None, .. } | MigrationState::Pending
            )
        });
        if let Some(m) = status.iter().find(|m| m.changed()) {
            return Err(changed(m.version, m.name));
        }
        if recorded {
            return Ok(vec![]);
        }
        let mut client = self.client("migrate").await?;
        let err = |e| StoreError::pg("migrate", e);
        client
            .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
            .await
            .map_err(err)?;
        let result = async {
            client
                .batch_execute(
                    "SET client_min_messages = warning;
                     CREATE TABLE IF NOT EXISTS schema_migrations (
                        version    integer PRIMARY KEY,
                        name       text NOT NULL,
                        applied_at timestamptz NOT NULL DEFAULT now(),
                        checksum   bytea);
                     ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS checksum bytea",
                )
                .await
                .map_err(err)?;
            let applied: std::collections::HashMap<i32, Option<Vec<u8>>> = client
                .query("SELECT version, checksum FROM schema_migrations", &[])
                .await
                .map_err(err)?
                .iter()
                .map(|r| (r.get("version"), r.get("checksum")))
                .collect();
            // An applied file that changed stops everything; one applied
            // before checksums were kept has its checksum recorded now.
            for m in MIGRATIONS {
                match applied.get(&m.version) {
                    Some(Some(sum)) if *sum != m.checksum() => {
                        return Err(changed(m.version, m.name))
                    }
                    Some(None) => {
                        client
                            .execute(
                                "UPDATE schema_migrations SET checksum = $2 WHERE version = $1",
                                &[&m.version, &m.checksum()],
                            )
                            .await
                            .map_err(err)?;
                    }
                    _ => {}
                }
            }
            let mut now_applied = Vec::new();
            for m in MIGRATIONS
                .iter()
                .filter(|m| !applied.contains_key(&m.version))
            {
                let tx = client.transaction().await.map_err(err)?;
                tx.batch_execute(m.sql).await.map_err(err)?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    &[&m.version, &m.name, &m.checksum()],
                )
                .await
                .map_err(err)?;
                tx.commit().await.map_err(err)?;
                tracing::info!(version = m.version, name = m.name, "applied migration");
                now_applied.push(m.version);
            }
            Ok(now_applied)
        }
        .await;
        let _ = client
            .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
            .await;
        result
    }
}

fn changed(version: i32, name: &str) -> StoreError {
    StoreError::permanent(
        "migrate",
        format!(
            "migration {version} ({name}) was applied from a different file: a release must never edit an applied migration; restore migrations/{version:04}_{name}.sql as it was and add a new one"
        ),
    )
}
