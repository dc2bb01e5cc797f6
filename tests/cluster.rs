//! Beyond one box: the worker against a three-node RabbitMQ cluster
//! (scripts/cluster.sh) and a PostgreSQL primary with a synchronous standby
//! (scripts/pg-standby.sh), a node or the primary killed in the middle of a few
//! thousand commands. Each run is checked from the outside as the fault tests
//! are (every reply, every row, every token's email.requested, exactly the
//! malformed commands dead-lettered), and reports its failover time: from the
//! kill until the first reply arrives, and the longest silence between replies.
//! Besides: the worker over amqps to the TLS node, and direct reply-to across
//! nodes.
//!
//! They kill servers, so they run one at a time. The README's test command
//! starts the cluster and the pair; run alone, `scripts/cluster.sh start` and
//! `scripts/pg-standby.sh start` first.

use profile_worker_testkit::burst::{Run, Sent};
use profile_worker_testkit::*;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Commands per run: a few thousand, published at about 1,000/s so the kill
/// lands while they are still arriving.
const COMMANDS: usize = 3_000;
const WINDOW: usize = 50;
const PAUSE: Duration = Duration::from_millis(50);

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Node N's AMQP port (scripts/cluster.sh).
fn port(n: u8) -> u16 {
    env_or("PW_CLUSTER_PORT", "5680").parse::<u16>().unwrap() + u16::from(n)
}

fn node_url(user: &str, n: u8) -> String {
    format!("amqp://{user}:{user}@127.0.0.1:{}/%2f", port(n))
}

/// The tests' admin user (guest) on node `n`.
fn admin(n: u8) -> String {
    format!("amqp://guest:guest@127.0.0.1:{}/%2f", port(n))
}

/// The worker's `AMQP_URL` for `nodes`: its least-privileged user on each.
fn worker_urls(nodes: &[u8]) -> String {
    nodes
        .iter()
        .map(|n| node_url("profile-worker-test", *n))
        .collect::<Vec<_>>()
        .join(",")
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

/// Runs a set-up script; its stdout.
async fn control(name: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new("bash")
        .arg(script(name))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        out.status.success(),
        "{name} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// All three nodes up and clustered (a test may have left one restarting).
async fn cluster_up() {
    control("cluster.sh", &["start"]).await;
}

/// The node a worker is connected to now: the last `connected` or
/// `reconnected` line of its log names it.
fn worker_node(worker: &WorkerProcess) -> Option<u8> {
    worker
        .log_text()
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| matches!(v["message"].as_str(), Some("connected" | "reconnected")))
        .find_map(|v| v["broker"].as_str().map(str::to_string))
        .and_then(|at| at.rsplit_once(':')?.1.parse::<u16>().ok())
        .map(|p| (p - port(0)) as u8)
}

/// A test's servers: the topology and the test's own connections on node
/// `admin_node`, the worker told about `worker_nodes`, the shared database.
fn on_cluster(admin_node: u8, worker_nodes: &[u8]) -> Servers {
    Servers {
        admin_amqp: admin(admin_node),
        worker_amqp: worker_urls(worker_nodes),
        admin_db: admin_db_url(),
    }
}

/// Waits until every command but the malformed ones is processed.
async fn all_processed(run: &Run, sent: &HashMap<String, Sent>) {
    let expected = sent.values().filter(|s| !s.malformed).count();
    assert_eq!(
        run.wait_processed(expected, Duration::from_secs(120)).await,
        expected,
        "every command processed after the fault"
    );
}

fn report(what: &str, run: &Run, killed_at: Instant) {
    let (first, gap) = run.failover(killed_at);
    let first = first.expect("a reply after the kill");
    eprintln!(
        "failover ({what}): first reply {} ms after the kill; longest silence {} ms",
        first.as_millis(),
        gap.as_millis()
    );
}

#[tokio::test]
async fn kill_9_of_the_node_the_worker_is_connected_to_loses_and_duplicates_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    cluster_up().await;
    // The topology (and so the command queue's leader) and the test's own
    // connections on node 1; the worker may start on any of the three.
    let servers = on_cluster(1, &[1, 2, 3]);
    let run = Run::prepare_on(servers, None).await;
    let (sent, commands) = run.plan(COMMANDS);
    run.watch_replies().await;
    // Until it starts on a node other than the test's: its random start.
    let mut worker = run.spawn_worker().await;
    let mut starts = 1;
    let node = loop {
        let n = worker_node(&worker).expect("the worker logs its node");
        if n != 1 {
            break n;
        }
        assert!(starts < 20, "20 starts all chose node 1: not random");
        signal(&worker, SIGTERM);
        let _ = worker.wait().await;
        worker = run.spawn_worker().await;
        starts += 1;
    };
    eprintln!("worker on node {node} (after {starts} starts)");
    let fault = async {
        run.wait_processed(COMMANDS / 3, Duration::from_secs(60))
            .await;
        control("cluster.sh", &["kill", &node.to_string()]).await;
        let at = Instant::now();
        let moved = worker
            .wait_for_log(Duration::from_secs(60), |log| {
                log.contains("\"reconnected\"")
            })
            .await;
        assert!(moved, "the worker reconnected: {}", worker.log_text());
        (at, run.processed().await)
    };
    let (resent, (at, done)) = tokio::join!(run.publish(&commands, WINDOW, PAUSE), fault);
    let now_on = worker_node(&worker).unwrap();
    assert_ne!(now_on, node, "the worker moved to another node");
    eprintln!("node {node} killed; worker now on node {now_on}; {done} processed by then; {resent} re-sent");
    assert!(
        done < COMMANDS * 9 / 10,
        "the kill landed mid-load ({done})"
    );
    control("cluster.sh", &["start", &node.to_string()]).await;
    all_processed(&run, &sent).await;
    report("worker's node", &run, at);
    run.complete(worker, &sent).await;
}

#[tokio::test]
async fn kill_9_of_the_command_queues_leader_loses_and_duplicates_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    cluster_up().await;
    // Declared through node 1, the queue's leader is there; the worker (on 2
    // or 3) and the test's publisher and checks (on 3) are elsewhere.
    let servers = on_cluster(1, &[2, 3]);
    let run = Run::prepare_on(servers, Some(admin(3))).await;
    let queue = run.env.settings.broker.command_queue.clone();
    let leader = control("cluster.sh", &["leader", &queue]).await;
    assert_eq!(leader, "1", "the command queue's leader is on node 1");
    let members = control("cluster.sh", &["members", &queue]).await;
    assert_eq!(members, "3", "the quorum queue has a member on every node");
    let (sent, commands) = run.plan(COMMANDS);
    run.watch_replies().await;
    let worker = run.spawn_worker().await;
    let fault = async {
        run.wait_processed(COMMANDS / 3, Duration::from_secs(60))
            .await;
        control("cluster.sh", &["kill", "1"]).await;
        (Instant::now(), run.processed().await)
    };
    let (resent, (at, done)) = tokio::join!(run.publish(&commands, WINDOW, PAUSE), fault);
    let new_leader = control("cluster.sh", &["leader", &queue]).await;
    eprintln!("leader node 1 killed; new leader node {new_leader}; {done} processed by then; {resent} re-sent");
    assert!(["2", "3"].contains(&new_leader.as_str()), "{new_leader}");
    assert!(
        done < COMMANDS * 9 / 10,
        "the kill landed mid-load ({done})"
    );
    all_processed(&run, &sent).await;
    report("queue leader", &run, at);
    // Node 1 back before the clean-up, which goes through it.
    control("cluster.sh", &["start", "1"]).await;
    run.complete(worker, &sent).await;
}

#[tokio::test]
async fn primary_crash_and_standby_promotion_lose_and_duplicate_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    // A fresh pair: an earlier run left the standby promoted and the primary down.
    control("pg-standby.sh", &["reset"]).await;
    let servers = Servers {
        admin_db: env_or(
            "TEST_PG_PAIR_URL",
            "postgres://profile_worker_owner:profile_worker_owner@127.0.0.1:5441,127.0.0.1:5442/postgres?target_session_attrs=read-write",
        ),
        ..Servers::from_env()
    };
    let run = Run::prepare_on(servers, None).await;
    let url = run
        .env
        .settings
        .database
        .database_url
        .expose_secret()
        .to_string();
    assert!(url.contains(",127.0.0.1:5442/"), "multi-host: {url}");
    let (sent, commands) = run.plan(COMMANDS);
    run.watch_replies().await;
    let worker = run.spawn_worker().await;
    let fault = async {
        run.wait_processed(COMMANDS / 3, Duration::from_secs(60))
            .await;
        let done = run.processed().await;
        control("pg-standby.sh", &["crash"]).await;
        let at = Instant::now();
        // An operator's (or an orchestrator's) reaction time, then the promotion.
        tokio::time::sleep(Duration::from_secs(1)).await;
        control("pg-standby.sh", &["promote"]).await;
        (at, done)
    };
    let (_, (at, done)) = tokio::join!(run.publish(&commands, WINDOW, PAUSE), fault);
    eprintln!("primary crashed with {done} processed; standby promoted 1 s later");
    assert!(
        done < COMMANDS * 9 / 10,
        "the crash landed mid-load ({done})"
    );
    all_processed(&run, &sent).await;
    assert_eq!(
        control("pg-standby.sh", &["status"]).await,
        "5441 down\n5442 primary",
        "the standby took over"
    );
    report("PostgreSQL primary, promotion after 1 s", &run, at);
    run.complete(worker, &sent).await;
}

#[tokio::test]
async fn the_worker_connected_over_amqps_to_the_tls_node_loses_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    cluster_up().await;
    let tls = format!(
        "amqps://profile-worker-test:profile-worker-test@localhost:{}/%2f",
        env_or("PW_CLUSTER_AMQPS_PORT", "5691")
    );
    let servers = Servers {
        worker_amqp: tls,
        ..on_cluster(1, &[])
    };
    let run = Run::prepare_on(servers, None).await;
    let ca = env_or("TEST_AMQPS_CA", "/etc/rabbitmq/profile-worker-tls/ca.pem");
    let (sent, commands) = run.plan(COMMANDS);
    let worker = run
        .spawn_worker_with(|cmd| {
            cmd.env("AMQP_CA_FILE", &ca);
        })
        .await;
    assert!(
        worker.log_text().contains("localhost:5691"),
        "connected to the TLS node: {}",
        worker.log_text()
    );
    run.publish(&commands, WINDOW * 4, PAUSE).await;
    run.complete(worker, &sent).await;
}

#[tokio::test]
async fn direct_reply_to_reaches_a_client_on_another_node() {
    let _one = ONE_AT_A_TIME.lock().await;
    cluster_up().await;
    // The worker on node 2 only; `profile-worker send` (direct reply-to) on 1 and on 3.
    let servers = on_cluster(1, &[2]);
    let mut env = Env::prepare_on(servers, |_| {}).await;
    env.start_worker().await;
    for client in [1, 3] {
        let body = ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string();
        let mut send = cli(&env, &["send", "create-ticket"]);
        send.env("AMQP_URL", admin(client));
        let out = output_with_input(send, &body).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.starts_with("200 "),
            "client on node {client}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(env.count("tickets").await, 2);
    env.teardown().await;
}
