//! Retry policies: every retry loop in tally (and in the tools' simulated workers) backs off
//! with backon's exponential backoff, and the numbers of each policy are stated here once.
//!
//! A policy is an [`ExponentialBuilder`]. Loops that must also stop on shutdown iterate its
//! backoff (`build()` gives an iterator of delays) inside their `tokio::select!`; a policy
//! without a limit on attempts never runs out, and [`pause`] takes its next delay.

use std::time::Duration;

pub use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// The longest pause between two attempts to rebuild something lost.
pub const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// The longest pause between two attempts to reach a service at start-up.
pub const STARTUP_MAX: Duration = Duration::from_secs(5);

/// Rebuilding what a running service needs and lost or could not set up yet (ingest's results
/// stream and consumer, its pull stream, the change feed's LISTEN session): 100 ms, doubling,
/// up to [`RECONNECT_MAX`], forever (the loops stop on shutdown).
pub fn reconnect() -> ExponentialBuilder {
    exponential(Duration::from_millis(100), RECONNECT_MAX).without_max_times()
}

/// The gateway setting up the results stream and its object bucket: as [`reconnect`], from
/// 200 ms.
pub fn gateway_stream() -> ExponentialBuilder {
    reconnect().with_min_delay(Duration::from_millis(200))
}

/// Waiting for Postgres or NATS at start-up (`tally serve`, the gateway): `first` (at least
/// 10 ms), doubling, up to [`STARTUP_MAX`], until the caller's deadline or shutdown.
pub fn startup(first: Duration) -> ExponentialBuilder {
    exponential(first.max(Duration::from_millis(10)), STARTUP_MAX).without_max_times()
}

/// The one-shot commands connecting to NATS: 100 ms, doubling, up to 2 s, until the caller's
/// deadline (`--nats-connect-timeout`).
pub fn nats_connect() -> ExponentialBuilder {
    exponential(Duration::from_millis(100), Duration::from_secs(2)).without_max_times()
}

/// Opening the database with bounded attempts (`--connect-attempts`, the first included):
/// `first`, doubling, up to 30 s, `attempts - 1` pauses.
pub fn db_connect(first: Duration, attempts: u32) -> ExponentialBuilder {
    exponential(first, Duration::from_secs(30)).with_max_times(attempts.saturating_sub(1) as usize)
}

/// A claim that found every claimable row locked by something else: 250 µs, doubling, up to
/// 5 ms, each pause plus a random part of up to itself so that racing claims spread out; the
/// claim's time budget bounds the attempts.
pub fn claim_contention() -> ExponentialBuilder {
    exponential(Duration::from_micros(250), Duration::from_millis(5)).with_jitter().without_max_times()
}

/// A batch of job log lines the database refused: 400 ms, doubling, up to 12.8 s, `attempts -
/// 1` pauses (`attempts` includes the first).
pub fn job_log_batch(attempts: u32) -> ExponentialBuilder {
    exponential(Duration::from_millis(400), Duration::from_millis(12_800))
        .with_max_times(attempts.saturating_sub(1) as usize)
}

/// `first`, doubling each attempt, capped at `max`.
pub fn exponential(first: Duration, max: Duration) -> ExponentialBuilder {
    ExponentialBuilder::new().with_factor(2.0).with_min_delay(first).with_max_delay(max)
}

/// The next pause of a backoff without a limit on attempts (which never runs out; should one,
/// the pause is [`RECONNECT_MAX`]).
pub fn pause(backoff: &mut ExponentialBackoff) -> Duration {
    backoff.next().unwrap_or(RECONNECT_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first `n` delays of `policy`, in whole microseconds (backon computes in `f32`).
    fn delays(policy: ExponentialBuilder, n: usize) -> Vec<u128> {
        policy.build().take(n).map(|d| (d.as_secs_f64() * 1e6).round() as u128).collect()
    }

    fn micros(ms: &[u64]) -> Vec<u128> {
        ms.iter().map(|m| *m as u128 * 1000).collect()
    }

    #[test]
    fn reconnecting_doubles_from_100_ms_to_30_s_forever() {
        let d = delays(reconnect(), 12);
        assert_eq!(d[..10], micros(&[100, 200, 400, 800, 1600, 3200, 6400, 12_800, 25_600, 30_000])[..]);
        assert_eq!(d[11], 30_000_000);
        assert_eq!(delays(gateway_stream(), 3), micros(&[200, 400, 800]));
        assert_eq!(reconnect().build().take(1000).count(), 1000);
    }

    #[test]
    fn start_up_waits_double_up_to_5_s() {
        assert_eq!(delays(startup(Duration::from_millis(250)), 7), micros(&[250, 500, 1000, 2000, 4000, 5000, 5000]));
        assert_eq!(delays(startup(Duration::ZERO), 2), micros(&[10, 20]));
        assert_eq!(delays(nats_connect(), 7), micros(&[100, 200, 400, 800, 1600, 2000, 2000]));
    }

    #[test]
    fn bounded_policies_stop_after_the_last_attempt() {
        // Eight attempts: seven pauses, as `--connect-attempts 8` always meant.
        assert_eq!(
            delays(db_connect(Duration::from_millis(250), 8), 100),
            micros(&[250, 500, 1000, 2000, 4000, 8000, 16_000])
        );
        assert_eq!(db_connect(Duration::from_millis(250), 1).build().count(), 0);
        assert_eq!(db_connect(Duration::from_millis(250), 0).build().count(), 0);
        // The job log's old pauses were 200 << attempt (attempt ≥ 1), capped at 200 << 6.
        let old: Vec<u64> = (1..10u32).map(|a| 200 << a.min(6)).collect();
        assert_eq!(delays(job_log_batch(10), 100), micros(&old));
    }

    #[test]
    fn claim_pauses_are_jittered_by_up_to_themselves() {
        for _ in 0..50 {
            let d = delays(claim_contention(), 7);
            for (got, base) in d.iter().zip([250u128, 500, 1000, 2000, 4000, 5000, 5000]) {
                assert!(*got >= base && *got <= 2 * base, "{got} µs for a pause of {base} µs");
            }
        }
    }
}
