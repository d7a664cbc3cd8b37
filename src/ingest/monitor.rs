//! Watches the results consumer from outside the ingest loop, so that a stall shows even when
//! the loop receives nothing: JetStream stops delivering, silently, once `max_ack_pending`
//! results are delivered and unacked. Every `period` it reads the consumer's info and sets the
//! gauges `tally_results_ack_pending`, `tally_results_max_ack_pending`, `tally_results_pending`
//! and `tally_results_oldest_unacked_seconds`; while the ack-pending count is at its cap **and**
//! the oldest unacked result has waited `--stall-after` (default 60 s), `/readyz` answers 503
//! with the condition `results_consumer`. The cap alone is not a stall: a large batch in
//! hand reaches it for a moment in normal operation.

use std::time::Duration;

use async_nats::jetstream::{consumer::PullConsumer, stream::Stream};
use metrics::gauge;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::http::Health;
use crate::metrics::names;

/// The readiness condition this monitor sets.
pub const CONDITION: &str = "results_consumer";

/// What one look at the consumer saw.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerView {
    /// Delivered and not acked.
    pub ack_pending: u64,
    /// The cap (≤ 0: none).
    pub max_ack_pending: i64,
    /// In the stream, not yet delivered.
    pub pending: u64,
    /// Age of the oldest unacked result, if any.
    pub oldest_unacked: Option<Duration>,
}

impl ConsumerView {
    /// Why the consumer is stalled, if it is: at its ack-pending cap JetStream delivers
    /// nothing more until something is acked, and the oldest unacked result has waited at
    /// least `after` (so this is not just a batch in hand).
    pub fn stall(&self, after: Duration) -> Option<String> {
        let cap = self.max_ack_pending;
        let old = self.oldest_unacked.is_some_and(|age| age >= after);
        (cap > 0 && self.ack_pending >= cap as u64 && old).then(|| {
            let age = self.oldest_unacked.map(|a| format!(", the oldest for {} s", a.as_secs())).unwrap_or_default();
            format!(
                "stalled: {} results delivered and unacked, at max_ack_pending {cap}{age}; {} more wait undelivered",
                self.ack_pending, self.pending
            )
        })
    }
}

/// Reads the consumer's state once.
pub async fn look(consumer: &mut PullConsumer, stream: &Stream) -> Result<ConsumerView, String> {
    let info = consumer.info().await.map_err(|e| e.to_string())?.clone();
    let oldest_unacked = if info.num_ack_pending > 0 {
        // Everything at or below the ack floor is acked: the next message is the oldest not.
        let next = info.ack_floor.stream_sequence + 1;
        match stream.get_raw_message(next).await {
            Ok(m) => {
                let published = m.time.unix_timestamp_nanos();
                let now = time_now_nanos();
                Some(Duration::from_nanos(now.saturating_sub(published).max(0) as u64))
            }
            Err(e) => {
                debug!(sequence = next, error = %e, "cannot read the oldest unacked result");
                None
            }
        }
    } else {
        None
    };
    Ok(ConsumerView {
        ack_pending: info.num_ack_pending as u64,
        max_ack_pending: info.config.max_ack_pending,
        pending: info.num_pending,
        oldest_unacked,
    })
}

fn time_now_nanos() -> i128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or_default()
}

/// Looks every `period` until `shutdown`, setting the gauges and the readiness condition.
pub async fn run(
    mut consumer: PullConsumer,
    stream: Stream,
    health: std::sync::Arc<Health>,
    period: Duration,
    stall_after: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_stalled = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        match look(&mut consumer, &stream).await {
            Ok(view) => {
                gauge!(names::RESULTS_ACK_PENDING).set(view.ack_pending as f64);
                gauge!(names::RESULTS_MAX_ACK_PENDING).set(view.max_ack_pending as f64);
                gauge!(names::RESULTS_PENDING).set(view.pending as f64);
                gauge!(names::RESULTS_OLDEST_UNACKED_SECONDS)
                    .set(view.oldest_unacked.map(|d| d.as_secs_f64()).unwrap_or(0.0));
                let stall = view.stall(stall_after);
                if let Some(why) = &stall {
                    if !was_stalled {
                        warn!(reason = %why, "results consumer stalled");
                    }
                } else if was_stalled {
                    warn!("results consumer delivering again");
                }
                was_stalled = stall.is_some();
                health.set_condition(CONDITION, stall);
            }
            Err(e) => debug!(error = %e, "cannot read the results consumer's info"),
        }
    }
    health.set_condition(CONDITION, None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalled_only_at_the_cap() {
        let view = |ack_pending, max_ack_pending| ConsumerView {
            ack_pending,
            max_ack_pending,
            pending: 3,
            oldest_unacked: Some(Duration::from_secs(42)),
        };
        let after = Duration::from_secs(30);
        assert_eq!(view(19, 20).stall(after), None);
        let why = view(20, 20).stall(after).unwrap_or_default();
        assert!(why.contains("at max_ack_pending 20") && why.contains("42 s"), "{why}");
        assert_eq!(view(5000, -1).stall(after), None);
        // At the cap with a young oldest result: a batch in hand, not a stall.
        assert_eq!(view(20, 20).stall(Duration::from_secs(60)), None);
        let unknown_age = ConsumerView { oldest_unacked: None, ..view(20, 20) };
        assert_eq!(unknown_age.stall(after), None);
    }
}
