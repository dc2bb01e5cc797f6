//! The worker and the CLI as processes of their own: started, signalled,
//! watched through their logs.

use crate::*;
use secrecy::ExposeSecret;
use serde_json::Value;
use std::time::Duration;
use tokio::sync::mpsc;

/// The `profile-worker` binary cargo built for these tests: `PROFILE_WORKER_BIN`,
/// else beside the test executable's `deps/` folder (target/<profile>/).
pub fn worker_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("PROFILE_WORKER_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>");
    profile_dir.join(format!("profile-worker{}", std::env::consts::EXE_SUFFIX))
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = procfs::process::Process::new(pid as i32)
        .ok()?
        .stat()
        .ok()?;
    Some((stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64)
}

pub use nix::sys::signal::Signal::{SIGKILL, SIGTERM};

/// Sends `sig` to a child process.
pub fn signal(child: &tokio::process::Child, sig: nix::sys::signal::Signal) {
    let pid = child.id().expect("running") as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
        .unwrap_or_else(|e| panic!("kill({pid}, {sig}): {e}"));
}

/// `profile-worker ARGS…` against this test's broker names and database, as an
/// operator runs it: the owner's database role, the admin broker user.
pub fn cli(env: &Env, args: &[&str]) -> tokio::process::Command {
    let s = &env.settings;
    let mut c = tokio::process::Command::new(worker_bin());
    // The binary sizes its own threads' stacks (src/main.rs); the tests' own
    // setting (.cargo/config.toml) is for the test process.
    c.args(args)
        .env_remove("RUST_MIN_STACK")
        .env("DATABASE_URL", &env.owner_db_url)
        .env("AMQP_URL", &env.servers.admin_amqp)
        .env("COMMAND_EXCHANGE", &s.broker.command_exchange)
        .env("COMMAND_QUEUE", &s.broker.command_queue)
        .env("BULK_EXCHANGE", &s.broker.bulk_exchange)
        .env("BULK_QUEUE", &s.broker.bulk_queue)
        .env("DEAD_LETTER_EXCHANGE", &s.broker.dead_letter_exchange)
        .env("DEAD_LETTER_QUEUE", &s.broker.dead_letter_queue)
        .env("EVENTS_EXCHANGE", &s.broker.events_exchange)
        .env("EMAIL_EXCHANGE", &s.broker.email_exchange)
        .env("EMAIL_QUEUE", &s.broker.email_queue)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    c
}

/// Runs `cmd` with `input` on its standard input, to its end (30 s at most).
pub async fn output_with_input(
    mut cmd: tokio::process::Command,
    input: &str,
) -> std::process::Output {
    use tokio::io::AsyncWriteExt;
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut stdin = child.stdin.take().expect("piped");
    stdin
        .write_all(input.as_bytes())
        .await
        .expect("write stdin");
    drop(stdin);
    tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("exits within 30 s")
        .expect("runs")
}

/// `profile-worker run` as a separate process, configured for this test's
/// database and broker names, as the worker's own (least-privileged) users
/// (stdio left to the caller).
pub fn worker_process(env: &Env) -> tokio::process::Command {
    let s = &env.settings;
    let mut c = cli(env, &["run"]);
    c.env("DATABASE_URL", s.database.database_url.expose_secret())
        .env("AMQP_URL", s.broker.address.amqp_url.expose_secret())
        .env("VERIFICATION_URL", s.worker.verification_url())
        .env(
            "EMAIL_COOLDOWN_SECS",
            s.worker.email_cooldown_secs.to_string(),
        )
        .env("REPLY_TO_PREFIXES", s.broker.reply_to_prefixes.join(","))
        .env(
            "COMMAND_QUEUE_MAX_LENGTH",
            s.broker.command_queue_max_length.to_string(),
        )
        .env(
            "DEAD_LETTER_QUEUE_MAX_LENGTH",
            s.broker.dead_letter_queue_max_length.to_string(),
        )
        .env("BULK_PREFETCH", s.broker.bulk_prefetch.to_string())
        .env(
            "BULK_SHARE_PERCENT",
            s.worker.bulk_share_percent.to_string(),
        )
        .env("OUTBOX_GRACE_SECS", "1")
        .env("SWEEP_INTERVAL_SECS", "0")
        .env("HTTP_ADDR", &s.worker.http_addr)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    c
}

/// `profile-worker run` as its own process, started and watched through its
/// JSON log lines on stderr: it is ready when it logs `ready` (every consumer
/// consuming) and says where it serves `/metrics` when it binds. The lines are
/// kept (and written to a file, if one is given); with `TEST_LOG` they are
/// also shown in the test's output.
pub struct WorkerProcess {
    child: tokio::process::Child,
    http: Option<String>,
    log: std::sync::Arc<std::sync::Mutex<String>>,
    /// Woken for every line logged.
    lines: std::sync::Arc<tokio::sync::Notify>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl WorkerProcess {
    /// Spawns `cmd` (from [`worker_process`]) and waits until it is ready;
    /// panics with its log if it exits or is not ready within 60 s.
    pub async fn start(
        mut cmd: tokio::process::Command,
        log_file: Option<&std::path::Path>,
    ) -> Self {
        use tokio::io::AsyncBufReadExt;
        // Whatever else the test filters, the two lines this waits for are kept.
        let filter = cmd
            .as_std()
            .get_envs()
            .find(|(k, _)| *k == "RUST_LOG")
            .and_then(|(_, v)| v.map(|v| v.to_string_lossy().into_owned()))
            .or_else(|| std::env::var("RUST_LOG").ok())
            .unwrap_or_else(|| "info".into());
        let mut filter = filter;
        for target in ["profile_worker::ops", "profile_worker::worker"] {
            if !filter.contains(target) {
                filter.push_str(&format!(",{target}=info"));
            }
        }
        cmd.env("RUST_LOG", filter);
        cmd.env("LOG_FORMAT", "json")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn the worker");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut file = log_file.map(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .expect("open the worker's log file")
        });
        let (http_tx, mut http_rx) = mpsc::unbounded_channel::<String>();
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<()>();
        let kept = log.clone();
        let lines = std::sync::Arc::new(tokio::sync::Notify::new());
        let line_logged = lines.clone();
        let echo = test_log();
        let reader = tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if echo {
                    eprintln!("{line}");
                }
                if let Some(f) = file.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{line}");
                }
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    match (v["message"].as_str(), v["addr"].as_str()) {
                        (Some("serving /metrics, /healthz and /readyz"), Some(addr)) => {
                            let _ = http_tx.send(addr.to_string());
                        }
                        (Some("ready"), _) => {
                            let _ = ready_tx.send(());
                        }
                        _ => {}
                    }
                }
                {
                    let mut k = kept.lock().unwrap_or_else(|p| p.into_inner());
                    k.push_str(&line);
                    k.push('\n');
                }
                line_logged.notify_waiters();
            }
        });
        let ready = tokio::time::timeout(Duration::from_secs(60), ready_rx.recv()).await;
        let log_text = || log.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert!(
            matches!(ready, Ok(Some(()))),
            "the worker process was not ready within 60 s: {}",
            log_text()
        );
        // Bound before it connected, so logged before `ready`.
        let http = http_rx.try_recv().ok();
        WorkerProcess {
            child,
            http,
            log,
            lines,
            reader: Some(reader),
        }
    }

    /// Waits for the process to exit and for the last of its log to be read.
    pub async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        let status = self.child.wait().await?;
        if let Some(r) = self.reader.take() {
            let _ = r.await;
        }
        Ok(status)
    }

    /// Where it serves `/metrics`, `/healthz` and `/readyz`.
    pub fn http(&self) -> &str {
        self.http.as_deref().expect("a worker with HTTP_ADDR on")
    }

    /// Waits until what it logged satisfies `want`, at most `within`; whether it did.
    pub async fn wait_for_log(&self, within: Duration, want: impl Fn(&str) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let next_line = self.lines.notified();
            tokio::pin!(next_line);
            next_line.as_mut().enable();
            if want(&self.log_text()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, next_line).await.is_err() {
                return want(&self.log_text());
            }
        }
    }

    /// Everything it logged so far (JSON lines).
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl std::ops::Deref for WorkerProcess {
    type Target = tokio::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.child
    }
}

impl std::ops::DerefMut for WorkerProcess {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.child
    }
}
