//! Jittered exponential backoff, the one every retry loop of the worker uses
//! (broker reconnects, database retries, refused replies). Pure: delays only.

use backon::BackoffBuilder;
use std::time::Duration;

/// Exponential backoff bounds (the delays: [`backoff`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn millis(min: u64, max: u64) -> Self {
        Backoff {
            min: Duration::from_millis(min),
            max: Duration::from_millis(max.max(min)),
        }
    }

    pub fn delays(&self) -> impl Iterator<Item = Duration> {
        backoff(self.min, self.max)
    }
}

/// Exponential delays from `start` to `max`, each with up to as much again of
/// random jitter, so workers that lost the same server do not return in step.
pub fn backoff(start: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::new()
        .with_min_delay(start)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter_on_top() {
        let start = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let delays: Vec<Duration> = backoff(start, max).take(12).collect();
        let mut base = start;
        for d in &delays {
            assert!(*d >= base && *d <= base * 2, "{d:?} for base {base:?}");
            base = (base * 2).min(max);
        }
        // Jitter: two runs of the schedule do not agree everywhere.
        let again: Vec<Duration> = backoff(start, max).take(12).collect();
        assert_ne!(delays, again);
    }
}
