//! Access-token administration (CONTRACT §8): make, list, revoke and rotate
//! tokens, as the schema owner. Only the SHA-256 of an ID and a short prefix
//! of it are stored; the ID itself is the caller's to show once.

use super::seed::SeedTenantPermission;
use super::{access_token_hash, Store, StoreError};
use std::time::{Duration, SystemTime};

/// A token to store. `id` is hashed here and never leaves this function.
#[derive(Debug)]
pub struct NewAccessToken<'a> {
    pub id: &'a str,
    pub application: &'a str,
    pub master: bool,
    pub expires: Expires,
    /// In order: the first entry naming a tenant (or `*`) decides (CONTRACT §3).
    pub tenant_permissions: &'a [SeedTenantPermission],
}

/// When a token expires. A time relative to now is reckoned on the
/// database's clock, the one the worker compares expiry with: on the
/// operator's host, a clock 10 minutes slow would keep a token rotated "at
/// once" working for 10 minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expires {
    Never,
    At(SystemTime),
    /// This long after the database's `now()`.
    In(Duration),
}

impl Expires {
    /// As two parameters, `$in_secs` and `$at`, for [`EXPIRES_SQL`].
    fn params(self) -> (Option<f64>, Option<SystemTime>) {
        match self {
            Expires::Never => (None, None),
            Expires::At(t) => (None, Some(t)),
            Expires::In(d) => (Some(d.as_secs_f64()), None),
        }
    }
}

/// An expiry from [`Expires::params`] given as `$IN` (seconds from now) and
/// `$AT` (a time).
const EXPIRES_SQL: &str =
    "CASE WHEN $IN::float8 IS NOT NULL THEN now() + make_interval(secs => $IN::float8) ELSE $AT::timestamptz END";

fn expires_sql(in_param: usize, at_param: usize) -> String {
    EXPIRES_SQL
        .replace("$IN", &format!("${in_param}"))
        .replace("$AT", &format!("${at_param}"))
}

/// A stored token as an operator may see it: never more of its ID than the prefix.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessTokenInfo {
    /// At most 8 characters and a quarter of the ID; empty for tokens stored
    /// before the prefix was kept.
    pub id_prefix: String,
    pub application: String,
    pub master: bool,
    pub tenant_permissions: Vec<SeedTenantPermission>,
    /// Epoch milliseconds, or null: never expires.
    pub expires_on: Option<i64>,
    /// Epoch milliseconds.
    pub created_at: i64,
}

const COLUMNS: &str = "id_prefix, application, master, tenant_permissions, expires_on, created_at";

fn info(row: &tokio_postgres::Row) -> Result<AccessTokenInfo, StoreError> {
    let perms: serde_json::Value = row.get("tenant_permissions");
    let tenant_permissions = serde_json::from_value(perms)
        .map_err(|e| StoreError::permanent("access tokens", format!("tenant_permissions: {e}")))?;
    Ok(AccessTokenInfo {
        id_prefix: row.get("id_prefix"),
        application: row.get("application"),
        master: row.get("master"),
        tenant_permissions,
        expires_on: row
            .get::<_, Option<SystemTime>>("expires_on")
            .map(super::epoch_millis),
        created_at: super::epoch_millis(row.get("created_at")),
    })
}

impl Store {
    /// Fails with a clear message unless this role may administer tokens: the
    /// worker's runtime role may only read them (CONTRACT §9).
    pub async fn check_token_admin(&self) -> Result<(), StoreError> {
        let client = self.client("access tokens").await?;
        let row = client
            .query_one(
                "SELECT current_user::text AS role, \
                        has_table_privilege('access_tokens', 'INSERT') \
                    AND has_table_privilege('access_tokens', 'UPDATE') \
                    AND has_table_privilege('access_tokens', 'DELETE') AS admin",
                &[],
            )
            .await
            .map_err(|e| StoreError::pg("access tokens", e))?;
        let (role, admin): (String, bool) = (row.get("role"), row.get("admin"));
        if admin {
            return Ok(());
        }
        Err(StoreError::permanent(
            "access tokens",
            format!(
                "role \"{role}\" may not administer access tokens (it needs INSERT, UPDATE and \
                 DELETE on access_tokens; the worker's runtime role only reads them): run this \
                 command with the schema owner's DATABASE_URL"
            ),
        ))
    }

    pub async fn create_access_token(
        &self,
        t: &NewAccessToken<'_>,
    ) -> Result<AccessTokenInfo, StoreError> {
        let client = self.client("access tokens").await?;
        insert(&client, t).await
    }

    pub async fn list_access_tokens(
        &self,
        application: Option<&str>,
    ) -> Result<Vec<AccessTokenInfo>, StoreError> {
        let client = self.client("access tokens").await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM access_tokens \
                     WHERE $1::text IS NULL OR application = $1 ORDER BY created_at, application"
                ),
                &[&application],
            )
            .await
            .map_err(|e| StoreError::pg("access tokens", e))?;
        rows.iter().map(info).collect()
    }

    /// Deletes the token with this ID; `None` when there is none.
    pub async fn revoke_access_token(
        &self,
        id: &str,
    ) -> Result<Option<AccessTokenInfo>, StoreError> {
        let client = self.client("access tokens").await?;
        let row = client
            .query_opt(
                &format!("DELETE FROM access_tokens WHERE id_sha256 = $1 RETURNING {COLUMNS}"),
                &[&access_token_hash(id).to_vec()],
            )
            .await
            .map_err(|e| StoreError::pg("access tokens", e))?;
        row.as_ref().map(info).transpose()
    }

    /// In one transaction: `new` takes the old token's application, master flag
    /// and permissions, and its expiry unless `new_expires` is given; the old
    /// one expires `grace` after the database's `now()` unless it expires
    /// sooner already. Returns the new token and the old one as it now is;
    /// `None` when `old_id` names none.
    pub async fn rotate_access_token(
        &self,
        old_id: &str,
        new_id: &str,
        new_expires: Option<Expires>,
        grace: Duration,
    ) -> Result<Option<(AccessTokenInfo, AccessTokenInfo)>, StoreError> {
        let err = |e| StoreError::pg("access tokens", e);
        let mut client = self.client("access tokens").await?;
        let tx = client.transaction().await.map_err(err)?;
        let old_hash = access_token_hash(old_id).to_vec();
        let Some(row) = tx
            .query_opt(
                &format!("SELECT {COLUMNS} FROM access_tokens WHERE id_sha256 = $1 FOR UPDATE"),
                &[&old_hash],
            )
            .await
            .map_err(err)?
        else {
            return Ok(None);
        };
        let old = info(&row)?;
        let kept = match row.get::<_, Option<SystemTime>>("expires_on") {
            Some(t) => Expires::At(t),
            None => Expires::Never,
        };
        let new = insert(
            &tx,
            &NewAccessToken {
                id: new_id,
                application: &old.application,
                master: old.master,
                expires: new_expires.unwrap_or(kept),
                tenant_permissions: &old.tenant_permissions,
            },
        )
        .await?;
        let row = tx
            .query_one(
                &format!(
                    "UPDATE access_tokens \
                     SET expires_on = LEAST(coalesce(expires_on, 'infinity'), now() + make_interval(secs => $2)) \
                     WHERE id_sha256 = $1 RETURNING {COLUMNS}"
                ),
                &[&old_hash, &grace.as_secs_f64()],
            )
            .await
            .map_err(err)?;
        let old = info(&row)?;
        tx.commit().await.map_err(err)?;
        Ok(Some((new, old)))
    }
}

async fn insert(
    client: &impl deadpool_postgres::GenericClient,
    t: &NewAccessToken<'_>,
) -> Result<AccessTokenInfo, StoreError> {
    let perms = serde_json::to_value(t.tenant_permissions)
        .map_err(|e| StoreError::permanent("access tokens", e.to_string()))?;
    let (expires_in, expires_at) = t.expires.params();
    let row = client
        .query_one(
            &format!(
                "INSERT INTO access_tokens \
                 (id_sha256, id_prefix, application, master, expires_on, tenant_permissions) \
                 VALUES ($1, $2, $3, $4, {}, $5) RETURNING {COLUMNS}",
                expires_sql(6, 7)
            ),
            &[
                &access_token_hash(t.id).to_vec(),
                &crate::telemetry::id_prefix(t.id),
                &t.application,
                &t.master,
                &perms,
                &expires_in,
                &expires_at,
            ],
        )
        .await
        .map_err(|e| StoreError::pg("access tokens", e))?;
    info(&row)
}
