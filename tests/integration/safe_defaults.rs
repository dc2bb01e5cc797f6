//! Safe by default (issue 31): where an email may point and whom it may
//! reach, what an operator's clock and shell leak. Each test failed on the
//! build before the change (the note on issue 31 says how).

use profile_worker_testkit::*;
use serde_json::json;

/// `cmd` run with `input` on its standard input: (success, stdout, stderr).
async fn with_stdin(cmd: tokio::process::Command, input: &str) -> (bool, String, String) {
    let out = output_with_input(cmd, input).await;
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A caller with MANAGE_PROFILES could have a victim's reset token emailed to
/// the victim inside a link to a host of its own: a tenant without linkHosts
/// now takes links to the host of the worker's VERIFICATION_URL only.
#[tokio::test]
async fn a_tenant_without_link_hosts_takes_links_to_the_workers_own_host_only() {
    let env = Env::start().await;
    let linked = |url: &str| {
        json!({"accessTokenId": ADMIN_TOKEN, "id": ENABLED_PROFILE,
               "purpose": "reset-password", "verificationUrl": url})
    };
    let r = env
        .call(
            "create-verification-token",
            linked("https://attacker.test/steal"),
        )
        .await;
    assert_eq!(
        (r.status, r.body.clone()),
        (
            400,
            json!({"errorCode": "PARAM_DESERIALIZATION_ERROR",
                   "message": "verificationUrl host \"attacker.test\" is not allowed for tenant \"default\""})
        ),
        "{}",
        r.raw
    );
    // The worker's own host (testkit's VERIFICATION_URL is on example.com),
    // with another path, is the tenant's own app.
    let r = env
        .call(
            "create-verification-token",
            linked("https://EXAMPLE.com/reset"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    let emails: Vec<_> = env
        .events(3)
        .await
        .into_iter()
        .filter(|e| e.routing_key == "email.requested")
        .collect();
    assert_eq!(emails.len(), 1, "one email, for the allowed link only");
    let link = emails[0].json()["verificationLink"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        link.starts_with("https://EXAMPLE.com/reset?tokenId="),
        "{link}"
    );
    assert!(env.dead_letters().await.is_empty(), "business rejections");
    env.teardown().await;
}

/// `victim@example.com, attacker@example.net` sent the link to both: a
/// profile whose email is not one bare address gets no token and no email.
/// Such profiles come from other systems writing the table (the seed refuses
/// them), so they are written here as such a system would.
#[tokio::test]
async fn a_profile_whose_email_is_not_one_address_gets_no_email() {
    let env = Env::start().await;
    for (id, email) in [
        ("two-addresses", "victim@example.com, attacker@example.net"),
        (
            "hidden-second",
            "\"victim@example.com\" <attacker@example.net>",
        ),
    ] {
        env.insert_profile(id, email, &json!({})).await;
        let r = env
            .call(
                "create-verification-token",
                json!({"accessTokenId": ADMIN_TOKEN, "id": id}),
            )
            .await;
        assert_eq!(r.status, 400, "{email}: {}", r.raw);
        assert_eq!(r.body["errorCode"], "INVALID_EMAIL_ADDRESS");
        assert_eq!(
            r.body["message"],
            format!("Invalid email address of profile \"{id}\": it must be one address (name@domain), without a display name or a list")
        );
        assert!(
            !r.raw.contains("attacker"),
            "the reply does not echo the address"
        );
        // A ticket sends no email: still made.
        let t = env.call("create-ticket", ticket(ADMIN_TOKEN, id)).await;
        assert_eq!(t.status, 200, "{}", t.raw);
    }
    assert_eq!(env.count("verification_tokens").await, 0);
    assert_eq!(env.count("email_cooldowns").await, 0, "no email claimed");
    let emails = env
        .events(2)
        .await
        .into_iter()
        .filter(|e| e.routing_key == "email.requested")
        .count();
    assert_eq!(emails, 0, "nothing for the dispatcher");
    assert!(
        env.dead_letters().await.is_empty(),
        "acked, not dead-lettered"
    );
    env.teardown().await;
}

/// `send` took the command, access token and all, as an argument, visible in
/// /proc/*/cmdline and in shell history. It reads standard input or a file;
/// an argument still works and says why not to.
#[tokio::test]
async fn send_reads_the_command_from_standard_input_or_a_file() {
    let env = Env::start().await;
    let body = ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string();
    let (ok, out, err) = with_stdin(cli(&env, &["send", "create-ticket"]), &body).await;
    assert!(ok && out.starts_with("200 "), "{out}{err}");
    assert!(!err.contains("warning"), "{err}");
    let (ok, out, _) = with_stdin(cli(&env, &["send", "create-ticket", "-"]), &body).await;
    assert!(ok && out.starts_with("200 "), "{out}");
    let dir = std::env::temp_dir().join(format!("pw-send-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("command.json");
    std::fs::write(&file, &body).unwrap();
    let (ok, out, err) = with_stdin(
        cli(
            &env,
            &["send", "create-ticket", "--file", file.to_str().unwrap()],
        ),
        "",
    )
    .await;
    assert!(ok && out.starts_with("200 "), "{out}{err}");
    std::fs::remove_dir_all(&dir).unwrap();
    // The old form works, with a warning that says why not.
    let (ok, out, err) = with_stdin(cli(&env, &["send", "create-ticket", &body]), "").await;
    assert!(ok && out.starts_with("200 "), "{out}");
    assert!(
        err.contains("warning") && err.contains("visible to every user of this machine"),
        "{err}"
    );
    assert_eq!(env.count("tickets").await, 4);
    // run.sh and the README teach the safe form.
    for doc in ["README.md", "scripts/run.sh"] {
        let text =
            std::fs::read_to_string(format!("{}/{doc}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert!(
            !text.contains("send create-ticket '"),
            "{doc} puts a command in an argument"
        );
    }
    env.teardown().await;
}

/// `rotate --grace` and `--expires-in` were reckoned on the CLI host's clock,
/// while the worker compares expiry with the database's: from a host 10
/// minutes slow, "at once" lasted 10 minutes. Now every time is the
/// database's `now()`, the rotating transaction's own: the old token's end is
/// the new token's creation to the microsecond.
#[tokio::test]
async fn rotate_and_create_reckon_time_on_the_database_clock() {
    let env = Env::prepare().await;
    let (ok, old_id, err) = with_stdin(
        cli(
            &env,
            &[
                "access-tokens",
                "create",
                "--application",
                "clock",
                "--tenant",
                "default=MANAGE_PROFILES",
                "--expires-in",
                "90d",
            ],
        ),
        "",
    )
    .await;
    assert!(ok, "{err}");
    let old_id = old_id.trim().to_string();
    // Interval as text: exact, to the microsecond.
    let lifetime: String = env
        .db
        .query_one(
            "SELECT (expires_on - created_at)::text FROM access_tokens WHERE application = 'clock'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        lifetime, "90 days",
        "expires 90 days after the database made it"
    );
    let (ok, new_id, err) = with_stdin(
        cli(&env, &["access-tokens", "rotate", "--grace", "0s"]),
        &format!("{old_id}\n"),
    )
    .await;
    assert!(ok, "{err}");
    assert_ne!(new_id.trim(), old_id);
    let same: bool = env
        .db
        .query_one(
            "SELECT o.expires_on = n.created_at FROM access_tokens o, access_tokens n \
             WHERE o.id_sha256 = sha256(convert_to($1, 'UTF8')) \
               AND n.id_sha256 = sha256(convert_to($2, 'UTF8'))",
            &[&old_id, &new_id.trim()],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        same,
        "the old token ends when the rotating transaction began, on the database's clock"
    );
    // With a grace, that much later, exactly.
    let (ok, newer_id, err) = with_stdin(
        cli(&env, &["access-tokens", "rotate", "--grace", "1h"]),
        &format!("{}\n", new_id.trim()),
    )
    .await;
    assert!(ok, "{err}");
    let grace: String = env
        .db
        .query_one(
            "SELECT (o.expires_on - n.created_at)::text FROM access_tokens o, access_tokens n \
             WHERE o.id_sha256 = sha256(convert_to($1, 'UTF8')) \
               AND n.id_sha256 = sha256(convert_to($2, 'UTF8'))",
            &[&new_id.trim(), &newer_id.trim()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(grace, "01:00:00");
    env.teardown().await;
}
