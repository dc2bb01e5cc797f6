//! Batches decided on the rows earlier batches read (the worker's known rows,
//! without a load): a token revoked, a profile disabled or enabled again
//! between two batches takes effect on the second all the same. The worker's
//! counters show how each batch was decided, so the test knows the second one
//! really was decided on known rows, and that its commit found them changed.

use profile_worker_testkit::*;
use std::time::Duration;

/// A worker of its own (its counters are this test's alone), ops HTTP on.
async fn worker(env: &Env) -> WorkerProcess {
    worker_with(env, &[]).await
}

async fn worker_with(env: &Env, vars: &[(&str, &str)]) -> WorkerProcess {
    let mut cmd = worker_process(env);
    cmd.env("HTTP_ADDR", "127.0.0.1:0")
        .envs(vars.iter().copied());
    WorkerProcess::start(cmd, None).await
}

async fn stop(mut w: WorkerProcess) {
    signal(&w, SIGTERM);
    let stopped = tokio::time::timeout(Duration::from_secs(30), w.wait()).await;
    assert!(stopped.expect("stops within 30 s").unwrap().success());
}

/// How many batches were decided on known rows, loaded, and found changed.
async fn decided(w: &WorkerProcess) -> [f64; 3] {
    let (_, page) = http_get(w.http(), "/metrics").await.expect("metrics");
    let m = samples(&page);
    ["known", "loaded", "changed"].map(|on| {
        m.get(&format!(
            "profile_worker_batches_decided_total{{on=\"{on}\"}}"
        ))
        .copied()
        .unwrap_or_else(|| panic!("no {on} count in\n{page}"))
    })
}

async fn status(env: &Env, token: &str, profile: &str) -> (i64, Option<String>) {
    let r = env.call("create-ticket", ticket(token, profile)).await;
    let code = r.body["errorCode"].as_str().map(str::to_string);
    (r.status, code)
}

const OK: (i64, Option<String>) = (200, None);

fn refused(code: &str) -> (i64, Option<String>) {
    (403, Some(code.to_string()))
}

#[tokio::test]
async fn a_token_revoked_or_a_profile_disabled_between_two_batches_counts_on_the_second() {
    let env = Env::prepare().await;
    let w = worker(&env).await;

    // The first batch loads; the second is decided on what the first read.
    assert_eq!(status(&env, ADMIN_TOKEN, ENABLED_PROFILE).await, OK);
    assert_eq!(decided(&w).await, [0.0, 1.0, 0.0]);
    assert_eq!(status(&env, ADMIN_TOKEN, ENABLED_PROFILE).await, OK);
    assert_eq!(decided(&w).await, [1.0, 1.0, 0.0]);

    // Revoked as an operator revokes: the next batch, decided on the known
    // token, fails its commit, is loaded again and refused.
    let out = cli(&env, &["access-tokens", "revoke", ADMIN_TOKEN])
        .env("DATABASE_URL", &env.owner_db_url)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        status(&env, ADMIN_TOKEN, ENABLED_PROFILE).await,
        refused("NO_SUCH_ACCESS_TOKEN_ID")
    );
    assert_eq!(decided(&w).await, [1.0, 2.0, 1.0]);

    // A profile disabled, then enabled again.
    assert_eq!(
        status(&env, OTHER_TENANT_TOKEN, OTHER_TENANT_PROFILE).await,
        OK
    );
    assert_eq!(
        status(&env, OTHER_TENANT_TOKEN, OTHER_TENANT_PROFILE).await,
        OK
    );
    assert_eq!(decided(&w).await, [2.0, 3.0, 1.0]);
    let set_enabled = |on: bool| {
        let db = &env.db;
        async move {
            db.execute(
                "UPDATE profiles SET enabled = $1 WHERE id = $2",
                &[&on, &OTHER_TENANT_PROFILE],
            )
            .await
            .unwrap();
        }
    };
    set_enabled(false).await;
    assert_eq!(
        status(&env, OTHER_TENANT_TOKEN, OTHER_TENANT_PROFILE).await,
        refused("DISABLED_PROFILE")
    );
    assert_eq!(decided(&w).await, [2.0, 4.0, 2.0]);
    // The disabled profile is now what is known; a refusal that is remembered
    // is written, so checked, and may be decided on it.
    assert_eq!(
        status(&env, OTHER_TENANT_TOKEN, OTHER_TENANT_PROFILE).await,
        refused("DISABLED_PROFILE")
    );
    assert_eq!(decided(&w).await, [3.0, 4.0, 2.0]);
    set_enabled(true).await;
    assert_eq!(
        status(&env, OTHER_TENANT_TOKEN, OTHER_TENANT_PROFILE).await,
        OK
    );
    assert_eq!(decided(&w).await, [3.0, 5.0, 3.0]);

    // A refusal that writes nothing (an expired token) is never decided on
    // known rows: nothing would check them. Both batches load.
    for _ in 0..2 {
        let (code, _) = status(&env, EXPIRED_TOKEN, ENABLED_PROFILE).await;
        assert_eq!(code, 403);
    }
    assert_eq!(decided(&w).await, [3.0, 7.0, 3.0]);

    stop(w).await;
    env.teardown().await;
}

/// A profile is known with its last emails; another worker's email claim
/// (not seen here) fails the commit's cooldown check, and the batch is loaded
/// and refused, as if it had been loaded in the first place.
#[tokio::test]
async fn an_email_another_worker_claimed_meanwhile_counts_on_the_next_batch() {
    let env = Env::prepare_with(|s| s.worker.email_cooldown_secs = 60).await;
    let w = worker(&env).await;
    let verify = |profile: &'static str, purpose: &'static str| {
        let env = &env;
        async move {
            let body = serde_json::json!({ "accessTokenId": ADMIN_TOKEN, "id": profile, "purpose": purpose });
            let r = env.call("create-verification-token", body).await;
            (r.status, r.body["errorCode"].as_str().map(str::to_string))
        }
    };
    let too_soon = (429, Some("TOO_MANY_REQUESTS".to_string()));

    assert_eq!(verify(ENABLED_PROFILE, "verify-account").await, OK);
    assert_eq!(decided(&w).await, [0.0, 1.0, 0.0]);
    // Known, with the email just claimed: another purpose goes ahead on it…
    assert_eq!(verify(ENABLED_PROFILE, "reset-password").await, OK);
    assert_eq!(decided(&w).await, [1.0, 1.0, 0.0]);
    // …and the same purpose is refused (a refusal is always loaded).
    assert_eq!(verify(ENABLED_PROFILE, "verify-account").await, too_soon);
    assert_eq!(decided(&w).await, [1.0, 2.0, 0.0]);

    // Known without an email; then another worker sends one.
    assert_eq!(status(&env, ADMIN_TOKEN, OTHER_TENANT_PROFILE).await, OK);
    assert_eq!(decided(&w).await, [1.0, 3.0, 0.0]);
    env.db
        .execute(
            "INSERT INTO email_cooldowns (profile_id, purpose, requested_at) VALUES ($1, 'verify-account', now())",
            &[&OTHER_TENANT_PROFILE],
        )
        .await
        .unwrap();
    assert_eq!(
        verify(OTHER_TENANT_PROFILE, "verify-account").await,
        too_soon
    );
    assert_eq!(decided(&w).await, [1.0, 4.0, 1.0]);
    assert_eq!(
        env.count("verification_tokens").await,
        2,
        "nothing written twice"
    );

    stop(w).await;
    env.teardown().await;
}

/// `KNOWN_ROWS=0` keeps nothing: every batch is loaded, as before known rows.
#[tokio::test]
async fn with_known_rows_off_every_batch_is_loaded() {
    let env = Env::prepare().await;
    let w = worker_with(&env, &[("KNOWN_ROWS", "0")]).await;
    for _ in 0..3 {
        assert_eq!(status(&env, ADMIN_TOKEN, ENABLED_PROFILE).await, OK);
    }
    assert_eq!(decided(&w).await, [0.0, 3.0, 0.0]);
    stop(w).await;
    env.teardown().await;
}
