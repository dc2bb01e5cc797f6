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
    smtp_tls(port, inbox, hold_secs, None).await
}

/// A self-signed certificate for `localhost` and 127.0.0.1, in `dir`:
/// (certificate, key). Its own CA: trusted only when given as such.
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("smtp-cert.pem"), dir.join("smtp-key.pem"));
    let out = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (the README's test command installs it with RabbitMQ's TLS set-up)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// The SMTP server, with `tls`: (starttls or implicit, certificate, key).
async fn smtp_tls(
    port: u16,
    inbox: &Path,
    hold_secs: f64,
    tls: Option<(&str, &Path, &Path)>,
) -> Child {
    let mut cmd = Command::new(python());
    cmd.arg(example("smtp_sink.py")).args([
        "--port",
        &port.to_string(),
        "--hold-secs",
        &hold_secs.to_string(),
    ]);
    if let Some((mode, cert, key)) = tls {
        cmd.args(["--tls", mode])
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key);
    }
    let mut child = cmd
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

/// Issue 31: STARTTLS passed no SSL context, so Python checked neither the
/// certificate nor the host name, and anyone on the path read the SMTP
/// password and every reset link. A server whose certificate no trusted CA
/// vouches for gets nothing, not even the login; with its CA given, or over
/// implicit TLS, the email goes, the login over TLS.
#[tokio::test]
async fn smtp_tls_is_verified_and_no_password_goes_where_it_could_not_be() {
    let env = Env::start().await;
    env.release_email_queue().await;
    let dir = scratch(&env, "smtp-tls");
    let (cert, key) = self_signed(&dir);
    let cert_file = cert.to_str().unwrap();
    let login = [
        ("SMTP_HOST", "localhost"),
        ("SMTP_USER", "dispatcher"),
        ("SMTP_PASSWORD", "s3cret"),
        ("RETRY_MIN_MS", "100"),
        ("RETRY_MAX_MS", "200"),
    ];
    let with = |more: &[(&'static str, &str)]| -> Vec<(&'static str, String)> {
        login
            .iter()
            .chain(more)
            .map(|(k, v)| (*k, v.to_string()))
            .collect()
    };

    // 1. STARTTLS to a server whose certificate no trusted CA signed.
    let inbox1 = dir.join("inbox-starttls");
    let port = free_port();
    let _starttls = smtp_tls(port, &inbox1, 0.0, Some(("starttls", &cert, &key))).await;
    let extra = with(&[("SMTP_TLS", "starttls"), ("SMTP_MAX_ATTEMPTS", "2")]);
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let d = Dispatcher::start(&env, port, &dir, &extra).await;
    request_emails(&env, 1).await;
    d.wait_metric(
        "profile_email_dispatcher_dead_lettered_total{code=\"SMTP_UNAVAILABLE\"}",
        1.0,
        Duration::from_secs(30),
    )
    .await;
    let dead = dead_letters(&env).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0].1.contains("certificate was not accepted"),
        "{}",
        dead[0].1
    );
    assert!(inbox(&inbox1).is_empty(), "nothing sent");
    assert!(
        !inbox1.join("auth.log").exists(),
        "no login attempted: {:?}",
        std::fs::read_to_string(inbox1.join("auth.log"))
    );
    d.kill().await;

    // 2. The same server, its CA given: sent, the login over TLS.
    let extra = with(&[("SMTP_TLS", "starttls"), ("SMTP_CA_FILE", cert_file)]);
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let d = Dispatcher::start(&env, port, &dir, &extra).await;
    request_emails(&env, 1).await;
    assert_eq!(
        wait_inbox(&inbox1, 1, Duration::from_secs(20)).await.len(),
        1
    );
    let auth = std::fs::read_to_string(inbox1.join("auth.log")).unwrap();
    assert!(
        !auth.is_empty() && auth.lines().all(|l| l.ends_with(" tls")),
        "{auth}"
    );
    d.kill().await;

    // 3. Implicit TLS (port 465's way), the CA given: sent.
    let inbox2 = dir.join("inbox-implicit");
    let port = free_port();
    let _implicit = smtp_tls(port, &inbox2, 0.0, Some(("implicit", &cert, &key))).await;
    let extra = with(&[("SMTP_TLS", "implicit"), ("SMTP_CA_FILE", cert_file)]);
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let d = Dispatcher::start(&env, port, &dir, &extra).await;
    request_emails(&env, 1).await;
    assert_eq!(
        wait_inbox(&inbox2, 1, Duration::from_secs(20)).await.len(),
        1
    );
    let auth = std::fs::read_to_string(inbox2.join("auth.log")).unwrap();
    assert!(auth.lines().all(|l| l.ends_with(" tls")), "{auth}");
    d.kill().await;
    env.teardown().await;
}

/// No login over an unencrypted connection, and TLS by default for any SMTP
/// server that is not on this machine.
#[tokio::test]
async fn the_dispatcher_never_logs_in_in_the_clear_and_defaults_to_starttls() {
    let run = |extra: &[(&str, &str)]| {
        let mut cmd = Command::new(python());
        cmd.arg(example("dispatcher.py"))
            .env("AMQP_URL", "amqp://nobody:nobody@127.0.0.1:1/%2f")
            .env("MAIL_FROM", "no-reply@example.com")
            .env("METRICS_ADDR", "off")
            .env_remove("SMTP_TLS")
            .env_remove("SMTP_STARTTLS")
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    };
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        run(&[("SMTP_USER", "u"), ("SMTP_TLS", "none")]).output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("never logs in over an unencrypted connection"),
        "{err}"
    );
    // Off loopback, STARTTLS on port 587 unless told otherwise; said at start.
    let mut child = run(&[
        ("SMTP_HOST", "smtp.example.invalid"),
        ("DEDUPE_DB", ":memory:"),
    ])
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut said = String::new();
    while let Ok(Ok(Some(line))) = tokio::time::timeout_at(deadline, lines.next_line()).await {
        if line.contains("SMTP: ") {
            said = line;
            break;
        }
    }
    assert!(
        said.contains("smtp.example.invalid:587, TLS starttls"),
        "{said:?}"
    );
    let _ = child.kill().await;
}

/// A profile email such as `victim@example.com, attacker@example.net` sent
/// the link to both. The worker no longer makes such an event; one forged
/// into the queue is refused (MALFORMED_EVENT), and the recipient of a good
/// one is given to the SMTP server explicitly, alone.
#[tokio::test]
async fn an_event_for_more_than_one_address_is_sent_nowhere() {
    use lapin::options::BasicPublishOptions;
    let env = Env::start().await;
    env.release_email_queue().await;
    let dir = scratch(&env, "one-recipient");
    let inbox_dir = dir.join("inbox");
    let port = free_port();
    let _smtp = smtp(port, &inbox_dir, 0.0).await;
    let d = Dispatcher::start(&env, port, &dir, &[]).await;
    for (n, to) in [
        "victim@example.com, attacker@example.net",
        "\"victim@example.com\" <attacker@example.net>",
        "victim@example.com\r\nBcc: attacker@example.net",
    ]
    .into_iter()
    .enumerate()
    {
        let token = uuid::Uuid::new_v4();
        let body = serde_json::json!({
            "id": uuid::Uuid::new_v4(), "tenant": "default", "profileId": ENABLED_PROFILE,
            "to": to, "template": "reset-password", "tokenId": token,
            "verificationLink": format!("https://example.com/verify?tokenId={token}"),
            "timestamp": 1_495_746_285_875i64,
        });
        env.channel
            .basic_publish(
                env.settings.broker.email_exchange.as_str().into(),
                "email.requested".into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                lapin::BasicProperties::default()
                    .with_message_id(format!("forged-{n}").into())
                    .with_content_type("application/json".into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    d.wait_metric(
        "profile_email_dispatcher_dead_lettered_total{code=\"MALFORMED_EVENT\"}",
        3.0,
        Duration::from_secs(20),
    )
    .await;
    let dead = dead_letters(&env).await;
    assert_eq!(dead.len(), 3, "{dead:?}");
    for (code, reason, _) in &dead {
        assert_eq!(code, "MALFORMED_EVENT");
        assert!(reason.contains("is not one address"), "{reason}");
    }
    assert!(inbox(&inbox_dir).is_empty());
    // A good one: the envelope names its one recipient.
    request_emails(&env, 1).await;
    assert_eq!(
        wait_inbox(&inbox_dir, 1, Duration::from_secs(20))
            .await
            .len(),
        1
    );
    let recipients = std::fs::read_to_string(inbox_dir.join("recipients.log")).unwrap();
    assert_eq!(recipients, "jane@example.com\n");
    d.kill().await;
    env.teardown().await;
}
