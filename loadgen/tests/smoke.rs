//! `profile-worker-bench` end to end, small: real worker processes, the real
//! broker and database, every reply, row, email event and dead letter checked by
//! the bench itself. Correctness only: no speed is asserted here (speed lives in
//! BENCHMARKS.md, measured by the bench, never by a test).

use std::process::Command;

fn bench(args: &[&str]) -> (std::process::Output, serde_json::Value) {
    let admin = std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| {
        "postgres://profile_worker_owner:profile_worker_owner@127.0.0.1:5432/postgres".into()
    });
    // The bench runs the `profile-worker` beside it, which the workspace's test
    // run builds for the product's own integration tests.
    let bench = std::path::Path::new(env!("CARGO_BIN_EXE_profile-worker-bench"));
    let worker = bench.with_file_name(format!("profile-worker{}", std::env::consts::EXE_SUFFIX));
    assert!(
        worker.is_file(),
        "{} is missing: run the workspace's tests (`cargo test --workspace`) or `cargo build -p profile-worker`",
        worker.display()
    );
    let json = std::env::temp_dir().join(format!("bench-smoke-{}.jsonl", uuid::Uuid::new_v4()));
    let out = Command::new(bench)
        .args(args)
        .arg("--json")
        .arg(&json)
        .env("DATABASE_URL", admin)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run profile-worker-bench");
    let report = std::fs::read_to_string(&json)
        .ok()
        .and_then(|t| serde_json::from_str(t.lines().next()?).ok())
        .unwrap_or(serde_json::Value::Null);
    let _ = std::fs::remove_file(&json);
    (out, report)
}

#[test]
fn two_thousand_commands_all_answered_stored_and_announced_correctly() {
    let (out, r) = bench(&[
        "--commands",
        "2000",
        "--in-flight",
        "200",
        "--rounds",
        "1",
        "--warmup",
        "100",
        "--invalid-share",
        "0.1",
        "--ceiling",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");
    let checks = &r["checks"];
    assert_eq!(checks["problems"], serde_json::json!([]), "{stdout}");
    // 2,100 commands (warm-up included), 10 % refused: 400, 403 and 404 in turn.
    let expected = &checks["expected"];
    assert_eq!(
        expected["tickets"].as_u64().unwrap() + expected["verification_tokens"].as_u64().unwrap(),
        1890
    );
    assert_eq!(checks["tickets"], expected["tickets"]);
    assert_eq!(
        checks["verification_tokens"],
        expected["verification_tokens"]
    );
    assert_eq!(checks["dead_letters"], expected["dead_letters"]);
    assert!(expected["dead_letters"].as_u64().unwrap() > 0);
    assert!(
        checks["email_requested"].as_u64().unwrap()
            >= expected["verification_tokens"].as_u64().unwrap()
    );
    for round in r["rounds"].as_array().unwrap() {
        assert_eq!(round["wrong"], 0, "{round}");
        assert_eq!(round["commands"], 2000);
    }
    assert!(
        r["ratio"].as_f64().unwrap() > 0.0,
        "the ceiling ran: {stdout}"
    );
    assert!(stdout.contains("all correct"), "{stdout}");
}

#[test]
fn the_events_ceiling_publishes_the_contracts_events_for_every_command() {
    let (out, r) = bench(&[
        "--commands",
        "1000",
        "--in-flight",
        "100",
        "--rounds",
        "2",
        "--warmup",
        "0",
        "--ceiling-events",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");
    assert_eq!(r["checks"]["problems"], serde_json::json!([]), "{stdout}");
    assert_eq!(r["ceiling_events"], true);
    let rounds_of = |target: &str| -> Vec<serde_json::Value> {
        r["rounds"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["target"] == target)
            .cloned()
            .collect()
    };
    let events_rounds = rounds_of("ceiling-events");
    assert_eq!(events_rounds.len(), 2, "{stdout}");
    assert_eq!(
        rounds_of("ceiling").len(),
        2,
        "--ceiling-events adds a third target to the plain ceiling's rounds"
    );
    // Both rounds send the same commands, half of them create-verification-token:
    // each got its email.requested from the echo, as from the worker.
    let tokens_per_round = events_rounds[0]["expected"]["verification_tokens"]
        .as_u64()
        .unwrap();
    assert!(tokens_per_round > 0);
    assert_eq!(
        r["checks"]["ceiling_email_requested"].as_u64().unwrap(),
        2 * tokens_per_round,
        "{stdout}"
    );
    for ratio in ["ratio", "ratio_to_events_ceiling", "events_bound"] {
        assert!(r[ratio].as_f64().unwrap() > 0.0, "{ratio}: {stdout}");
    }
    assert!(stdout.contains("ceiling with events"), "{stdout}");
}

#[test]
fn a_worker_that_cannot_start_fails_the_bench_with_its_log() {
    let (out, _) = bench(&["--commands", "10", "--worker-bin", "/bin/false"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("exited"), "{stderr}");
}

#[test]
fn fixed_rates_report_every_partys_cpu_and_run_queue_and_the_knee() {
    let (out, r) = bench(&[
        "--commands",
        "500",
        "--in-flight",
        "100",
        "--rounds",
        "1",
        "--warmup",
        "0",
        "--ceiling-events",
        "--rates",
        "200,400",
        "--rate-secs",
        "1",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");
    assert_eq!(r["checks"]["problems"], serde_json::json!([]), "{stdout}");
    let at = r["fixed_rates"].as_array().expect("fixed_rates");
    assert_eq!(at.len(), 6, "two rates × three targets: {stdout}");
    for a in at {
        let cpu = &a["cpu_per_1k"];
        assert!(cpu["total"].as_f64().unwrap() > 0.0, "{a}");
        assert!(cpu["broker"].as_f64().unwrap() > 0.0, "{a}");
        assert!(a["run_queue_per_1k"].as_f64().unwrap() >= 0.0, "{a}");
        match a["target"].as_str().unwrap() {
            // The worker's rounds cost the worker and PostgreSQL, and the
            // events' consumers drain what it announced.
            "worker" => {
                assert!(cpu["worker"].as_f64().unwrap() > 0.0, "{a}");
                assert!(cpu["postgres"].as_f64().unwrap() > 0.0, "{a}");
                assert!(cpu["drain"].as_f64().unwrap() > 0.0, "{a}");
            }
            // The echoes are processes of their own.
            _ => assert!(cpu["echo"].as_f64().unwrap() > 0.0, "{a}"),
        }
    }
    // Every round of each rate was offered that rate, latency from its schedule.
    for round in r["rounds"].as_array().unwrap() {
        if let Some(rate) = round["fixed_rate"].as_f64() {
            assert_eq!(round["offered_rate"].as_f64(), Some(rate), "{round}");
        }
    }
    let knee = r["knee"].as_object().expect("knee");
    assert_eq!(knee.len(), 3, "{stdout}");
    assert!(stdout.contains("knee worker"), "{stdout}");
}

/// The lanes benchmark (`--import`), small: an interactive caller before and
/// during an import into each lane; every imported command answered, the
/// caller's every call a 200, every row there.
#[test]
fn an_import_into_each_lane_is_drained_while_the_caller_is_answered() {
    let (out, r) = bench(&[
        "--import",
        "3000",
        "--rounds",
        "1",
        "--idle-secs",
        "1",
        "--profiles",
        "50",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");
    assert_eq!(r["problems"], serde_json::json!([]), "{stdout}");
    let rows = r["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2, "{r}");
    for (row, lane) in rows.iter().zip(["interactive", "bulk"]) {
        assert_eq!(row["lane"], lane);
        assert_eq!(row["import"], 3000);
        assert!(row["idle_calls"].as_u64().unwrap() > 0, "{row}");
        assert!(row["drain_rate"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["cpu_per_1k"]["broker"].is_number(), "{row}");
    }
    assert!(stdout.contains("import into"), "the table: {stdout}");
}
