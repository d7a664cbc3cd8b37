//! Summaries of measured durations: mean and percentiles, for benchmark and demo reports.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Significant decimal digits the percentiles keep (a value is within 0.1% of the truth).
const SIGNIFICANT_DIGITS: u8 = 3;

/// The longest duration the percentiles tell apart; a longer one counts as this long (the mean
/// and the total stay exact).
const LONGEST: Duration = Duration::from_secs(3600);

/// Durations of repeated operations: percentiles from an HDR histogram of nanoseconds (to 3
/// significant digits), mean and total from the exact sum.
#[derive(Clone, Debug)]
pub struct Samples {
    /// Nanoseconds, so that sub-microsecond operations keep their precision.
    histogram: Histogram<u64>,
    /// Exact, for the mean and the total.
    sum_us: f64,
}

impl Default for Samples {
    fn default() -> Self {
        let histogram = Histogram::new_with_bounds(1, LONGEST.as_nanos() as u64, SIGNIFICANT_DIGITS)
            .expect("constant bounds are valid");
        Samples { histogram, sum_us: 0.0 }
    }
}

impl Samples {
    /// An empty set of samples.
    pub fn new() -> Self {
        Samples::default()
    }

    /// Records one duration.
    pub fn push(&mut self, d: Duration) {
        self.histogram.saturating_record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        self.sum_us += d.as_secs_f64() * 1e6;
    }

    /// The number of samples.
    pub fn len(&self) -> usize {
        self.histogram.len() as usize
    }

    /// True without samples.
    pub fn is_empty(&self) -> bool {
        self.histogram.is_empty()
    }

    /// Mean in microseconds (0 without samples).
    pub fn mean_us(&self) -> f64 {
        if self.is_empty() {
            return 0.0;
        }
        self.sum_us / self.len() as f64
    }

    /// The `q`-quantile (0..=1) in microseconds, to 3 significant digits (0 without samples).
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.is_empty() {
            return 0.0;
        }
        self.histogram.value_at_quantile(q) as f64 / 1e3
    }

    /// Total in seconds.
    pub fn total_s(&self) -> f64 {
        self.sum_us / 1e6
    }
}

/// A duration in microseconds as a short human string (`812 µs`, `3.4 ms`, `1.20 s`).
pub fn human_us(us: f64) -> String {
    if us < 1_000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.1} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

/// The resident set size of this process in bytes (Linux `/proc/self/statm`), if readable.
pub fn resident_bytes() -> Option<u64> {
    statm_resident("/proc/self/statm")
}

/// The resident set size of process `pid`, in bytes, where `/proc` exists.
pub fn resident_bytes_of(pid: u32) -> Option<u64> {
    statm_resident(&format!("/proc/{pid}/statm"))
}

fn statm_resident(path: &str) -> Option<u64> {
    let statm = std::fs::read_to_string(path).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within hdrhistogram's precision (3 significant digits) of `expected`.
    fn close(actual: f64, expected: f64) -> bool {
        (actual - expected).abs() <= expected * 1e-3
    }

    #[test]
    fn quantiles_are_nearest_rank_to_three_digits() {
        let mut s = Samples::new();
        for us in 1..=100 {
            s.push(Duration::from_micros(us));
        }
        assert_eq!(s.len(), 100);
        for (q, expected) in [(0.0, 1.0), (0.5, 50.0), (0.9, 90.0), (0.99, 99.0), (1.0, 100.0)] {
            let actual = s.quantile_us(q);
            assert!(close(actual, expected), "q{q}: {actual} µs, expected {expected} µs");
        }
        assert!((s.mean_us() - 50.5).abs() < 1e-9, "{}", s.mean_us());
        assert!((s.total_s() - 0.00505).abs() < 1e-12, "{}", s.total_s());
    }

    #[test]
    fn quantiles_span_microseconds_to_minutes() {
        let mut s = Samples::new();
        // 1,000 samples at 1.5 µs, 10 at 250 ms, 1 at 2 min: the tail lands on its own ranks.
        for _ in 0..1_000 {
            s.push(Duration::from_nanos(1_500));
        }
        for _ in 0..10 {
            s.push(Duration::from_millis(250));
        }
        s.push(Duration::from_secs(120));
        assert!(close(s.quantile_us(0.5), 1.5), "{}", s.quantile_us(0.5));
        assert!(close(s.quantile_us(0.995), 250_000.0), "{}", s.quantile_us(0.995));
        assert!(close(s.quantile_us(1.0), 120e6), "{}", s.quantile_us(1.0));
    }

    #[test]
    fn no_samples_read_as_zero() {
        let s = Samples::new();
        assert!(s.is_empty());
        assert_eq!((s.mean_us(), s.quantile_us(0.99), s.total_s()), (0.0, 0.0, 0.0));
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_us(812.0), "812 µs");
        assert_eq!(human_us(1500.0), "1.5 ms");
        assert_eq!(human_us(1_200_000.0), "1.20 s");
    }
}
