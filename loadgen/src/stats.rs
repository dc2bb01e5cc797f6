//! Summaries of what a benchmark round measured. Pure, so the arithmetic the
//! headline numbers rest on is unit-tested.

/// Nearest-rank percentile of an ascending slice; `p` in 0..=100. NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

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
    pub max_ms: f64,
}

impl Latency {
    pub fn of(mut samples_ms: Vec<f64>) -> Self {
        samples_ms.sort_by(f64::total_cmp);
        Latency {
            p50_ms: percentile(&samples_ms, 50.0),
            p99_ms: percentile(&samples_ms, 99.0),
            max_ms: samples_ms.last().copied().unwrap_or(f64::NAN),
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
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn p99_of_a_small_sample_is_its_largest_but_one_only_when_large_enough() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        // ceil(0.99 * 10) = 10: with ten samples p99 is the maximum.
        assert_eq!(percentile(&v, 99.0), 10.0);
    }

    #[test]
    fn median_odd_even_and_nan() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn latency_summary_sorts_its_samples() {
        let l = Latency::of(vec![5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(l.p50_ms, 3.0);
        assert_eq!(l.max_ms, 5.0);
        assert_eq!(l.p99_ms, 5.0);
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
