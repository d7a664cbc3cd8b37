//! Processing-service heartbeats, as Antenna's (`jobs-protocol.md` §4.3): worker calls mark
//! the matching async services (`ml_processingservice` with no `endpoint_url`) seen, and a
//! periodic sweep marks those unseen for a while offline.
//!
//! Handlers only drop a [`Beat`] into a bounded channel (never waiting: when it is full the
//! beat is dropped and counted); one background task throttles them to one write per key per
//! `--heartbeat-interval` and writes, so no request ever waits for a heartbeat. Keys are
//! Antenna's: a claim names pipelines (every async service of any of them is marked, across
//! projects, as Antenna does); a tasks or result call names a job (async services of its
//! pipeline that are also linked to its project).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Gateway, GatewayError};
use crate::metrics::names;
use crate::store::Store;

/// Beats waiting for the writer, at most.
const CHANNEL_CAPACITY: usize = 1024;

/// Which services a worker call vouches for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Beat {
    /// A claim for these pipelines (slugs, sorted and deduplicated).
    Pipelines(Vec<String>),
    /// A tasks or result call for a job of this pipeline and project.
    PipelineProject {
        /// `ml_pipeline.id`.
        pipeline: i64,
        /// `main_project.id`.
        project: i64,
    },
}

/// The handlers' end of the channel.
pub struct Heartbeats {
    tx: mpsc::Sender<Beat>,
}

impl Heartbeats {
    /// A channel: handlers keep the sender, the writer gets the receiver.
    pub fn channel() -> (Heartbeats, mpsc::Receiver<Beat>) {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        (Heartbeats { tx }, rx)
    }

    /// Hands `beat` to the writer without waiting.
    pub fn beat(&self, beat: Beat) {
        if self.tx.try_send(beat).is_err() {
            metrics::counter!(names::GATEWAY_HEARTBEATS, "outcome" => "dropped").increment(1);
        }
    }
}

/// One write per key per interval (Antenna's `cache.add` gate).
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    /// Key → when it was last written.
    last: HashMap<Beat, Instant>,
}

impl Throttle {
    /// A throttle letting each key through once per `interval`.
    pub fn new(interval: Duration) -> Self {
        Throttle { interval, last: HashMap::new() }
    }

    /// Whether `beat` is to be written at `now` (and if so, the window starts now).
    pub fn admit(&mut self, beat: &Beat, now: Instant) -> bool {
        match self.last.get(beat) {
            Some(at) if now.saturating_duration_since(*at) < self.interval => false,
            _ => {
                self.last.insert(beat.clone(), now);
                true
            }
        }
    }

    /// Forgets keys whose window has passed (they would be admitted anyway).
    pub fn prune(&mut self, now: Instant) {
        let interval = self.interval;
        self.last.retain(|_, at| now.saturating_duration_since(*at) < interval);
    }
}

/// The writer and the sweep, until `shutdown`.
pub async fn run(gateway: Arc<Gateway>, mut rx: mpsc::Receiver<Beat>, shutdown: CancellationToken) {
    let args = &gateway.args;
    let mut throttle = Throttle::new(args.heartbeat_interval);
    let mut sweep = tokio::time::interval(args.heartbeat_sweep_every.max(Duration::from_millis(10)));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            beat = rx.recv() => {
                let Some(beat) = beat else { return };
                if !throttle.admit(&beat, Instant::now()) {
                    metrics::counter!(names::GATEWAY_HEARTBEATS, "outcome" => "throttled").increment(1);
                    continue;
                }
                let outcome = match gateway.store() {
                    Ok(store) => match mark_seen(store, &beat).await {
                        Ok(services) => {
                            debug!(?beat, services, "processing services marked seen");
                            if services > 0 {
                                gateway.django_cache().invalidate(["ml_processingservice"]).await;
                            }
                            "written"
                        }
                        Err(e) => {
                            warn!(?beat, error = %e, "cannot mark processing services seen");
                            if e.is_stale_statement() {
                                store.forget_statements();
                            }
                            "failed"
                        }
                    },
                    Err(_) => "failed",
                };
                metrics::counter!(names::GATEWAY_HEARTBEATS, "outcome" => outcome).increment(1);
            }
            _ = sweep.tick() => {
                throttle.prune(Instant::now());
                if let Ok(store) = gateway.store() {
                    match mark_offline(store, args.heartbeat_offline_after).await {
                        Ok(0) => {}
                        Ok(n) => {
                            debug!(services = n, "processing services marked offline");
                            gateway.django_cache().invalidate(["ml_processingservice"]).await;
                            metrics::counter!(names::GATEWAY_SERVICES_OFFLINE).increment(n);
                        }
                        Err(e) => {
                            warn!(error = %e, "cannot mark unseen processing services offline");
                            if e.is_stale_statement() {
                                store.forget_statements();
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Marks the async services `beat` vouches for seen now; returns how many.
pub async fn mark_seen(store: &Store, beat: &Beat) -> Result<u64, GatewayError> {
    let client = store.client().await.map_err(GatewayError::db)?;
    let written = match beat {
        Beat::Pipelines(slugs) => {
            let statement = client
                .prepare_cached(
                    "UPDATE ml_processingservice s SET last_seen = now(), last_seen_live = true
                     WHERE (s.endpoint_url IS NULL OR s.endpoint_url = '')
                       AND EXISTS (SELECT 1 FROM ml_processingservice_pipelines sp
                                   JOIN ml_pipeline p ON p.id = sp.pipeline_id
                                   WHERE sp.processingservice_id = s.id AND p.slug = ANY($1))",
                )
                .await
                .map_err(GatewayError::db)?;
            client.execute(&statement, &[slugs]).await
        }
        Beat::PipelineProject { pipeline, project } => {
            let statement = client
                .prepare_cached(
                    "UPDATE ml_processingservice s SET last_seen = now(), last_seen_live = true
                     WHERE (s.endpoint_url IS NULL OR s.endpoint_url = '')
                       AND EXISTS (SELECT 1 FROM ml_processingservice_pipelines sp
                                   WHERE sp.processingservice_id = s.id AND sp.pipeline_id = $1)
                       AND EXISTS (SELECT 1 FROM ml_processingservice_projects sj
                                   WHERE sj.processingservice_id = s.id AND sj.project_id = $2)",
                )
                .await
                .map_err(GatewayError::db)?;
            client.execute(&statement, &[pipeline, project]).await
        }
    };
    written.map_err(GatewayError::db)
}

/// Marks async services last seen more than `after` ago offline (`last_seen_live = false`);
/// returns how many changed. Services never seen are left alone, as by Antenna's beat task.
pub async fn mark_offline(store: &Store, after: Duration) -> Result<u64, GatewayError> {
    let client = store.client().await.map_err(GatewayError::db)?;
    let statement = client
        .prepare_cached(
            "UPDATE ml_processingservice SET last_seen_live = false
             WHERE (endpoint_url IS NULL OR endpoint_url = '')
               AND last_seen_live IS DISTINCT FROM false
               AND last_seen < now() - make_interval(secs => $1)",
        )
        .await
        .map_err(GatewayError::db)?;
    client.execute(&statement, &[&after.as_secs_f64()]).await.map_err(GatewayError::db)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_admits_each_key_once_per_interval() {
        let mut t = Throttle::new(Duration::from_secs(30));
        let start = Instant::now();
        let a = Beat::PipelineProject { pipeline: 1, project: 2 };
        let b = Beat::Pipelines(vec!["moths".into()]);
        assert!(t.admit(&a, start));
        assert!(!t.admit(&a, start + Duration::from_secs(29)));
        assert!(t.admit(&b, start + Duration::from_secs(1)), "keys are throttled separately");
        assert!(t.admit(&a, start + Duration::from_secs(30)));
        assert!(!t.admit(&a, start + Duration::from_secs(31)));
        t.prune(start + Duration::from_secs(45));
        assert_eq!(t.last.len(), 1, "b's window passed, a's has not");
    }
}
