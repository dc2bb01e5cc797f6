//! The shipped alert rules and dashboard against Debian's real Prometheus:
//! promtool checks and unit-tests the rules, then a Prometheus loaded with them
//! scrapes a running worker, and every metric the rules and the dashboard name
//! must be among what it scraped (a renamed metric would leave an alert that
//! can never fire).

use profile_worker_testkit::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn deploy(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(dir)
}

async fn promtool(args: &[&str]) -> String {
    let out = tokio::process::Command::new("promtool")
        .args(args)
        .current_dir(deploy("prometheus"))
        .output()
        .await
        .expect("promtool (Debian's prometheus package; the README's test command installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}: {text}");
    text
}

/// Every `profile_worker_…` name in the rules and the dashboard.
fn named_metrics() -> Vec<String> {
    let mut names = std::collections::BTreeSet::new();
    for file in [
        deploy("prometheus").join("profile-worker.rules.yml"),
        deploy("grafana").join("profile-worker.json"),
    ] {
        let text = std::fs::read_to_string(&file).unwrap();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("profile_worker_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    names.into_iter().collect()
}

#[tokio::test]
async fn the_rules_pass_promtool_and_name_only_metrics_a_real_prometheus_scrapes() {
    promtool(&["check", "rules", "profile-worker.rules.yml"]).await;
    let tested = promtool(&["test", "rules", "profile-worker.rules.test.yml"]).await;
    assert!(tested.contains("SUCCESS"), "{tested}");
    // The dashboard is JSON Grafana can import.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana").join("profile-worker.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 8));

    let mut env = Env::prepare_with(|s| {
        s.worker.outbox_grace_secs = 1;
        s.worker.queue_depth_poll_secs = 1;
    })
    .await;
    env.start_worker().await;
    // Series that exist only once something happened: an answer of each kind,
    // an event in the outbox, a dead letter.
    assert_eq!(
        env.call("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE))
            .await
            .status,
        200
    );
    assert_eq!(
        env.call(
            "create-verification-token",
            verification(ADMIN_TOKEN, ENABLED_PROFILE)
        )
        .await
        .status,
        200
    );
    let bad = Send {
        message_id: Some(uuid::Uuid::new_v4().to_string()),
        ..Default::default()
    };
    assert_eq!(env.call_raw(b"{not json", bad).await.status, 400);

    // Prometheus, configured as the example is, scraping this test's worker.
    let dir = std::env::temp_dir().join(format!("{}-prometheus", env.db_name));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        deploy("prometheus").join("profile-worker.rules.yml"),
        dir.join("profile-worker.rules.yml"),
    )
    .unwrap();
    let example =
        std::fs::read_to_string(deploy("prometheus").join("prometheus.example.yml")).unwrap();
    let config = example
        .replace("127.0.0.1:8742", env.http())
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s");
    assert_ne!(config, example, "the example names the default target");
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    // Prometheus cannot report a port it chose itself; one the system just
    // had free will do.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let web = format!("127.0.0.1:{port}");
    let mut prometheus = tokio::process::Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus (Debian's package; the README's test command installs it)");

    let query = |q: String| {
        let web = web.clone();
        async move {
            let (_, body) = http_get(&web, &format!("/api/v1/query?query={q}")).await?;
            let v: Value = serde_json::from_str(&body).ok()?;
            Some(v["data"]["result"].as_array()?.len())
        }
    };
    let names = named_metrics();
    assert!(names.len() >= 10, "{names:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut missing = names.clone();
    while !missing.is_empty() && tokio::time::Instant::now() < deadline {
        let mut still = Vec::new();
        for name in &missing {
            if query(name.clone()).await.unwrap_or(0) == 0 {
                still.push(name.clone());
            }
        }
        missing = still;
        if !missing.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    assert!(
        missing.is_empty(),
        "named in the rules or dashboard, never scraped: {missing:?}"
    );
    // The rules loaded, and none is broken against real data.
    let (_, rules) = http_get(&web, "/api/v1/rules").await.expect("rules API");
    let rules: Value = serde_json::from_str(&rules).unwrap();
    let loaded: Vec<&Value> = rules["data"]["groups"][0]["rules"]
        .as_array()
        .expect("a rule group")
        .iter()
        .collect();
    let in_file = std::fs::read_to_string(deploy("prometheus").join("profile-worker.rules.yml"))
        .unwrap()
        .matches("- alert: ")
        .count();
    assert!(in_file >= 14, "{in_file} alerts in the file");
    assert_eq!(
        loaded.len(),
        in_file,
        "every alert of the file loaded: {rules}"
    );
    assert!(
        loaded.iter().all(|r| r["health"] != "err"),
        "a rule fails to evaluate: {rules}"
    );
    let _ = prometheus.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    env.teardown().await;
}
