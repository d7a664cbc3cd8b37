//! Waiting for a service at start-up: one attempt at a time, with doubling backoff, until it
//! answers, a deadline passes (`tally serve --startup-deadline`; none: forever) or shutdown is
//! asked for. Postgres and NATS are waited for the same way, and what is being waited for is
//! kept in [`Waiting`], which `/readyz` shows.

use std::fmt::Display;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::retry::{self, BackoffBuilder};

/// What is being waited for now, by service ("Postgres", "NATS"), as sentences such as
/// `waiting for NATS at nats://127.0.0.1:4222: connection refused`.
#[derive(Debug, Default)]
pub struct Waiting {
    reasons: Mutex<Vec<(&'static str, String)>>,
}

impl Waiting {
    /// Records why `service` is not there yet.
    pub fn set(&self, service: &'static str, reason: String) {
        let mut reasons = self.reasons.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match reasons.iter_mut().find(|(s, _)| *s == service) {
            Some(entry) => entry.1 = reason,
            None => reasons.push((service, reason)),
        }
    }

    /// `service` is there.
    pub fn clear(&self, service: &'static str) {
        self.reasons.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).retain(|(s, _)| *s != service);
    }

    /// Every reason, joined with "; ", or `None` when nothing is waited for.
    pub fn reason(&self) -> Option<String> {
        let reasons = self.reasons.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        (!reasons.is_empty()).then(|| reasons.iter().map(|(_, r)| r.as_str()).collect::<Vec<_>>().join("; "))
    }
}

/// Why one attempt failed, and whether another may succeed.
#[derive(Debug)]
pub struct Failure {
    /// The error, for logs and `/readyz`.
    pub message: String,
    /// Retrying cannot help (no such database, bad credentials): fail at once.
    pub permanent: bool,
}

impl Failure {
    /// A failure another attempt may fix.
    pub fn transient(e: impl Display) -> Failure {
        Failure { message: e.to_string(), permanent: false }
    }
}

/// How to wait for one service.
pub struct Wait<'a> {
    /// The service's name in [`Waiting`] ("Postgres", "NATS").
    pub service: &'static str,
    /// Where it is, without credentials.
    pub at: String,
    /// Give up after this instant (`None`: never).
    pub deadline: Option<Instant>,
    /// The deadline as configured, for the error message.
    pub deadline_setting: Duration,
    /// Stop waiting (and return `Ok(None)`) when cancelled.
    pub shutdown: &'a CancellationToken,
    /// Pause after the first failed attempt (the policy is [`retry::startup`]).
    pub first_backoff: Duration,
    /// Where the current reason is kept.
    pub waiting: &'a Waiting,
}

impl Wait<'_> {
    /// Calls `attempt` until it succeeds (`Ok(Some)`), `shutdown` (`Ok(None)`), a permanent
    /// failure or the deadline (`Err`, naming the service, its address and the last error).
    /// Each attempt is itself cut short by the deadline and by shutdown.
    pub async fn until<T, F, Fut>(&self, mut attempt: F) -> anyhow::Result<Option<T>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut backoff = retry::startup(self.first_backoff).build();
        let mut attempts = 0u32;
        // The last failure an attempt reported, kept for when the deadline cuts one short.
        let mut previous: Option<String> = None;
        self.waiting.set(self.service, format!("waiting for {} at {}", self.service, self.at));
        loop {
            attempts += 1;
            let until_deadline = async {
                match self.deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let outcome = tokio::select! {
                r = attempt() => Some(r),
                _ = until_deadline => None,
                _ = self.shutdown.cancelled() => return Ok(None),
            };
            let last = match outcome {
                Some(Ok(value)) => {
                    self.waiting.clear(self.service);
                    return Ok(Some(value));
                }
                Some(Err(failure)) if failure.permanent => {
                    self.waiting.clear(self.service);
                    anyhow::bail!("cannot connect to {} at {}: {}", self.service, self.at, failure.message);
                }
                Some(Err(failure)) => failure.message,
                None => match &previous {
                    Some(before) => format!("the attempt was still going at the deadline; the one before: {before}"),
                    None => "the attempt was still going at the deadline".to_string(),
                },
            };
            previous = Some(last.clone());
            self.waiting.set(self.service, format!("waiting for {} at {}: {last}", self.service, self.at));
            let now = Instant::now();
            if self.deadline.is_some_and(|d| now >= d) {
                anyhow::bail!(
                    "{} at {} not reachable within the start-up deadline of {} s ({attempts} attempts): {last}",
                    self.service,
                    self.at,
                    self.deadline_setting.as_secs_f64()
                );
            }
            let backoff = retry::pause(&mut backoff);
            warn!(service = self.service, at = %self.at, error = %last, retry_in = ?backoff, "waiting at start-up");
            let pause = match self.deadline {
                Some(d) => backoff.min(d.saturating_duration_since(now)),
                None => backoff,
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.shutdown.cancelled() => return Ok(None),
            }
        }
    }
}

/// The deadline `setting` from now (zero: none).
pub fn deadline(setting: Duration) -> Option<Instant> {
    (!setting.is_zero()).then(|| Instant::now() + setting)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait<'a>(deadline: Duration, shutdown: &'a CancellationToken, waiting: &'a Waiting) -> Wait<'a> {
        Wait {
            service: "NATS",
            at: "nats://127.0.0.1:1".into(),
            deadline: super::deadline(deadline),
            deadline_setting: deadline,
            shutdown,
            first_backoff: Duration::from_millis(10),
            waiting,
        }
    }

    #[tokio::test]
    async fn retries_until_success_and_says_why_meanwhile() {
        let (shutdown, waiting) = (CancellationToken::new(), Waiting::default());
        let mut n = 0;
        let got = wait(Duration::ZERO, &shutdown, &waiting)
            .until(|| {
                n += 1;
                let this = n;
                async move {
                    if this < 4 {
                        Err(Failure::transient("connection refused"))
                    } else {
                        Ok(this)
                    }
                }
            })
            .await;
        assert_eq!(got.ok().flatten(), Some(4));
        assert_eq!(waiting.reason(), None);
        waiting.set("Postgres", "waiting for Postgres at h:5432/d: refused".into());
        waiting.set("NATS", "waiting for NATS at n: refused".into());
        assert_eq!(
            waiting.reason().as_deref(),
            Some("waiting for Postgres at h:5432/d: refused; waiting for NATS at n: refused")
        );
    }

    #[tokio::test]
    async fn gives_up_at_the_deadline_naming_the_service() {
        let (shutdown, waiting) = (CancellationToken::new(), Waiting::default());
        let started = Instant::now();
        let got = wait(Duration::from_millis(300), &shutdown, &waiting)
            .until(|| async { Err::<(), _>(Failure::transient("connection refused")) })
            .await;
        let e = match got {
            Err(e) => format!("{e:#}"),
            Ok(_) => panic!("not past the deadline"),
        };
        assert!(e.contains("NATS at nats://127.0.0.1:1") && e.contains("connection refused"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(waiting.reason().is_some_and(|r| r.contains("connection refused")));
        // An attempt that hangs is cut short by the deadline too.
        let got = wait(Duration::from_millis(200), &shutdown, &waiting)
            .until(std::future::pending::<Result<(), Failure>>)
            .await;
        assert!(got.is_err());
    }

    #[tokio::test]
    async fn shutdown_stops_the_wait_and_permanent_errors_fail_at_once() {
        let (shutdown, waiting) = (CancellationToken::new(), Waiting::default());
        shutdown.cancel();
        let got = wait(Duration::ZERO, &shutdown, &waiting).until(std::future::pending::<Result<(), Failure>>).await;
        assert!(matches!(got, Ok(None)));
        let live = CancellationToken::new();
        let got = wait(Duration::ZERO, &live, &waiting)
            .until(|| async { Err::<(), _>(Failure { message: "no such database".into(), permanent: true }) })
            .await;
        assert!(got.is_err());
    }
}
