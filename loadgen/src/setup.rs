//! What a benchmark run creates and removes: its own database, its own vhost
//! (or, where `rabbitmqctl` cannot reach the broker, its own name prefix), the
//! worker processes, and reading their CPU time and peak RSS from /proc.

use crate::error::{BenchError, Result};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::process::{Child, Command};
use url::Url;

/// `postgres://…/<db>` with the database replaced.
pub fn with_database(database_url: &str, db: &str) -> Result<String> {
    let mut u = Url::parse(database_url).map_err(|e| BenchError::database("DATABASE_URL", e))?;
    u.set_path(&format!("/{db}"));
    Ok(u.to_string())
}

/// `amqp://…/<vhost>` with the vhost replaced.
pub fn with_vhost(amqp_url: &str, vhost: &str) -> Result<String> {
    let mut u = Url::parse(amqp_url).map_err(|e| BenchError::Usage(format!("AMQP_URL: {e}")))?;
    u.set_path(&format!("/{vhost}"));
    Ok(u.to_string())
}

fn amqp_user(amqp_url: &str) -> String {
    Url::parse(amqp_url)
        .ok()
        .map(|u| u.username().to_string())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "guest".into())
}

async fn admin(database_url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .map_err(|e| BenchError::database("DATABASE_URL: cannot connect", e))?;
    tokio::spawn(conn);
    Ok(client)
}

/// (tickets, verification tokens) stored in the run's database.
pub async fn row_counts(db_url: &str) -> Result<(u64, u64)> {
    let row = admin(db_url)
        .await?
        .query_one(
            "SELECT (SELECT count(*) FROM tickets), (SELECT count(*) FROM verification_tokens)",
            &[],
        )
        .await
        .map_err(|e| BenchError::database("counting the stored rows", e))?;
    Ok((row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64))
}

pub async fn create_database(database_url: &str, db: &str) -> Result<()> {
    admin(database_url)
        .await?
        .batch_execute(&format!("CREATE DATABASE \"{db}\""))
        .await
        .map_err(|e| {
            BenchError::database(
                format!("cannot create database {db} (the role needs CREATEDB)"),
                e,
            )
        })
}

pub async fn drop_database(database_url: &str, db: &str) -> Result<()> {
    admin(database_url)
        .await?
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
        .await
        .map_err(|e| BenchError::database(format!("cannot drop database {db}"), e))
}

async fn rabbitmqctl(args: &[&str]) -> Result<()> {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| BenchError::io("rabbitmqctl", e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BenchError::Process(format!(
            "rabbitmqctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or("failed")
        )))
    }
}

/// Creates `vhost` and lets the URL's user use it. Needs `rabbitmqctl` on this
/// machine with rights on the node.
pub async fn create_vhost(amqp_url: &str, vhost: &str) -> Result<()> {
    rabbitmqctl(&["add_vhost", vhost]).await?;
    let user = amqp_user(amqp_url);
    rabbitmqctl(&["set_permissions", "-p", vhost, &user, ".*", ".*", ".*"]).await
}

pub async fn delete_vhost(vhost: &str) -> Result<()> {
    rabbitmqctl(&["delete_vhost", vhost]).await
}

/// Where a worker serves `/metrics`, from its JSON log (`LOG_FORMAT=json`).
pub fn http_addr_in_log(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        (v["message"] == "serving /metrics, /healthz and /readyz")
            .then(|| v["addr"].as_str().map(str::to_string))
            .flatten()
    })
}

/// The `profile_worker_batch_*` sums and counts of a worker's `/metrics`, keyed
/// `name{labels}`; empty when it does not answer.
pub async fn batch_samples(addr: &str) -> std::collections::HashMap<String, f64> {
    let page = match reqwest::get(format!("http://{addr}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    page.lines()
        .filter(|l| l.starts_with("profile_worker_batch_") && !l.contains("_bucket"))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The samples of a worker's `/metrics` whose `name{labels}` starts with
/// `prefix`; empty when it does not answer.
pub async fn metric_samples(addr: &str, prefix: &str) -> Vec<(String, f64)> {
    let page = match reqwest::get(format!("http://{addr}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    page.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// A worker process of the run, with its log file.
pub struct WorkerProcess {
    pub child: Child,
    pub pid: u32,
    pub log: PathBuf,
}

pub fn spawn_worker(bin: &Path, env: &[(String, String)], log: PathBuf) -> Result<WorkerProcess> {
    let file =
        std::fs::File::create(&log).map_err(|e| BenchError::io(log.display().to_string(), e))?;
    let err = file
        .try_clone()
        .map_err(|e| BenchError::io(log.display().to_string(), e))?;
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .map_err(|e| BenchError::io(format!("cannot start {}", bin.display()), e))?;
    let pid = child
        .id()
        .ok_or_else(|| BenchError::Process("the worker exited at once".into()))?;
    Ok(WorkerProcess { child, pid, log })
}

impl WorkerProcess {
    /// SIGTERM, then wait (the worker drains what it holds and exits 0).
    pub async fn stop(mut self) -> Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await;
        match tokio::time::timeout(std::time::Duration::from_secs(40), self.child.wait()).await {
            Ok(Ok(s)) if s.success() => Ok(()),
            Ok(Ok(s)) => Err(BenchError::Process(format!(
                "worker {} exited with {s}",
                self.pid
            ))),
            Ok(Err(e)) => Err(BenchError::io(
                format!("waiting for worker {}", self.pid),
                e,
            )),
            Err(_) => {
                let _ = self.child.kill().await;
                Err(BenchError::Process(format!(
                    "worker {} did not stop within 40 s",
                    self.pid
                )))
            }
        }
    }
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = procfs::process::Process::new(pid as i32)
        .ok()?
        .stat()
        .ok()?;
    Some((stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64)
}

/// Processes on this machine whose command name is `comm` (e.g. the broker's
/// `beam.smp`); empty when the server runs elsewhere.
pub fn pids_named(comm: &str) -> Vec<u32> {
    let Ok(all) = procfs::process::all_processes() else {
        return vec![];
    };
    all.filter_map(Result::ok)
        .filter(|p| p.stat().is_ok_and(|s| s.comm == comm))
        .map(|p| p.pid() as u32)
        .collect()
}

/// How far the server's write-ahead log has come, in bytes (the whole server's,
/// so other load on it counts too).
pub async fn wal_position(db_url: &str) -> Option<f64> {
    let client = admin(db_url).await.ok()?;
    client
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::float8", &[])
        .await
        .ok()
        .map(|r| r.get::<_, f64>(0))
}

/// Seconds the threads of `pid` have waited on a run queue for a CPU
/// (`/proc/PID/task/*/schedstat`, second field): waiting for CPU, measured.
pub fn run_delay_secs(pid: u32) -> Option<f64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut ns = 0u64;
    for task in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        ns += text
            .split_whitespace()
            .nth(1)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(ns as f64 / 1e9)
}

/// One of the bench's other parties (`profile-worker-bench-consumer`), a
/// process of its own, ready once it said so.
pub struct Party {
    pub child: Child,
    pub pid: u32,
    pub log: PathBuf,
}

/// `profile-worker-bench-consumer` beside this program.
pub fn consumer_bin() -> Result<PathBuf> {
    let me = std::env::current_exe().map_err(|e| BenchError::io("finding this program", e))?;
    Ok(me.with_file_name(format!(
        "profile-worker-bench-consumer{}",
        std::env::consts::EXE_SUFFIX
    )))
}

/// Starts a party with `args` and waits (up to 30 s) for its `ready`.
pub async fn spawn_party(args: &[String], log: PathBuf) -> Result<Party> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let bin = consumer_bin()?;
    let err =
        std::fs::File::create(&log).map_err(|e| BenchError::io(log.display().to_string(), e))?;
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| BenchError::io(format!("cannot start {}", bin.display()), e))?;
    let pid = child
        .id()
        .ok_or_else(|| BenchError::Process(format!("{} exited at once", bin.display())))?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let ready = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line()).await;
    match ready {
        Ok(Ok(Some(l))) if l == "ready" => {}
        _ => {
            return Err(BenchError::Process(format!(
                "{} {} did not start: {}",
                bin.display(),
                args.join(" "),
                std::fs::read_to_string(&log).unwrap_or_default()
            )))
        }
    }
    // Keep reading, so the party never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Party { child, pid, log })
}

/// Peak resident set size in KiB (VmHWM).
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    procfs::process::Process::new(pid as i32)
        .ok()?
        .status()
        .ok()?
        .vmhwm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_database_and_vhost() {
        assert_eq!(
            with_database("postgres://u:p@127.0.0.1:5432/app", "pw_bench_1").unwrap(),
            "postgres://u:p@127.0.0.1:5432/pw_bench_1"
        );
        assert_eq!(
            with_vhost("amqp://guest:guest@127.0.0.1:5672/%2f", "pw-bench-1").unwrap(),
            "amqp://guest:guest@127.0.0.1:5672/pw-bench-1"
        );
        assert_eq!(amqp_user("amqp://bob:x@h/%2f"), "bob");
        assert_eq!(amqp_user("amqp://h/%2f"), "guest");
    }

    #[test]
    fn own_process_is_readable() {
        let pid = std::process::id();
        assert!(cpu_secs(pid).is_some());
        assert!(peak_rss_kib(pid).unwrap() > 0);
        // This test binary's own name, as /proc/PID/stat spells it (at most 15 bytes).
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert!(pids_named(comm.trim_end()).contains(&pid));
    }
}
