//! Embedded SQL migrations, applied in order, each in its own transaction, under an
//! advisory lock so that several workers starting at once do not race.

use super::{Store, StoreError};

struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("../../migrations/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "outbox_traceparent",
        sql: include_str!("../../migrations/0002_outbox_traceparent.sql"),
    },
    Migration {
        version: 3,
        name: "hardening",
        sql: include_str!("../../migrations/0003_hardening.sql"),
    },
    Migration {
        version: 4,
        name: "outbox_tracestate",
        sql: include_str!("../../migrations/0004_outbox_tracestate.sql"),
    },
    Migration {
        version: 5,
        name: "access_token_admin",
        sql: include_str!("../../migrations/0005_access_token_admin.sql"),
    },
    Migration {
        version: 6,
        name: "batch_row_types",
        sql: include_str!("../../migrations/0006_batch_row_types.sql"),
    },
    Migration {
        version: 7,
        name: "row_versions",
        sql: include_str!("../../migrations/0007_row_versions.sql"),
    },
];

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
    /// Versions not yet applied, without any DDL (so a role without DDL rights
    /// can ask).
    pub async fn pending_migrations(&self) -> Result<Vec<i32>, StoreError> {
        let client = self.client("migrate").await?;
        let err = |e| StoreError::pg("migrate", e);
        let exists: bool = client
            .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
            .await
            .map_err(err)?
            .get(0);
        let applied: Vec<i32> = if exists {
            client
                .query("SELECT version FROM schema_migrations", &[])
                .await
                .map_err(err)?
                .iter()
                .map(|r| r.get(0))
                .collect()
        } else {
            vec![]
        };
        Ok(MIGRATIONS
            .iter()
            .map(|m| m.version)
            .filter(|v| !applied.contains(v))
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
    /// DDL at all when nothing is pending.
    pub async fn migrate(&self) -> Result<Vec<i32>, StoreError> {
        if self.pending_migrations().await?.is_empty() {
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
                        applied_at timestamptz NOT NULL DEFAULT now())",
                )
                .await
                .map_err(err)?;
            let applied: Vec<i32> = client
                .query("SELECT version FROM schema_migrations", &[])
                .await
                .map_err(err)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let mut now_applied = Vec::new();
            for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
                let tx = client.transaction().await.map_err(err)?;
                tx.batch_execute(m.sql).await.map_err(err)?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    &[&m.version, &m.name],
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
