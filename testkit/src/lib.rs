//! Test harness: a real RabbitMQ and a real PostgreSQL on loopback. Every test gets
//! its own database and its own prefixed exchange/queue names, so tests run in
//! parallel and never see each other's messages. The worker runs as the
//! least-privileged database role and broker user the set-up makes
//! (scripts/test.sh), the tests' own checks as the owner and an admin user.
//!
//! `TEST_LOG=1` shows the workers' logs: those run in the test process through
//! the test's captured output (so a failing test shows them), those run as a
//! process on stderr. `RUST_LOG` filters both (default `info`).

pub mod burst;
mod consume;
mod env;
mod http;
mod leftovers;
mod messages;
mod process;
mod servers;

pub use consume::*;
pub use env::*;
pub use http::*;
pub use messages::*;
pub use process::*;
pub use servers::*;

pub use profile_worker::telemetry::Report;
/// `expose_secret()` on the settings' URLs.
pub use secrecy::ExposeSecret;
use serde_json::{json, Value};

pub const ADMIN_TOKEN: &str = "3b0bd9b6-1c0f-4d37-9b49-3d7c8f1e2a10";
pub const EXPIRED_TOKEN: &str = "expired-token";
pub const OTHER_TENANT_TOKEN: &str = "other-tenant-token";
pub const PROFILES_ONLY_TOKEN: &str = "profiles-only-token";
pub const ENABLED_PROFILE: &str = "5925a68def86951f895cf497";
pub const DISABLED_PROFILE: &str = "592715d4d4c650e226b03b62";
pub const OTHER_TENANT_PROFILE: &str = "other-tenant-profile";

/// Whether the workers' logs are wanted (`TEST_LOG` set to anything but `0`).
pub fn test_log() -> bool {
    std::env::var("TEST_LOG").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// With `TEST_LOG`, a log subscriber for workers run in this process, writing
/// through libtest's capture; once per process.
pub(crate) fn init_test_log() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    if test_log() {
        ONCE.call_once(|| {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        });
    }
}

pub fn fixtures() -> Value {
    let all = json!([{ "tenant": "*", "allowedActions": ["*"] }]);
    json!({
        "tenants": [ { "name": "default" }, { "name": "sample-tenant" }, { "name": "other" } ],
        "accessTokens": [
            { "id": ADMIN_TOKEN, "application": "profile-admin", "master": true, "expiresOn": null, "tenantPermissions": all },
            { "id": EXPIRED_TOKEN, "application": "old-app", "expiresOn": 1_000_000_000_000i64, "tenantPermissions": all },
            { "id": OTHER_TENANT_TOKEN, "application": "other-app", "expiresOn": 4_102_444_800_000i64,
              "tenantPermissions": [ { "tenant": "other", "allowedActions": ["*"] } ] },
            { "id": PROFILES_ONLY_TOKEN, "application": "profiles-app",
              "tenantPermissions": [ { "tenant": "default", "allowedActions": ["MANAGE_PROFILES"] },
                                     { "tenant": "sample-tenant", "allowedActions": ["MANAGE_PROFILES"] } ] }
        ],
        "profiles": [
            { "id": ENABLED_PROFILE, "tenant": "default", "username": "jane", "email": "jane@example.com", "enabled": true },
            { "id": DISABLED_PROFILE, "tenant": "sample-tenant", "username": "john.doe", "email": "john.doe@example.com", "enabled": false },
            { "id": OTHER_TENANT_PROFILE, "tenant": "other", "username": "olga", "email": "olga@example.com", "enabled": true }
        ]
    })
}

pub fn ticket(token: &str, profile: &str) -> Value {
    json!({ "accessTokenId": token, "profileId": profile })
}

pub fn verification(token: &str, profile: &str) -> Value {
    json!({ "accessTokenId": token, "id": profile })
}
