//! `profile-worker access-tokens` (CONTRACT §8), run as an operator runs it,
//! against a running worker: a made token works at once, a revoked one is
//! refused from the next batch on, a rotated one keeps working for its grace,
//! an ID is shown once and never again, and the runtime role may not do any of it.

use profile_worker_testkit::*;
use serde_json::Value;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Runs `access-tokens ARGS…` as the schema owner, `stdin` on its standard
/// input; returns (succeeded, stdout, stderr).
async fn tokens(env: &Env, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    tokens_as(env, &env.owner_db_url, args, stdin).await
}

async fn tokens_as(
    env: &Env,
    db_url: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> (bool, String, String) {
    let mut all = vec!["access-tokens"];
    all.extend_from_slice(args);
    let mut cmd = cli(env, &all);
    // Every log line there is, the database driver's included: none may hold an ID.
    cmd.env("DATABASE_URL", db_url)
        .env("RUST_LOG", "trace")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn profile-worker");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(text.as_bytes()).await.unwrap();
        drop(pipe);
    }
    let out = child.wait_with_output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `create … --json`: the new ID and what was stored.
async fn create(env: &Env, args: &[&str]) -> (String, Value) {
    let mut all = vec!["create", "--json"];
    all.extend_from_slice(args);
    let (ok, out, err) = tokens(env, &all, None).await;
    assert!(ok, "create failed: {err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    (v["id"].as_str().expect("the ID").to_string(), v)
}

async fn ticket_status(env: &Env, token: &str) -> (i64, Value) {
    let r = env
        .call("create-ticket", ticket(token, ENABLED_PROFILE))
        .await;
    (r.status, r.body)
}

#[tokio::test]
async fn a_made_token_works_at_once_and_a_revoked_one_from_the_next_batch() {
    let env = Env::start().await;
    let (id, made) = create(
        &env,
        &[
            "--application",
            "billing",
            "--tenant",
            "default=MANAGE_PROFILES,MANAGE_TICKETS",
            "--expires-in",
            "1h",
        ],
    )
    .await;
    assert!(uuid::Uuid::parse_str(&id).is_ok_and(|u| u.get_version_num() == 4));
    assert_eq!(made["application"], "billing");
    assert_eq!(made["tenantPermissions"][0]["tenant"], "default");
    let expires = made["expiresOn"].as_i64().unwrap();
    let now = profile_worker::broker::properties::now_ms() as i64;
    assert!((expires - now - 3_600_000).abs() < 60_000, "{made}");
    assert_eq!(ticket_status(&env, &id).await.0, 200);
    // Its permissions are what was given, in order: no tickets on another tenant.
    let r = env
        .call("create-ticket", ticket(&id, OTHER_TENANT_PROFILE))
        .await;
    assert_eq!(
        (r.status, r.body["errorCode"].as_str()),
        (403, Some("ACTION_DENIED"))
    );

    // Revoked through standard input (no ID on the command line).
    let (ok, out, err) = tokens(&env, &["revoke"], Some(&format!("{id}\n"))).await;
    assert!(ok, "{err}");
    assert!(out.contains("billing"), "{out}");
    let (status, body) = ticket_status(&env, &id).await;
    assert_eq!(
        (status, body["errorCode"].as_str()),
        (403, Some("NO_SUCH_ACCESS_TOKEN_ID"))
    );
    // Revoking it again says there is no such token, and fails.
    let (ok, _, err) = tokens(&env, &["revoke", &id], None).await;
    assert!(!ok && err.contains("no access token has that ID"), "{err}");
    assert!(!err.contains(&id), "an error never echoes the ID: {err}");
    env.teardown().await;
}

#[tokio::test]
async fn a_rotated_token_works_until_its_grace_ends_and_the_new_one_at_once() {
    let env = Env::start().await;
    let (old, _) = create(
        &env,
        &["--application", "crm", "--master", "--tenant", "*=*"],
    )
    .await;
    let (ok, out, err) = tokens(
        &env,
        &["rotate", "--grace", "4s", "--json", "-"],
        Some(&old),
    )
    .await;
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let new = v["id"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_eq!(v["application"], "crm");
    assert_eq!(v["master"], true);
    assert_eq!(v["tenantPermissions"][0]["allowedActions"][0], "*");
    assert_eq!(
        v["expiresOn"],
        Value::Null,
        "the new token keeps the old one's expiry"
    );
    assert!(v["replaces"]["expiresOn"].is_i64(), "{v}");
    assert_eq!(ticket_status(&env, &new).await.0, 200);
    assert_eq!(
        ticket_status(&env, &old).await.0,
        200,
        "the old one, within its grace"
    );
    let grace_ends = v["replaces"]["expiresOn"].as_i64().unwrap();
    let wait = grace_ends - profile_worker::broker::properties::now_ms() as i64 + 200;
    tokio::time::sleep(Duration::from_millis(wait.max(0) as u64)).await;
    let (status, body) = ticket_status(&env, &old).await;
    assert_eq!(
        (status, body["errorCode"].as_str()),
        (403, Some("ACCESS_DENIED")),
        "{body}"
    );
    assert_eq!(ticket_status(&env, &new).await.0, 200);
    // Without a grace, the old one stops at once.
    let (ok, out, _) = tokens(&env, &["rotate", &new], None).await;
    assert!(ok);
    let newest = out.trim().to_string();
    assert_eq!(ticket_status(&env, &new).await.0, 403);
    assert_eq!(ticket_status(&env, &newest).await.0, 200);
    env.teardown().await;
}

#[tokio::test]
async fn an_id_is_shown_once_and_list_never_shows_more_than_eight_characters() {
    let env = Env::prepare().await;
    let mut ids = Vec::new();
    for app in ["alpha", "beta"] {
        // The text form: the ID alone on stdout, a note on stderr.
        let (ok, out, err) = tokens(
            &env,
            &[
                "create",
                "--application",
                app,
                "--tenant",
                "default=MANAGE_PROFILES",
            ],
            None,
        )
        .await;
        assert!(ok, "{err}");
        let id = out.trim().to_string();
        assert_eq!(out, format!("{id}\n"), "the ID alone on stdout");
        assert!(err.contains("shown this once"), "{err}");
        // Text logs (at trace here) written to a pipe carry no colour codes.
        assert!(err.contains("TRACE"), "{err}");
        assert!(
            !err.contains('\u{1b}'),
            "colour codes in a log that is no terminal"
        );
        assert!(!err.contains(&id[..9]), "no log line holds the ID: {err}");
        ids.push(id);
    }
    let (_, rotated) = (ids[0].clone(), {
        let (ok, out, _) = tokens(&env, &["rotate", "--grace", "1h"], Some(&ids[0])).await;
        assert!(ok);
        out.trim().to_string()
    });
    ids.push(rotated);
    for args in [
        vec!["list"],
        vec!["list", "--json"],
        vec!["list", "--application", "alpha"],
    ] {
        let (ok, out, err) = tokens(&env, &args, None).await;
        assert!(ok, "{err}");
        for id in &ids {
            let chars: Vec<char> = id.chars().collect();
            for w in chars.windows(9) {
                let piece: String = w.iter().collect();
                assert!(
                    !out.contains(&piece) && !err.contains(&piece),
                    "`{}` shows 9 characters of an ID: {out}",
                    args.join(" ")
                );
            }
            if args.len() < 3 {
                assert!(
                    out.contains(&id[..8]),
                    "every token listed by its prefix: {out}"
                );
            }
        }
        if args == ["list", "--json"] {
            let v: Value = serde_json::from_str(out.trim()).unwrap();
            let listed = v.as_array().unwrap();
            // The fixtures' four tokens, and the three made here.
            assert_eq!(listed.len(), 7, "{v}");
            assert!(listed.iter().all(|t| t.get("id").is_none()));
            assert!(listed
                .iter()
                .all(|t| t["idPrefix"].as_str().unwrap().chars().count() <= 8));
        }
    }
    // Nothing but the hash and the prefix is stored.
    for id in &ids {
        let row = env
            .db
            .query_one(
                "SELECT count(*) FROM access_tokens WHERE id_sha256 = sha256(convert_to($1, 'UTF8')) \
                 AND id_prefix = left($1, 8)",
                &[id],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), 1);
    }
    env.teardown().await;
}

#[tokio::test]
async fn the_runtime_role_may_not_administer_tokens() {
    let env = Env::prepare().await;
    let runtime = env
        .settings
        .database
        .database_url
        .expose_secret()
        .to_string();
    for args in [
        vec!["create", "--application", "x", "--tenant", "*=*"],
        vec!["list"],
        vec!["revoke", ADMIN_TOKEN],
        vec!["rotate", ADMIN_TOKEN],
    ] {
        let (ok, out, err) = tokens_as(&env, &runtime, &args, None).await;
        assert!(
            !ok,
            "`{}` ran under the runtime role: {out}",
            args.join(" ")
        );
        assert!(
            err.contains("may not administer access tokens")
                && err.contains("schema owner's DATABASE_URL"),
            "`{}`: {err}",
            args.join(" ")
        );
        assert!(out.is_empty(), "{out}");
    }
    assert_eq!(
        env.count("access_tokens").await,
        4,
        "nothing was made or revoked"
    );
    env.teardown().await;
}
