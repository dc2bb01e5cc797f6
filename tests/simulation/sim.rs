//! The simulation's one world: its seeded randomness, its clock (tokio's,
//! paused, so time moves only when every task waits), the faults it may
//! inject, and what it found. Every port of the in-memory broker and store
//! takes its turn through here, so one seed gives one run.

use super::broker::BrokerState;
use super::store::StoreState;
use profile_worker::pipeline::ports::World;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use uuid::Uuid;

/// The epoch the simulated clock starts at (2023-11-14).
pub const EPOCH_MS: i64 = 1_700_000_000_000;

/// How often each fault strikes, per chance it gets.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// Off once the run quiesces: what is left must then drain.
    pub on: bool,
    /// A store call fails before it does anything (the connection dropped).
    pub store_down: f64,
    /// A commit is applied, and its result never reaches the worker.
    pub commit_result_lost: f64,
    /// The broker refuses a publication (nack).
    pub nack: f64,
    /// The worker's broker session drops during a call.
    pub session_drop: f64,
}

pub struct State {
    pub rng: fastrand::Rng,
    pub faults: Faults,
    pub broker: BrokerState,
    pub store: StoreState,
    /// Invariants broken, as they were seen.
    pub violations: Vec<String>,
    /// What happened, in order: the run's fingerprint (same seed, same text).
    pub journal: Vec<String>,
    start: tokio::time::Instant,
    /// The longest pause a port call takes, in microseconds: spreads the
    /// workers' steps over time so their awaits interleave differently.
    pub max_pause_us: u64,
}

impl State {
    /// Whether a fault of probability `p` strikes now.
    pub fn chance(&mut self, p: f64) -> bool {
        self.faults.on && p > 0.0 && self.rng.f64() < p
    }

    pub fn now_ms(&self) -> i64 {
        EPOCH_MS + (tokio::time::Instant::now() - self.start).as_millis() as i64
    }

    pub fn violation(&mut self, what: String) {
        self.journal.push(format!("VIOLATION {what}"));
        self.violations.push(what);
    }

    pub fn note(&mut self, what: String) {
        let at = (tokio::time::Instant::now() - self.start).as_micros();
        self.journal.push(format!("{at} {what}"));
    }
}

#[derive(Clone)]
pub struct Sim(Arc<Mutex<State>>);

impl Sim {
    pub fn new(seed: u64, faults: Faults, broker: BrokerState, store: StoreState) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let max_pause_us = rng.u64(0..2_000);
        Sim(Arc::new(Mutex::new(State {
            rng,
            faults,
            broker,
            store,
            violations: Vec::new(),
            journal: Vec::new(),
            start: tokio::time::Instant::now(),
            max_pause_us,
        })))
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A port call's own time: a seeded pause, so that concurrent tasks
    /// reach their next step in a seed-chosen order.
    pub async fn pause(&self) {
        let us = {
            let mut s = self.lock();
            let max = s.max_pause_us;
            s.rng.u64(0..=max)
        };
        tokio::time::sleep(Duration::from_micros(us)).await;
    }
}

/// The pipeline's clock and randomness, from the seed.
pub struct SimWorld(pub Sim);

impl World for SimWorld {
    fn now_ms(&self) -> i64 {
        self.0.lock().now_ms()
    }

    fn new_id(&self) -> Uuid {
        let bytes = self.0.lock().rng.u128(..).to_le_bytes();
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }

    fn trace_ids(&self) -> [u8; 24] {
        let mut s = self.0.lock();
        let mut b = [0u8; 24];
        b[..16].copy_from_slice(&s.rng.u128(..).to_le_bytes());
        b[16..].copy_from_slice(&s.rng.u64(..).to_le_bytes());
        b
    }
}
