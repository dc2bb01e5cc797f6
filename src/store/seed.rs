//! `profile-worker seed FILE` (CONTRACT §8): an idempotent upsert of tenants,
//! access tokens and profiles, all in one transaction.

use super::{access_token_hash, to_system_time, Store, StoreError};
use crate::contract::command::MAX_ID_CHARS;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SeedFile {
    #[serde(default)]
    pub tenants: Vec<SeedTenant>,
    #[serde(default)]
    pub access_tokens: Vec<SeedAccessToken>,
    #[serde(default)]
    pub profiles: Vec<SeedProfile>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SeedTenant {
    pub name: String,
    #[serde(default)]
    pub verify_new_profiles: bool,
    /// Hosts a caller-given verificationUrl may point at (`*.example.com`: any
    /// subdomain); absent or empty: any host.
    #[serde(default)]
    pub link_hosts: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SeedAccessToken {
    pub id: String,
    pub application: String,
    #[serde(default)]
    pub master: bool,
    /// Epoch milliseconds or null.
    #[serde(default)]
    pub expires_on: Option<i64>,
    #[serde(default)]
    pub tenant_permissions: Vec<SeedTenantPermission>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SeedTenantPermission {
    pub tenant: String,
    #[serde(default)]
    pub allowed_actions: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SeedProfile {
    pub id: String,
    pub tenant: String,
    pub username: String,
    pub email: String,
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub verified: bool,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default = "empty_object")]
    pub attributes: serde_json::Value,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SeedReport {
    pub tenants: usize,
    pub access_tokens: usize,
    pub profiles: usize,
}

/// Why a seed file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    // The position is the message: not a `source`, so `{:#}` says it once.
    #[error("{} (at {})", .0.inner(), .0.path())]
    Json(serde_path_to_error::Error<serde_json::Error>),
    /// Well-formed, but breaks a rule of CONTRACT §8 (the message says which).
    #[error("{0}")]
    Invalid(String),
    #[error("profile \"{id}\"")]
    Profile {
        id: String,
        #[source]
        source: StoreError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SeedFile {
    pub fn parse(text: &str) -> Result<Self, SeedError> {
        let file: SeedFile =
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(text))
                .map_err(SeedError::Json)?;
        file.check()?;
        Ok(file)
    }

    fn check(&self) -> Result<(), SeedError> {
        let invalid = |m: String| Err(SeedError::Invalid(m));
        let id_ok = |what: &str, id: &str| {
            let n = id.chars().count();
            if n == 0 || n > MAX_ID_CHARS {
                invalid(format!(
                    "{what} id \"{id}\" must be 1 to {MAX_ID_CHARS} characters"
                ))
            } else {
                Ok(())
            }
        };
        for t in &self.tenants {
            id_ok("tenant", &t.name)?;
            for h in &t.link_hosts {
                if let Err(m) = check_link_host(h) {
                    return invalid(format!("tenant \"{}\": linkHosts entry {h:?} {m}", t.name));
                }
            }
        }
        for (i, t) in self.access_tokens.iter().enumerate() {
            // Not quoted: an access token ID is a secret, even a malformed one.
            let n = t.id.chars().count();
            if n == 0 || n > MAX_ID_CHARS {
                return invalid(format!(
                    "accessTokens[{i}]: id must be 1 to {MAX_ID_CHARS} characters"
                ));
            }
        }
        for p in &self.profiles {
            id_ok("profile", &p.id)?;
            // The worker refuses to email anything else (CONTRACT §3 rule 6);
            // refused here too, so a seed cannot plant a second recipient.
            if !crate::domain::is_single_address(&p.email) {
                return invalid(format!(
                    "profile \"{}\": email must be one address (name@domain), without a display name or a list",
                    p.id
                ));
            }
            if !p.attributes.is_object() {
                return invalid(format!(
                    "profile \"{}\": attributes must be an object",
                    p.id
                ));
            }
        }
        Ok(())
    }
}

/// A host name, or `*.` and a host name; no scheme, port, path or whitespace.
fn check_link_host(h: &str) -> Result<(), &'static str> {
    let name = h.strip_prefix("*.").unwrap_or(h);
    let label_ok = |l: &str| {
        !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err("must be a host name like example.com or *.example.com");
    }
    Ok(())
}

impl Store {
    pub async fn seed(&self, file: &SeedFile) -> Result<SeedReport, SeedError> {
        let mut client = self.client("seed").await?;
        let err = |e| StoreError::pg("seed", e);
        let tx = client.transaction().await.map_err(err)?;
        let up_tenant = tx
            .prepare(
                "INSERT INTO tenants (name, verify_new_profiles, link_hosts) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO UPDATE SET verify_new_profiles = EXCLUDED.verify_new_profiles, \
                 link_hosts = EXCLUDED.link_hosts",
            )
            .await
            .map_err(err)?;
        for t in &file.tenants {
            let hosts: Vec<String> = t
                .link_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect();
            tx.execute(&up_tenant, &[&t.name, &t.verify_new_profiles, &hosts])
                .await
                .map_err(err)?;
        }
        let up_token = tx
            .prepare(
                "INSERT INTO access_tokens (id_sha256, application, master, expires_on, tenant_permissions, id_prefix) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id_sha256) DO UPDATE SET \
                 id_prefix = EXCLUDED.id_prefix, application = EXCLUDED.application, master = EXCLUDED.master, \
                 expires_on = EXCLUDED.expires_on, tenant_permissions = EXCLUDED.tenant_permissions",
            )
            .await
            .map_err(err)?;
        for t in &file.access_tokens {
            let expires = t.expires_on.map(to_system_time);
            let perms = serde_json::to_value(&t.tenant_permissions).unwrap_or_default();
            let hash = access_token_hash(&t.id).to_vec();
            let prefix = crate::telemetry::id_prefix(&t.id);
            tx.execute(
                &up_token,
                &[&hash, &t.application, &t.master, &expires, &perms, &prefix],
            )
            .await
            .map_err(err)?;
        }
        let up_profile = tx
            .prepare(
                "INSERT INTO profiles (id, tenant, username, email, enabled, verified, roles, attributes) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO UPDATE SET \
                 tenant = EXCLUDED.tenant, username = EXCLUDED.username, email = EXCLUDED.email, \
                 enabled = EXCLUDED.enabled, verified = EXCLUDED.verified, roles = EXCLUDED.roles, \
                 attributes = EXCLUDED.attributes",
            )
            .await
            .map_err(err)?;
        for p in &file.profiles {
            let roles = serde_json::to_value(&p.roles).unwrap_or_default();
            tx.execute(
                &up_profile,
                &[
                    &p.id,
                    &p.tenant,
                    &p.username,
                    &p.email,
                    &p.enabled,
                    &p.verified,
                    &roles,
                    &p.attributes,
                ],
            )
            .await
            .map_err(|e| StoreError::pg("seed a profile", e))
            .map_err(|e| SeedError::Profile {
                id: p.id.clone(),
                source: e,
            })?;
        }
        tx.commit().await.map_err(err)?;
        Ok(SeedReport {
            tenants: file.tenants.len(),
            access_tokens: file.access_tokens.len(),
            profiles: file.profiles.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_contract_example() {
        let f = SeedFile::parse(
            r#"{
  "tenants":      [ { "name": "default", "verifyNewProfiles": false } ],
  "accessTokens": [ { "id": "e8f5170c-877b-416f-b70f-4b09772f8e2d", "application": "profile-admin",
                      "master": true, "expiresOn": null,
                      "tenantPermissions": [ { "tenant": "*", "allowedActions": [ "*" ] } ] } ],
  "profiles":     [ { "id": "592715d4d4c650e226b03b62", "tenant": "default", "username": "john.doe",
                      "email": "john.doe@example.com", "enabled": false, "verified": false,
                      "roles": [], "attributes": {} } ]
}"#,
        )
        .unwrap();
        assert_eq!(f.tenants.len(), 1);
        assert_eq!(
            f.access_tokens[0].tenant_permissions[0].allowed_actions,
            vec!["*"]
        );
        assert!(!f.profiles[0].enabled);
    }

    #[test]
    fn link_hosts_must_be_host_names() {
        let ok = SeedFile::parse(
            r#"{"tenants":[{"name":"t","linkHosts":["example.com","*.example.com","a-b.c"]}]}"#,
        )
        .unwrap();
        assert_eq!(ok.tenants[0].link_hosts.len(), 3);
        for bad in [
            "https://example.com",
            "example.com/x",
            "*",
            "a..b",
            " example.com",
            "*.*.x",
        ] {
            let text = format!(r#"{{"tenants":[{{"name":"t","linkHosts":[{bad:?}]}}]}}"#);
            let e = SeedFile::parse(&text).unwrap_err().to_string();
            assert!(e.contains("linkHosts"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_profiles_email_is_one_address() {
        let profile = |email: &str| {
            format!(
                r#"{{"profiles":[{{"id":"p","tenant":"t","username":"u","email":{email:?},"enabled":true,"verified":true,"roles":[],"attributes":{{}}}}]}}"#
            )
        };
        assert!(SeedFile::parse(&profile("john@example.com")).is_ok());
        for bad in ["a@example.com, b@example.net", "John <john@example.com>"] {
            let e = SeedFile::parse(&profile(bad)).unwrap_err().to_string();
            assert!(e.contains("email must be one address"), "{bad}: {e}");
        }
    }

    #[test]
    fn rejects_unknown_fields_with_their_path() {
        let e = SeedFile::parse(r#"{"tenants":[{"name":"x","bogus":1}]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus") && e.contains("tenants[0]"), "{e}");
    }
}
