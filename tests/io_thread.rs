//! Issue 31: if the thread lapin runs a connection's I/O on dies (a panic on
//! a peer's bytes took 33 s to notice, through a heartbeat timeout), the
//! worker notices at once, says why at error level, turns unready, and
//! reconnects. A binary of its own: the panic hook is process-wide, so any
//! other worker in the process would reconnect too, and the log is read
//! from this process's own subscriber.
//!
//! The parser no longer panics on anything known (the frame property test
//! in `src/broker/hostile_frames.rs`), so the panic is made here: a thread
//! with the I/O thread's name panics, as a lapin I/O thread would.

use profile_worker::broker::io_thread::IO_THREAD_NAME;
use profile_worker_testkit::*;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Every log line of this process, as the worker writes it.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

async fn metric(env: &Env, name: &str) -> f64 {
    let (_, page) = http_get(env.http(), "/metrics").await.expect("metrics");
    samples(&page).get(name).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_the_amqp_io_thread_is_noticed_at_once_and_the_worker_reconnects() {
    let log = Captured::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    let mut env = Env::prepare_with(|s| {
        // Slow enough to see the worker unready in between.
        s.worker.broker_retry_min_ms = 2_000;
        s.worker.broker_retry_max_ms = 2_000;
    })
    .await;
    env.start_worker().await;
    assert_eq!(
        env.call("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE))
            .await
            .status,
        200
    );
    let reconnects = "profile_worker_reconnects_total";
    assert_eq!(metric(&env, reconnects).await, 0.0);

    let _ = std::thread::Builder::new()
        .name(IO_THREAD_NAME.into())
        .spawn(|| panic!("ShortString exceeds maximum length: ShortStringError(257)"))
        .unwrap()
        .join();

    // At once: unready within a second (a heartbeat would take 20 s).
    let unready = http_until(
        env.http(),
        "/readyz",
        Duration::from_secs(1),
        |status, _| status == 503,
    )
    .await
    .map(|(status, _)| status);
    assert_eq!(unready, Some(503), "/readyz turned unready at once");
    let back = http_until(
        env.http(),
        "/readyz",
        Duration::from_secs(15),
        |status, _| status == 200,
    )
    .await
    .map(|(status, _)| status);
    assert_eq!(back, Some(200), "ready again after reconnecting");
    assert_eq!(metric(&env, reconnects).await, 1.0);
    assert_eq!(
        metric(
            &env,
            "profile_worker_broker_errors_total{kind=\"io_thread\"}"
        )
        .await,
        1.0
    );
    let text = log.text();
    let line = text
        .lines()
        .find(|l| l.contains("I/O thread panicked"))
        .unwrap_or_else(|| panic!("an error line says why:\n{text}"));
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("ShortStringError(257)"), "{line}");
    assert_eq!(
        env.call("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE))
            .await
            .status,
        200,
        "answered on the new connection"
    );
    env.stop_worker().await;
    env.teardown().await;
}
