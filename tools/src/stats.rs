//! Summaries of measured durations: mean and percentiles, for benchmark and demo reports.

use std::time::Duration;

/// Durations of repeated operations.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    micros: Vec<f64>,
}

impl Samples {
    /// An empty set of samples.
    pub fn new() -> Self {
        Samples::default()
    }

    /// Records one duration.
    pub fn push(&mut self, d: Duration) {
        self.micros.push(d.as_secs_f64() * 1e6);
    }

    /// The number of samples.
    pub fn len(&self) -> usize {
        self.micros.len()
    }

    /// True without samples.
    pub fn is_empty(&self) -> bool {
        self.micros.is_empty()
    }

    /// Mean in microseconds (0 without samples).
    pub fn mean_us(&self) -> f64 {
        if self.micros.is_empty() {
            return 0.0;
        }
        self.micros.iter().sum::<f64>() / self.micros.len() as f64
    }

    /// The `q`-quantile (0..=1, nearest rank) in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.micros.is_empty() {
            return 0.0;
        }
        let mut sorted = self.micros.clone();
        sorted.sort_by(f64::total_cmp);
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }

    /// Total in seconds.
    pub fn total_s(&self) -> f64 {
        self.micros.iter().sum::<f64>() / 1e6
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
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_nearest_rank() {
        let mut s = Samples::new();
        for us in 1..=100 {
            s.push(Duration::from_micros(us));
        }
        assert_eq!(s.quantile_us(0.5).round(), 50.0);
        assert_eq!(s.quantile_us(0.99).round(), 99.0);
        assert_eq!(s.mean_us().round(), 51.0);
        assert_eq!(human_us(1500.0), "1.5 ms");
    }
}
