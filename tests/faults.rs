//! Fault injection against the real servers (CONTRACT §6): kill -9, a RabbitMQ
//! restart, a PostgreSQL restart and a 60 s PostgreSQL outage, each in the middle
//! of a burst of 10,000 commands with unique message_ids (both commands, accepted,
//! refused and malformed). After each run every guarantee is checked from the
//! outside: replies, rows, email events and dead letters.
//!
//! These tests stop the shared RabbitMQ and PostgreSQL servers, so they run one
//! at a time (cargo runs test binaries one after another, so no other test sees
//! the outage). They need the servers on this machine and the right to control
//! them (`rabbitmqctl`, `pg_ctlcluster`): the README's test command gives both.

use profile_worker_testkit::burst::{Run, BURST};
use profile_worker_testkit::*;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn worker_cpu_secs(pid: u32) -> f64 {
    cpu_secs(pid).expect("/proc/PID/stat of the worker")
}

async fn control(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("{program}: {e} (fault tests need the servers on this machine)")
        });
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pg_cluster() -> (String, String) {
    let out = std::process::Command::new("pg_lsclusters")
        .arg("-h")
        .output()
        .expect("pg_lsclusters (fault tests need PostgreSQL from Debian's packages)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("5432"))
        .or_else(|| text.lines().next())
        .expect("a PostgreSQL cluster");
    let mut f = line.split_whitespace();
    (f.next().unwrap().to_string(), f.next().unwrap().to_string())
}

async fn postgres(action: &str) {
    let (ver, name) = pg_cluster();
    let mut args = vec![ver.as_str(), name.as_str(), action];
    if action == "stop" {
        args.extend(["-m", "fast"]);
    }
    control("pg_ctlcluster", &args).await;
    if action == "start" {
        // Ready when it accepts connections again.
        for _ in 0..200 {
            if tokio_postgres::connect(&admin_db_url(), tokio_postgres::NoTls)
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("PostgreSQL did not come back");
    }
}

#[tokio::test]
async fn kill_9_five_times_during_a_burst_loses_and_duplicates_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let run = Run::prepare().await;
    run.burst_with(500, |mut worker, run| async move {
        for k in 0..5 {
            signal(&worker, SIGKILL);
            let _ = worker.wait().await;
            let done = run.processed().await;
            eprintln!("kill {}: {done} of {BURST} processed", k + 1);
            worker = run.spawn_worker().await;
            // Let it get some way before the next kill; the kills land mid-burst.
            run.wait_processed(done + 700, Duration::from_secs(60))
                .await;
        }
        let done = run.processed().await;
        assert!(
            done < 9_000,
            "the last kill landed before the end ({done} processed)"
        );
        (worker, run)
    })
    .await;
}

/// Issue 32: an import in the bulk lane and callers in the interactive lane,
/// the worker killed with -9 three times mid-burst: in either lane nothing is
/// lost and nothing is done twice.
#[tokio::test]
async fn kill_9_mid_import_in_both_lanes_loses_and_duplicates_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let run = Run::prepare().await;
    let (sent, commands) = run.plan_burst();
    // Every other command into the bulk lane.
    let commands = commands
        .into_iter()
        .enumerate()
        .map(|(i, c)| if i % 2 == 0 { c.into_bulk() } else { c })
        .collect();
    run.burst_of((sent, commands), 500, |mut worker, run| async move {
        for k in 0..3 {
            signal(&worker, SIGKILL);
            let _ = worker.wait().await;
            let done = run.processed().await;
            eprintln!("kill {}: {done} of {BURST} processed", k + 1);
            worker = run.spawn_worker().await;
            run.wait_processed(done + 1_000, Duration::from_secs(60))
                .await;
        }
        let done = run.processed().await;
        assert!(
            done < 9_000,
            "the last kill landed before the end ({done} processed)"
        );
        (worker, run)
    })
    .await;
}

/// What a consumer logs (at debug) when it has committed a batch while the one
/// before it still waits for its confirms: two batches in flight.
const OVERLAP: &str = "prepared a batch while the previous one awaited its confirms";

#[tokio::test]
async fn kill_9_while_two_batches_are_in_flight_loses_and_duplicates_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let run = Run::prepare().await;
    let (sent, commands) = run.plan_burst();
    run.publish(&commands, 500, Duration::ZERO).await;
    let filter = "info,profile_worker::worker=debug";
    let mut worker = run.spawn_worker_logging(filter).await;
    for k in 0..3 {
        // Some way into the burst, then the next moment a consumer has committed
        // one batch while the batch before it waits for its confirms: kill -9.
        // (500 apart: waiting for the overlap can take a while on a loaded
        // machine, and at 700 the third kill once came at 9,000 of 10,000.)
        let done = run.processed().await;
        run.wait_processed(done + 500, Duration::from_secs(60))
            .await;
        let seen = worker.log_text().matches(OVERLAP).count();
        let overlapping = worker
            .wait_for_log(Duration::from_secs(60), |log| {
                log.matches(OVERLAP).count() > seen
            })
            .await;
        assert!(overlapping, "the worker overlapped two batches");
        signal(&worker, SIGKILL);
        let _ = worker.wait().await;
        eprintln!(
            "kill {} with two batches in flight: {} of {BURST} processed",
            k + 1,
            run.processed().await
        );
        worker = run.spawn_worker_logging(filter).await;
    }
    let done = run.processed().await;
    assert!(done < BURST * 9 / 10, "the kills landed mid-burst ({done})");
    run.complete(worker, &sent).await;
}

#[tokio::test]
async fn rabbitmq_restart_mid_burst_the_worker_reconnects_and_finishes() {
    let _one = ONE_AT_A_TIME.lock().await;
    let run = Run::prepare().await;
    let (sent, commands) = run.plan_burst();
    let (first, rest) = commands.split_at(BURST / 2);
    run.publish(first, 500, Duration::ZERO).await;
    let worker = run.spawn_worker().await;
    let http = worker.http().to_string();
    assert!(run.wait_processed(1_000, Duration::from_secs(120)).await >= 1_000);
    // The second half is published, slowly enough to span the stop, while the
    // broker goes away and comes back; the publisher re-sends what was not confirmed.
    let restart = async {
        control("rabbitmqctl", &["-q", "stop_app"]).await;
        let (down, _) = tokio::join!(
            http_until(&http, "/readyz", Duration::from_secs(3), |s, b| {
                s == 503 && b.contains("broker")
            }),
            tokio::time::sleep(Duration::from_secs(3))
        );
        control("rabbitmqctl", &["-q", "start_app"]).await;
        control("rabbitmqctl", &["-q", "await_startup"]).await;
        let up = http_until(&http, "/readyz", Duration::from_secs(30), |s, _| s == 200).await;
        (run.processed().await, down, up)
    };
    let (resent, (before, down, up)) =
        tokio::join!(run.publish(rest, 100, Duration::from_millis(50)), restart);
    assert!(
        matches!(&down, Some((503, b)) if b.contains("not consuming")),
        "/readyz is 503 while the broker is away: {down:?}"
    );
    assert_eq!(up.map(|a| a.0), Some(200), "ready again once reconsuming");
    let metrics = samples(&http_get(&http, "/metrics").await.expect("metrics").1);
    let reconnects = metrics
        .get("profile_worker_reconnects_total")
        .expect("reconnects are counted");
    assert!(*reconnects >= 1.0, "{metrics:?}");
    eprintln!(
        "RabbitMQ back: {before} of {BURST} processed; {resent} commands re-sent by the publisher"
    );
    assert!(
        before < BURST * 9 / 10,
        "restart landed mid-burst ({before})"
    );
    run.complete(worker, &sent).await;
}

#[tokio::test]
async fn postgres_restart_mid_burst_holds_commands_and_resumes() {
    let _one = ONE_AT_A_TIME.lock().await;
    let run = Run::prepare().await;
    run.burst_with(1_000, |worker, run| async move {
        postgres("stop").await;
        let pid = worker.id().unwrap();
        let cpu = worker_cpu_secs(pid);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let waiting = worker_cpu_secs(pid) - cpu;
        eprintln!("worker CPU while Postgres was down 5 s: {waiting:.2} s");
        assert!(
            waiting < 0.5,
            "backs off instead of spinning: {waiting} s of CPU in 5 s"
        );
        postgres("start").await;
        (worker, run)
    })
    .await;
}

#[tokio::test]
async fn postgres_unreachable_for_60_s_reports_not_ready_and_recovers() {
    let _one = ONE_AT_A_TIME.lock().await;
    let run = Run::prepare().await;
    run.burst_with(1_000, |mut worker, run| async move {
        let http = worker.http().to_string();
        let ready = |s: u16, _: &str| s == 200;
        let before = http_until(&http, "/readyz", Duration::from_secs(10), ready).await;
        assert_eq!(before.map(|a| a.0), Some(200), "ready while consuming");
        postgres("stop").await;
        let down = http_until(&http, "/readyz", Duration::from_secs(15), |s, b| {
            s == 503 && b.contains("database")
        })
        .await;
        assert!(
            matches!(&down, Some((503, b)) if b.contains("\"database\":\"unavailable\"")),
            "/readyz says the database is missing: {down:?}"
        );
        let pid = worker.id().unwrap();
        let cpu = worker_cpu_secs(pid);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let waiting = worker_cpu_secs(pid) - cpu;
        eprintln!("worker CPU while Postgres was down 60 s: {waiting:.2} s");
        assert!(
            worker.try_wait().unwrap().is_none(),
            "the worker is still running: {}",
            run.log_text()
        );
        assert!(
            waiting < 3.0,
            "backs off instead of spinning: {waiting} s of CPU in 60 s"
        );
        assert!(
            run.log_text().contains("not ready"),
            "says it is not ready: {}",
            run.log_text()
        );
        assert_eq!(
            http_get(&http, "/readyz").await.map(|a| a.0),
            Some(503),
            "still not ready after 60 s"
        );
        assert_eq!(
            http_get(&http, "/healthz").await.map(|a| a.0),
            Some(200),
            "alive all along"
        );
        postgres("start").await;
        let back = http_until(&http, "/readyz", Duration::from_secs(30), ready).await;
        assert_eq!(
            back.map(|a| a.0),
            Some(200),
            "ready again once Postgres is back"
        );
        (worker, run)
    })
    .await;
}
