//! `profile-worker access-tokens create | list | revoke | rotate` (CONTRACT §8):
//! what Crafter's REST API and console do for access tokens, as the schema
//! owner. A new ID is printed once, on stdout, and nowhere else: not in logs,
//! not in `list` (a prefix of at most 8 characters). `revoke` and `rotate`
//! read the ID from standard input when it is not given (or is `-`), so it
//! need not stand in a shell's history or a process list.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use profile_worker::config::DatabaseSettings;
use profile_worker::store::{
    AccessTokenInfo, Expires, NewAccessToken, SeedTenantPermission, Store,
};
use std::io::{BufRead, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Subcommand)]
pub enum AccessTokenCmd {
    /// Make a token with a fresh random ID and print the ID (the only time it is shown).
    Create(CreateArgs),
    /// Show the tokens: application, master, permissions, expiry, created, an ID prefix.
    List(ListArgs),
    /// Delete a token; commands naming it are answered 403 NO_SUCH_ACCESS_TOKEN_ID
    /// from the next batch on.
    Revoke(RevokeArgs),
    /// Make a new token with the same application and permissions, print its ID,
    /// and let the old one expire after the grace.
    Rotate(RotateArgs),
}

#[derive(Args)]
pub struct Common {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    db: DatabaseSettings,
}

#[derive(Args)]
pub struct CreateArgs {
    /// The application the token is for (Crafter's `application`).
    #[arg(long)]
    application: String,
    /// A master token (Crafter's `master`).
    #[arg(long)]
    master: bool,
    /// TENANT=ACTION,ACTION… (`*` for any tenant or action), repeatable; kept in
    /// order: the first entry naming a profile's tenant (or `*`) decides.
    #[arg(long = "tenant", value_name = "TENANT=ACTIONS", value_parser = parse_permission)]
    tenants: Vec<SeedTenantPermission>,
    #[command(flatten)]
    expiry: Expiry,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
#[group(multiple = false)]
pub struct Expiry {
    /// Expire this long from now (`90d`, `12h`, `30min`, `1h 30m`).
    #[arg(long, value_parser = humantime::parse_duration)]
    expires_in: Option<Duration>,
    /// Expire at this time (RFC 3339, e.g. `2027-01-31T00:00:00Z`).
    #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
    expires_on: Option<SystemTime>,
}

impl Expiry {
    /// The expiry chosen, if any; `--expires-in` is reckoned from the
    /// database's clock, which the worker compares expiry with.
    fn chosen(&self) -> Option<Expires> {
        match (self.expires_in, self.expires_on) {
            (Some(d), _) => Some(Expires::In(d)),
            (None, Some(t)) => Some(Expires::At(t)),
            (None, None) => None,
        }
    }
}

#[derive(Args)]
pub struct ListArgs {
    /// Only this application's tokens.
    #[arg(long)]
    application: Option<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
pub struct RevokeArgs {
    /// The token's ID; absent or `-`: one line read from standard input.
    id: Option<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
pub struct RotateArgs {
    /// The old token's ID; absent or `-`: one line read from standard input.
    id: Option<String>,
    /// How long the old token keeps working (`0`: it expires at once).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// The new token's expiry (default: the old token's).
    #[command(flatten)]
    expiry: Expiry,
    #[command(flatten)]
    common: Common,
}

/// Why a `--tenant` argument is refused; clap prints it after the argument.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum PermissionError {
    #[error("expected TENANT=ACTION,ACTION… (e.g. default=MANAGE_PROFILES,MANAGE_TICKETS)")]
    NoEquals,
    #[error("the tenant must be 1 to 128 characters")]
    TenantLength,
    #[error("{0:?} is no action: actions are like MANAGE_PROFILES, or * for all")]
    Action(String),
}

/// `TENANT=ACTION,ACTION`: the tenant is everything before the last `=`.
fn parse_permission(s: &str) -> Result<SeedTenantPermission, PermissionError> {
    let (tenant, actions) = s.rsplit_once('=').ok_or(PermissionError::NoEquals)?;
    let n = tenant.chars().count();
    if n == 0 || n > 128 {
        return Err(PermissionError::TenantLength);
    }
    let allowed_actions: Vec<String> = actions.split(',').map(str::to_string).collect();
    if let Some(a) = allowed_actions.iter().find(|a| {
        *a != "*" && (a.is_empty() || !a.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
    }) {
        return Err(PermissionError::Action(a.clone()));
    }
    Ok(SeedTenantPermission {
        tenant: tenant.to_string(),
        allowed_actions,
    })
}

/// A token ID from the argument, or from one line of standard input.
fn token_id(arg: Option<String>) -> anyhow::Result<String> {
    let id = match arg.filter(|a| a != "-") {
        Some(id) => id,
        None => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("reading the access token ID from standard input")?;
            line.trim().to_string()
        }
    };
    let n = id.chars().count();
    if n == 0 || n > 128 {
        // Never echoed: even a malformed ID may be most of a secret.
        bail!("an access token ID is 1 to 128 characters (give it as an argument or on standard input)");
    }
    Ok(id)
}

async fn connect(db: &DatabaseSettings) -> anyhow::Result<Store> {
    let store = super::connect_database(db).await?;
    if !store.pending_migrations().await?.is_empty() {
        bail!("migrations are pending: run `profile-worker migrate` as the schema owner first");
    }
    store.check_token_admin().await?;
    Ok(store)
}

pub async fn run(cmd: AccessTokenCmd) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    match cmd {
        AccessTokenCmd::Create(a) => {
            let store = connect(&a.common.db).await?;
            let id = uuid::Uuid::new_v4().to_string();
            let made = store
                .create_access_token(&NewAccessToken {
                    id: &id,
                    application: &a.application,
                    master: a.master,
                    expires: a.expiry.chosen().unwrap_or(Expires::Never),
                    tenant_permissions: &a.tenants,
                })
                .await?;
            if a.tenants.is_empty() && !a.master {
                eprintln!("warning: a token without --tenant entries is allowed nothing");
            }
            shown_once(&mut out, &id, &made, None, a.common.json)?;
        }
        AccessTokenCmd::List(a) => {
            let store = connect(&a.common.db).await?;
            let tokens = store.list_access_tokens(a.application.as_deref()).await?;
            if a.common.json {
                writeln!(out, "{}", serde_json::to_string(&tokens)?)?;
            } else {
                writeln!(
                    out,
                    "{:<10} {:<24} {:<6} {:<24} {:<24} PERMISSIONS",
                    "ID", "APPLICATION", "MASTER", "EXPIRES", "CREATED"
                )?;
                for t in &tokens {
                    writeln!(
                        out,
                        "{:<10} {:<24} {:<6} {:<24} {:<24} {}",
                        format!("{}…", t.id_prefix),
                        t.application,
                        if t.master { "yes" } else { "no" },
                        t.expires_on.map_or("never".into(), time),
                        time(t.created_at),
                        permissions(&t.tenant_permissions)
                    )?;
                }
            }
        }
        AccessTokenCmd::Revoke(a) => {
            let id = token_id(a.id)?;
            let store = connect(&a.common.db).await?;
            let Some(t) = store.revoke_access_token(&id).await? else {
                bail!("no access token has that ID");
            };
            if a.common.json {
                let v = serde_json::json!({ "revoked": t });
                writeln!(out, "{v}")?;
            } else {
                writeln!(
                    out,
                    "revoked access token {}… of {}",
                    t.id_prefix, t.application
                )?;
            }
        }
        AccessTokenCmd::Rotate(a) => {
            let old_id = token_id(a.id)?;
            let store = connect(&a.common.db).await?;
            let new_id = uuid::Uuid::new_v4().to_string();
            let Some((new, old)) = store
                .rotate_access_token(&old_id, &new_id, a.expiry.chosen(), a.grace)
                .await?
            else {
                bail!("no access token has that ID");
            };
            shown_once(&mut out, &new_id, &new, Some(&old), a.common.json)?;
        }
    }
    Ok(())
}

/// Prints a new token's ID: the one time it is ever shown.
fn shown_once(
    out: &mut impl Write,
    id: &str,
    t: &AccessTokenInfo,
    replaces: Option<&AccessTokenInfo>,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        let mut v = serde_json::to_value(t)?;
        v["id"] = id.into();
        if let Some(old) = replaces {
            v["replaces"] = serde_json::to_value(old)?;
        }
        writeln!(out, "{v}")?;
    } else {
        writeln!(out, "{id}")?;
        eprintln!(
            "access token for {} made; its ID above is shown this once and stored only as a hash",
            t.application
        );
        if let Some(old) = replaces {
            eprintln!(
                "the old token {}… expires {}",
                old.id_prefix,
                old.expires_on.map_or("never".into(), time)
            );
        }
    }
    Ok(())
}

fn time(epoch_ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(epoch_ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn permissions(p: &[SeedTenantPermission]) -> String {
    p.iter()
        .map(|e| format!("{}={}", e.tenant, e.allowed_actions.join(",")))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_parse_in_the_operators_notation() {
        let p = parse_permission("default=MANAGE_PROFILES,MANAGE_TICKETS").unwrap();
        assert_eq!(p.tenant, "default");
        assert_eq!(p.allowed_actions, ["MANAGE_PROFILES", "MANAGE_TICKETS"]);
        assert_eq!(parse_permission("*=*").unwrap().allowed_actions, ["*"]);
        assert_eq!(parse_permission("a=b=*").unwrap().tenant, "a=b");
        use PermissionError::*;
        for (bad, why) in [
            ("default", NoEquals),
            ("=*", TenantLength),
            ("default=", Action(String::new())),
            ("default=manage", Action("manage".into())),
            ("default=A,,B", Action(String::new())),
        ] {
            assert_eq!(parse_permission(bad).err(), Some(why), "{bad}");
        }
    }
}
