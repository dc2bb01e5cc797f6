//! lapin runs each connection's I/O on a thread of its own, named
//! `lapin-io-loop`. If that thread panics, nothing in lapin says so: the
//! connection still reads as connected, and every channel on it waits for
//! frames that never come until a heartbeat times out (issue 31 saw a
//! 33-second stall). A panic hook, installed once per process, tells every
//! session at once, so it drops its connection, reconnects and says why.
//!
//! Which connection's thread it was is not known (the hook sees a thread name,
//! not a connection), so every session of the process reconnects: a panic
//! there is a bug to fix, not a path worth keeping connections on.

use std::sync::{Arc, OnceLock};
use tokio::sync::watch;

/// The name lapin gives each connection's I/O thread (lapin's `io_loop.rs`).
pub const IO_THREAD_NAME: &str = "lapin-io-loop";

/// How many I/O threads have panicked so far, and the last one's message.
type Deaths = (u64, Arc<str>);

fn deaths() -> &'static watch::Sender<Deaths> {
    static DEATHS: OnceLock<watch::Sender<Deaths>> = OnceLock::new();
    DEATHS.get_or_init(|| {
        let sender = watch::Sender::new((0, Arc::from("")));
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            if std::thread::current().name() == Some(IO_THREAD_NAME) {
                let message = panic_message(info);
                if let Some(deaths) = DEATHS.get() {
                    deaths.send_modify(|(n, last)| {
                        *n += 1;
                        *last = Arc::from(message.as_str());
                    });
                }
            }
        }));
        sender
    })
}

fn panic_message(info: &std::panic::PanicHookInfo<'_>) -> String {
    let payload = info.payload();
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string());
    match info.location() {
        Some(at) => format!("{text} (at {}:{})", at.file(), at.line()),
        None => text,
    }
}

/// Watches for a panic of any connection's I/O thread from now on. Installs the
/// panic hook the first time (it calls the hook that was there before).
pub struct Watch(watch::Receiver<Deaths>);

impl Watch {
    pub fn new() -> Self {
        let mut rx = deaths().subscribe();
        rx.mark_unchanged();
        Watch(rx)
    }

    /// Resolves with the panic's message when an I/O thread panics after this
    /// watch was made (or after the last time this resolved).
    pub async fn died(&mut self) -> Arc<str> {
        if self.0.changed().await.is_err() {
            // The sender lives in a static: never dropped.
            std::future::pending::<()>().await;
        }
        self.0.borrow_and_update().1.clone()
    }
}

impl Default for Watch {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_on_an_io_thread_is_seen_at_once_and_others_are_not() {
        let mut watch = Watch::new();
        // Another thread's panic says nothing about a connection.
        let _ = std::thread::Builder::new()
            .name("some-other-thread".into())
            .spawn(|| panic!("not an I/O thread"))
            .unwrap()
            .join();
        let quiet = tokio::time::timeout(std::time::Duration::from_millis(50), watch.died()).await;
        assert!(
            quiet.is_err(),
            "another thread's panic is not an I/O thread's"
        );
        let _ = std::thread::Builder::new()
            .name(IO_THREAD_NAME.into())
            .spawn(|| panic!("ShortString exceeds maximum length"))
            .unwrap()
            .join();
        let why = tokio::time::timeout(std::time::Duration::from_secs(1), watch.died())
            .await
            .expect("seen at once");
        assert!(
            why.starts_with("ShortString exceeds maximum length (at "),
            "{why}"
        );
        // A watch made afterwards has not seen it.
        let mut later = Watch::new();
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), later.died())
                .await
                .is_err()
        );
    }
}
