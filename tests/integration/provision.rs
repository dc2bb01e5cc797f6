//! `profile-worker provision` against the real broker, worker and database: a
//! 5,000-line file of valid, refused and invalid lines, then the same file again,
//! which must create nothing and answer every line as before.

use profile_worker_testkit::*;
use serde_json::Value;
use tokio::process::Command;

async fn provision(
    env: &Env,
    input: &std::path::Path,
    output: &std::path::Path,
) -> std::process::Output {
    let b = &env.settings.broker;
    Command::new(env!("CARGO_BIN_EXE_profile-worker"))
        .arg("provision")
        .arg(input)
        .arg("--output")
        .arg(output)
        // As an importer: its broker user may publish to the bulk lane only,
        // where provision publishes by default.
        .env("AMQP_URL", bulk_publisher_amqp_url())
        .env("COMMAND_EXCHANGE", &b.command_exchange)
        .env("BULK_EXCHANGE", &b.bulk_exchange)
        .env("PROVISION_ACCESS_TOKEN", ADMIN_TOKEN)
        .output()
        .await
        .expect("run profile-worker provision")
}

fn results(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn a_file_is_provisioned_once_and_a_rerun_creates_nothing() {
    let env = Env::start().await;
    let dir = std::env::temp_dir().join(format!("provision-{}", env.db_name));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("input.ndjson");
    let mut lines = Vec::new();
    for i in 0..5000 {
        lines.push(match i % 10 {
            0..=3 => format!(r#"{{"type":"create-ticket","profileId":"{ENABLED_PROFILE}"}}"#),
            4..=7 => format!(r#"{{"type":"create-verification-token","id":"{ENABLED_PROFILE}"}}"#),
            8 if i % 20 == 8 => {
                format!(r#"{{"type":"create-ticket","profileId":"{DISABLED_PROFILE}"}}"#)
            }
            8 => "{not json".to_string(),
            _ => r#"{"type":"delete-profile","id":"x"}"#.to_string(),
        });
    }
    std::fs::write(&input, lines.join("\n")).unwrap();

    let first_out = dir.join("first.ndjson");
    let out = provision(&env, &input, &first_out).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "refused and invalid lines make the exit code non-zero"
    );
    assert!(
        stderr.contains("5000 lines: 200: 4000, 403 DISABLED_PROFILE: 250, invalid lines: 750"),
        "{stderr}"
    );
    assert!(
        stderr.contains("line 19: not a JSON object"),
        "invalid lines named by number: {stderr}"
    );
    let first = results(&first_out);
    assert_eq!(first.len(), 5000, "one result per input line");
    for (i, r) in first.iter().enumerate() {
        assert_eq!(r["line"], i + 1);
    }
    assert_eq!(first.iter().filter(|r| r["status"] == 200).count(), 4000);
    assert_eq!(env.count("tickets").await, 2000);
    assert_eq!(env.count("verification_tokens").await, 2000);
    assert!(
        env.dead_letters().await.is_empty(),
        "invalid lines are not sent"
    );

    let second_out = dir.join("second.ndjson");
    let out = provision(&env, &input, &second_out).await;
    assert!(!out.status.success());
    let second = results(&second_out);
    assert_eq!(second, first, "the same file answers every line as before");
    assert_eq!(env.count("tickets").await, 2000, "nothing created twice");
    assert_eq!(env.count("verification_tokens").await, 2000);
    assert_eq!(env.count("processed_commands").await, 4250);

    std::fs::remove_dir_all(&dir).unwrap();
    env.teardown().await;
}
