//! Two lanes into one worker (CONTRACT §1): interactive commands (a login
//! waiting for its ticket) on the command queue, and bulk commands (an import,
//! fire and forget) on the bulk queue. Each lane has consumers of its own, so
//! an interactive command never queues behind a bulk delivery the worker
//! holds; what the two still share is the machine. So a bulk consumer asks
//! before each batch how much it may take ([`Lanes::admit_bulk`]): while
//! interactive commands are in hand (taken and not yet settled), only the
//! share bulk is owed (`BULK_SHARE_PERCENT` of the period's commands), so a
//! steady interactive load never starves an import; when none is, everything.
//!
//! "In hand" rather than "waiting": small bulk batches beside every
//! interactive command (a policy measured here,
//! bench/archive/BENCHMARKS-to-2026-12-07.md, "Lanes") drained an import
//! faster but doubled a serial caller's latency under a steady interactive
//! load (p99 171 ms against 38), since on two shared cores a login's every hop
//! (broker, worker, PostgreSQL) queues behind bulk work.

use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Which queue a consumer takes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    Interactive,
    Bulk,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Interactive, Lane::Bulk];

    /// The `lane` label of the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Interactive => "interactive",
            Lane::Bulk => "bulk",
        }
    }
}

/// Commands each lane took in the current period: from the first
/// interactive command in hand until none is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Served {
    pub interactive: u64,
    pub bulk: u64,
}

/// How many of `available` bulk commands may start now, while interactive
/// commands are in hand: bulk's count in the period may reach
/// `share_percent` of all the period's commands.
pub fn owed(share_percent: u8, served: Served, available: usize) -> usize {
    let share = u64::from(share_percent.min(100));
    if share == 100 {
        return available;
    }
    let allowed = (served.interactive * share).div_ceil(100 - share);
    usize::try_from(allowed.saturating_sub(served.bulk))
        .unwrap_or(usize::MAX)
        .min(available)
}

/// The lanes' policy, pure: how many of `available` bulk commands may start
/// now, with `in_hand` interactive commands in hand and `served` in the
/// current period; `None` when none may (wait for a change).
pub fn bulk_allowance(
    share_percent: u8,
    in_hand: usize,
    served: Served,
    available: usize,
) -> Option<usize> {
    if in_hand == 0 {
        return Some(available);
    }
    let n = owed(share_percent, served, available);
    (n > 0).then_some(n)
}

#[derive(Debug, Default)]
struct State {
    /// Interactive commands taken and not yet settled.
    interactive_in_hand: usize,
    served: Served,
}

/// The worker's lanes, shared by all its consumers.
#[derive(Debug)]
pub struct Lanes {
    share_percent: u8,
    state: Mutex<State>,
    changed: Notify,
}

impl Lanes {
    pub fn new(share_percent: u8) -> Arc<Self> {
        Arc::new(Lanes {
            share_percent,
            state: Mutex::default(),
            changed: Notify::new(),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // A panic while holding the lock left counters merely stale.
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// `n` interactive commands taken into a batch, in hand until the guard
    /// is dropped (when their batch is settled: acked, its confirms in).
    pub fn interactive(self: &Arc<Self>, n: usize) -> InHand {
        self.with(|s| {
            s.interactive_in_hand += n;
            s.served.interactive += n as u64;
        });
        self.changed.notify_waiters();
        InHand {
            lanes: self.clone(),
            n,
        }
    }

    /// How many of the `available` bulk commands this consumer holds may be
    /// processed now ([`bulk_allowance`]), waiting until that is at least one.
    pub async fn admit_bulk(&self, available: usize) -> usize {
        loop {
            // Registered before the state is read, so no change is missed.
            let changed = self.changed.notified();
            let admitted = self.with(|s| {
                let n = bulk_allowance(
                    self.share_percent,
                    s.interactive_in_hand,
                    s.served,
                    available,
                );
                // Counted only within a period: with none in hand there is none.
                if let (Some(n), true) = (n, s.interactive_in_hand > 0) {
                    s.served.bulk += n as u64;
                }
                n
            });
            match admitted {
                Some(n) => return n,
                None if available == 0 => return 0,
                None => changed.await,
            }
        }
    }

    #[cfg(test)]
    fn served(&self) -> Served {
        self.with(|s| s.served)
    }
}

/// Interactive commands in hand; released when dropped.
#[derive(Debug)]
pub struct InHand {
    lanes: Arc<Lanes>,
    n: usize,
}

impl Drop for InHand {
    fn drop(&mut self) {
        self.lanes.with(|s| {
            s.interactive_in_hand = s.interactive_in_hand.saturating_sub(self.n);
            if s.interactive_in_hand == 0 {
                s.served = Served::default();
            }
        });
        self.lanes.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn served(interactive: u64, bulk: u64) -> Served {
        Served { interactive, bulk }
    }

    #[test]
    fn bulk_is_owed_its_share_of_the_period_and_no_more() {
        // 10 %: one bulk command for every nine interactive ones.
        assert_eq!(owed(10, served(0, 0), 100), 0);
        assert_eq!(owed(10, served(1, 0), 100), 1);
        assert_eq!(owed(10, served(9, 1), 100), 0);
        assert_eq!(owed(10, served(10, 1), 100), 1);
        assert_eq!(owed(10, served(900, 0), 250), 100);
        assert_eq!(owed(10, served(900, 0), 30), 30, "no more than it holds");
        assert_eq!(owed(50, served(4, 1), 100), 3);
        assert_eq!(owed(100, served(0, 0), 7), 7);
        // Over any period, bulk ends up with at least its share once owed.
        for share in [1u8, 10, 33, 50, 99] {
            let (mut i, mut b) = (0u64, 0u64);
            for step in 0..1_000 {
                i += 1 + step % 7;
                b += owed(share, served(i, b), usize::MAX) as u64;
                assert!(
                    b * 100 + 100 >= (i + b) * u64::from(share),
                    "{share}%: {b} of {}",
                    i + b
                );
            }
        }
    }

    #[test]
    fn bulk_takes_everything_with_none_in_hand_else_its_share() {
        let none = Served::default();
        assert_eq!(bulk_allowance(10, 0, none, 250), Some(250));
        assert_eq!(bulk_allowance(10, 1, served(1, 0), 250), Some(1));
        assert_eq!(bulk_allowance(10, 1, served(1, 1), 250), None);
        assert_eq!(bulk_allowance(10, 400, served(900, 0), 250), Some(100));
    }

    #[tokio::test]
    async fn bulk_takes_everything_while_no_interactive_command_is_in_hand() {
        let lanes = Lanes::new(10);
        assert_eq!(lanes.admit_bulk(250).await, 250);
        assert_eq!(lanes.served(), Served::default(), "no period counted");
    }

    #[tokio::test(start_paused = true)]
    async fn bulk_waits_while_interactive_commands_are_in_hand_but_for_its_share() {
        let lanes = Lanes::new(10);
        let first = lanes.interactive(1);
        // One interactive command: bulk is owed one.
        assert_eq!(lanes.admit_bulk(250).await, 1);
        // Then nothing more until interactive work goes on or ends.
        let waiting = {
            let lanes = lanes.clone();
            tokio::spawn(async move { lanes.admit_bulk(250).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished(), "held back");
        let more = lanes.interactive(9);
        tokio::time::sleep(Duration::from_millis(1)).await;
        // 10 interactive, 1 bulk: owed ceil(10 / 9) - 1 = 1.
        assert!(waiting.is_finished());
        assert_eq!(waiting.await.unwrap(), 1);
        drop(first);
        let waiting = {
            let lanes = lanes.clone();
            tokio::spawn(async move { lanes.admit_bulk(250).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished(), "nine still in hand");
        drop(more);
        assert_eq!(waiting.await.unwrap(), 250, "none in hand: everything");
        assert_eq!(lanes.served(), Served::default(), "the period ended");
    }
}
