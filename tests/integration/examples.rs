//! The publisher examples in other languages (examples/python with pika,
//! examples/node with amqplib), run against a real worker: direct reply-to,
//! a retry with the same message_id, fire-and-forget with confirms, and an
//! error's status and body. Their output and the rows they leave are checked.

use profile_worker_testkit::*;
use std::path::Path;
use std::time::Duration;

async fn run_example(env: &Env, program: &str, script: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new(program)
        .arg(root.join(script))
        .env("AMQP_URL", &env.servers.admin_amqp)
        .env("COMMAND_EXCHANGE", &env.settings.broker.command_exchange)
        // The import step, as the importer's user: the bulk lane only.
        .env("BULK_AMQP_URL", bulk_publisher_amqp_url())
        .env("BULK_EXCHANGE", &env.settings.broker.bulk_exchange)
        .env("ACCESS_TOKEN_ID", ADMIN_TOKEN)
        .env("PROFILE_ID", ENABLED_PROFILE)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("{program} {script}: {e} (the README's test command installs what it needs)")
        });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

async fn check(program: &str, script: &str) {
    let env = Env::start().await;
    let out = run_example(&env, program, script).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    assert!(lines[0].starts_with("create-ticket: 200 ticket "), "{out}");
    assert_eq!(lines[1], "retry with the same id: same reply True", "{out}");
    assert!(
        lines[2].starts_with("create-verification-token sent and confirmed: "),
        "{out}"
    );
    assert!(
        lines[3].starts_with("unknown token: 403 NO_SUCH_ACCESS_TOKEN_ID: "),
        "{out}"
    );
    assert_eq!(
        lines[4], "imported through the bulk lane: 3 commands confirmed",
        "{out}"
    );
    // Two tickets (the retry made none) and the three imported, the
    // fire-and-forget token and its email.
    let mut tickets = 0;
    for _ in 0..50 {
        tickets = env.count("tickets").await;
        if tickets == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(tickets, 5);
    let mut tokens = 0;
    for _ in 0..50 {
        tokens = env.count("verification_tokens").await;
        if tokens == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(tokens, 1, "the fire-and-forget command was processed");
    let emails = env
        .events(4)
        .await
        .into_iter()
        .filter(|e| e.routing_key == "email.requested")
        .count();
    assert_eq!(emails, 1);
    env.teardown().await;
}

#[tokio::test]
async fn the_python_publisher_example_talks_to_the_worker() {
    // The project's own virtual environment with pika (scripts/test.sh).
    let python = std::env::var("EXAMPLES_PYTHON").unwrap_or_else(|_| "python3".into());
    check(&python, "examples/python/publisher.py").await;
}

#[tokio::test]
async fn the_node_publisher_example_talks_to_the_worker() {
    check("node", "examples/node/publisher.js").await;
}
