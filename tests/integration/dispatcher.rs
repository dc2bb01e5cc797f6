//! The reference email dispatcher (examples/dispatcher) against a real worker,
//! broker and SMTP server on loopback (its `smtp_sink.py`, on aiosmtpd): one
//! email per event with the exact link; nothing lost or sent twice while SMTP
//! is down; at most one email per event when the dispatcher is killed with -9,
//! and an event it cannot tell was sent is dead-lettered with why, not dropped.

use lapin::options::BasicGetOptions;
use profile_worker_testkit::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

fn python() -> String {
    std::env::var("EXAMPLES_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn example(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/dispatcher")
        .join(file)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A test's own folder: the inbox, the dispatcher's claims and logs.
fn scratch(env: &Env, what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{}-{what}", env.db_name));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The SMTP server, keeping each accepted message in `inbox`.
async fn smtp(port: u16, inbox: &Path, hold_secs: f64) -> Child {
    let mut child = Command::new(python())
        .arg(example("smtp_sink.py"))
        .args([
            "--port",
            &port.to_string(),
            "--hold-secs",
            &hold_secs.to_string(),
        ])
        .arg("--dir")
        .arg(inbox)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python with aiosmtpd (the README's test command installs it)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the SMTP server starts within 20 s")
        .unwrap();
    assert!(
        first.as_deref().is_some_and(|l| l.starts_with("listening")),
        "{first:?}"
    );
    child
}

struct Dispatcher {
    child: Child,
    log: PathBuf,
    metrics: String,
}

impl Dispatcher {
    /// Started as the dispatcher's broker user, consuming once it says so.
    async fn start(env: &Env, smtp_port: u16, dir: &Path, extra: &[(&str, &str)]) -> Self {
        let b = &env.settings.broker;
        let metrics = format!("127.0.0.1:{}", free_port());
        let log = dir.join(format!("dispatcher-{}.log", uuid::Uuid::new_v4().simple()));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(python())
            .arg(example("dispatcher.py"))
            .env("AMQP_URL", dispatcher_amqp_url())
            .env("EMAIL_QUEUE", &b.email_queue)
            .env("EMAIL_DEAD_LETTER_EXCHANGE", b.email_dead_letter_exchange())
            .env("SMTP_PORT", smtp_port.to_string())
            .env("SMTP_TIMEOUT_SECS", "5")
            .env("MAIL_FROM", "Example <no-reply@example.com>")
            .env("DEDUPE_DB", dir.join("claims.sqlite3"))
            .env("METRICS_ADDR", &metrics)
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("python with pika and jinja2");
        let d = Dispatcher {
            child,
            log,
            metrics,
        };
        d.wait_log("consuming", Duration::from_secs(20)).await;
        d
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_log(&self, what: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while !self.log_text().contains(what) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the dispatcher did not log {what:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn metric(&self, name: &str) -> f64 {
        let (_, page) = http_get(&self.metrics, "/metrics")
            .await
            .expect("the dispatcher's /metrics");
        samples(&page).get(name).copied().unwrap_or(0.0)
    }

    async fn wait_metric(&self, name: &str, at_least: f64, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let v = self.metric(name).await;
            if v >= at_least {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} = {v}, expected ≥ {at_least}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn kill(mut self) {
        signal(&self.child, SIGKILL);
        let _ = self.child.wait().await;
    }
}

/// The messages the SMTP server accepted, oldest first.
fn inbox(dir: &Path) -> Vec<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "eml"));
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect()
}

async fn wait_inbox(dir: &Path, n: usize, within: Duration) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let mail = inbox(dir);
        if mail.len() >= n || tokio::time::Instant::now() > deadline {
            return mail;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A MIME part's body (the first of `content_type`), decoded when it is
/// quoted-printable, which Python uses for lines longer than 78 characters.
fn part(mail: &str, content_type: &str) -> String {
    let mail = mail.replace("\r\n", "\n");
    let start = mail
        .find(&format!("Content-Type: {content_type}"))
        .unwrap_or_else(|| panic!("no {content_type} part:\n{mail}"));
    let rest = &mail[start..];
    let (headers, body) = rest.split_once("\n\n").unwrap();
    let body = body.split("\n--").next().unwrap();
    if !headers.contains("quoted-printable") {
        return body.to_string();
    }
    let joined = body.replace("=\n", "");
    let bytes = joined.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// The token IDs the inbox's links carry, with how many emails carry each.
fn tokens_in(mail: &[String]) -> HashMap<String, usize> {
    let mut by = HashMap::new();
    for m in mail {
        let text = part(m, "text/plain");
        let start = text.find("tokenId=").expect("a link with its token") + "tokenId=".len();
        *by.entry(text[start..start + 36].to_string()).or_default() += 1;
    }
    by
}

/// The dispatch queue's dead letters: (x-error-code, x-error-reason, tokenId).
async fn dead_letters(env: &Env) -> Vec<(String, String, String)> {
    let q = env.settings.broker.email_dead_letter_queue();
    let mut out = Vec::new();
    while let Some(m) = env
        .channel
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let r = Received::from_delivery(&m.delivery);
        out.push((
            r.header("x-error-code").unwrap_or_default(),
            r.header("x-error-reason").unwrap_or_default(),
            r.json()["tokenId"].as_str().unwrap_or_default().to_string(),
        ));
    }
    out
}

async fn request_emails(env: &Env, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let r = env
            .call(
                "create-verification-token",
                verification(ADMIN_TOKEN, ENABLED_PROFILE),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.raw);
        ids.push(r.body["id"].as_str().unwrap().to_string());
    }
    ids
}

#[tokio::test]
async fn an_event_becomes_one_email_to_the_profile_with_the_exact_link() {
    let env = Env::start().await;
    env.release_email_queue().await;
    let dir = scratch(&env, "dispatch");
    let inbox_dir = dir.join("inbox");
    let port = free_port();
    let _smtp = smtp(port, &inbox_dir, 0.0).await;
    let d = Dispatcher::start(&env, port, &dir, &[]).await;

    let body = serde_json::json!({
        "accessTokenId": ADMIN_TOKEN, "id": ENABLED_PROFILE, "purpose": "reset-password",
        "verificationUrl": "https://example.com/reset?lang=en&from=app"
    });
    let r = env.call("create-verification-token", body).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    let token = r.body["id"].as_str().unwrap();
    let link = format!("https://example.com/reset?lang=en&from=app&tokenId={token}");

    d.wait_metric(
        "profile_email_dispatcher_sent_total",
        1.0,
        Duration::from_secs(20),
    )
    .await;
    let mail = inbox(&inbox_dir);
    assert_eq!(mail.len(), 1, "one email");
    let m = &mail[0];
    assert!(m.contains("To: jane@example.com"), "{m}");
    assert!(m.contains("From: Example <no-reply@example.com>"), "{m}");
    assert!(m.contains("Subject: Reset your password"), "{m}");
    let text = part(m, "text/plain");
    assert!(
        text.contains(&format!("\n{link}\n")),
        "the text part has the link as is:\n{text}"
    );
    let html = part(m, "text/html");
    assert!(
        html.contains(&format!("href=\"{}\"", link.replace('&', "&amp;"))),
        "the HTML part links to it (HTML-escaped):\n{html}"
    );
    // Acked once sent: nothing left in the queue, nothing dead-lettered, no second email.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        env.queue(&env.settings.broker.email_queue)
            .await
            .message_count(),
        0
    );
    assert!(dead_letters(&env).await.is_empty());
    assert_eq!(inbox(&inbox_dir).len(), 1);
    d.kill().await;
    env.teardown().await;
}

#[tokio::test]
async fn while_smtp_is_down_nothing_is_lost_and_nothing_is_sent_twice() {
    let env = Env::start().await;
    env.release_email_queue().await;
    let dir = scratch(&env, "smtp-down");
    let inbox_dir = dir.join("inbox");
    let port = free_port();
    // No SMTP server yet.
    let d = Dispatcher::start(
        &env,
        port,
        &dir,
        &[
            ("RETRY_MIN_MS", "100"),
            ("RETRY_MAX_MS", "500"),
            ("SMTP_MAX_ATTEMPTS", "1000"),
        ],
    )
    .await;
    let tokens = request_emails(&env, 5).await;
    d.wait_metric(
        "profile_email_dispatcher_retried_total",
        5.0,
        Duration::from_secs(30),
    )
    .await;
    assert!(inbox(&inbox_dir).is_empty());
    let waiting = env.queue(&env.settings.broker.email_queue).await;
    assert_eq!(
        waiting.message_count() + 1,
        5,
        "one held unacked while it is retried, the rest wait in the queue"
    );

    let _smtp = smtp(port, &inbox_dir, 0.0).await;
    let mail = wait_inbox(&inbox_dir, 5, Duration::from_secs(30)).await;
    d.wait_metric(
        "profile_email_dispatcher_sent_total",
        5.0,
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mail_after = inbox(&inbox_dir);
    assert_eq!(mail_after.len(), 5, "no email twice");
    let got = tokens_in(&mail);
    for t in &tokens {
        assert_eq!(got.get(t), Some(&1), "token {t}: {got:?}");
    }
    assert!(dead_letters(&env).await.is_empty());
    assert_eq!(
        d.metric("profile_email_dispatcher_duplicates_total").await,
        0.0
    );
    d.kill().await;
    env.teardown().await;
}

#[tokio::test]
async fn killed_with_minus_9_it_sends_each_event_at_most_once_and_loses_none() {
    let env = Env::start().await;
    env.release_email_queue().await;
    let dir = scratch(&env, "dispatch-kill");
    let inbox_dir = dir.join("inbox");

    // 1. Killed while the SMTP server holds its answer: the message is on the
    //    server's side, the dispatcher never heard back. Restarted, it does
    //    not send it again; it dead-letters the event with why.
    let port = free_port();
    let mut slow = smtp(port, &inbox_dir, 5.0).await;
    let d = Dispatcher::start(&env, port, &dir, &[]).await;
    let first = request_emails(&env, 1).await;
    let holding = inbox_dir.join("holding");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !holding.exists() {
        assert!(tokio::time::Instant::now() < deadline, "{}", d.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    d.kill().await;
    signal(&slow, SIGTERM);
    let _ = slow.wait().await;
    std::fs::remove_file(&holding).unwrap();

    // Each answer a tenth of a second late, so that the kills below land
    // while messages are being handed over, not only between them.
    let port = free_port();
    let _smtp = smtp(port, &inbox_dir, 0.1).await;
    let d = Dispatcher::start(&env, port, &dir, &[]).await;
    d.wait_metric(
        "profile_email_dispatcher_dead_lettered_total{code=\"INTERRUPTED_WHILE_SENDING\"}",
        1.0,
        Duration::from_secs(20),
    )
    .await;
    let dead = dead_letters(&env).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, "INTERRUPTED_WHILE_SENDING");
    assert!(dead[0].1.contains("not sent again"), "{}", dead[0].1);
    assert_eq!(dead[0].2, first[0]);
    assert_eq!(tokens_in(&inbox(&inbox_dir)).get(&first[0]), Some(&1));

    // 2. Killed at whatever moment, again and again, through a stream of
    //    events: no event ever reaches the inbox twice, and every event is in
    //    the inbox or among the dead letters (nothing is lost).
    let tokens = request_emails(&env, 30).await;
    let mut d = d;
    for pause_ms in [150, 400, 250, 600] {
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        d.kill().await;
        d = Dispatcher::start(&env, port, &dir, &[]).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut dead = Vec::new();
    loop {
        dead.extend(dead_letters(&env).await);
        let got = tokens_in(&inbox(&inbox_dir));
        let accounted = tokens
            .iter()
            .filter(|t| got.contains_key(*t) || dead.iter().any(|(_, _, d)| d == *t))
            .count();
        if accounted == tokens.len() || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let got = tokens_in(&inbox(&inbox_dir));
    for t in &tokens {
        assert!(
            got.get(t).copied().unwrap_or(0) <= 1,
            "token {t} emailed {} times",
            got[t]
        );
        let dead_here = dead.iter().any(|(_, _, d)| d == t);
        assert!(
            got.contains_key(t) || dead_here,
            "token {t} neither emailed nor dead-lettered:\n{}",
            d.log_text()
        );
        if dead_here {
            assert!(
                dead.iter()
                    .all(|(code, _, d)| d != t || code == "INTERRUPTED_WHILE_SENDING"),
                "{dead:?}"
            );
        }
    }
    assert!(got.values().all(|&n| n == 1), "{got:?}");
    eprintln!(
        "{} of {} emailed, {} dead-lettered as interrupted",
        tokens.iter().filter(|t| got.contains_key(*t)).count(),
        tokens.len(),
        dead.len()
    );
    d.kill().await;
    env.teardown().await;
}
