//! Summaries of what a benchmark round measured. Pure, so the arithmetic the
//! headline numbers rest on is unit-tested.

/// Median (mean of the middle two for an even count). NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// Round-trip latencies of one round, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// Latencies recorded in microseconds, from 1 µs to 10 minutes, to three
/// significant digits (HdrHistogram: constant memory, exact enough for p99.9).
pub struct Recorder(hdrhistogram::Histogram<u64>);

impl Default for Recorder {
    fn default() -> Self {
        Recorder(
            hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 3)
                .expect("valid histogram bounds"),
        )
    }
}

impl Recorder {
    pub fn record(&mut self, d: std::time::Duration) {
        // Past the top bound (ten minutes) is recorded as the top bound.
        self.0
            .saturating_record(d.as_micros().clamp(1, u64::MAX as u128) as u64);
    }

    pub fn latency(&self) -> Latency {
        let ms = |q: f64| {
            if self.0.is_empty() {
                f64::NAN
            } else {
                self.0.value_at_quantile(q) as f64 / 1000.0
            }
        };
        Latency {
            p50_ms: ms(0.50),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: if self.0.is_empty() {
                f64::NAN
            } else {
                self.0.max() as f64 / 1000.0
            },
        }
    }
}

/// worker ÷ ceiling for rounds run back to back (A B A B …): each pair shares
/// the machine's state at that moment, so the median of the pairwise ratios is
/// less sensitive to drift than the ratio of the two medians.
pub fn paired_ratio(worker: &[f64], ceiling: &[f64]) -> f64 {
    let ratios: Vec<f64> = worker
        .iter()
        .zip(ceiling)
        .filter(|(_, c)| **c > 0.0)
        .map(|(w, c)| w / c)
        .collect();
    median(&ratios)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_and_nan() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn the_recorder_reports_quantiles_within_its_precision() {
        let mut r = Recorder::default();
        assert!(r.latency().p50_ms.is_nan());
        // 1 ms … 1000 ms, one sample each.
        for ms in 1..=1000u64 {
            r.record(std::time::Duration::from_millis(ms));
        }
        let l = r.latency();
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.002;
        assert!(close(l.p50_ms, 500.0), "{l:?}");
        assert!(close(l.p99_ms, 990.0), "{l:?}");
        assert!(close(l.p999_ms, 999.0), "{l:?}");
        assert!(close(l.max_ms, 1000.0), "{l:?}");
    }

    #[test]
    fn paired_ratio_is_the_median_of_pairwise_ratios() {
        // Drift doubles both rates in round 2; pairwise ratios stay 0.5.
        assert_eq!(
            paired_ratio(&[50.0, 100.0, 52.0], &[100.0, 200.0, 100.0]),
            0.5
        );
        assert!(paired_ratio(&[1.0], &[0.0]).is_nan());
    }
}
