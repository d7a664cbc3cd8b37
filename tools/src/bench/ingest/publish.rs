//! Publishing results as workers do: to `<prefix>.{job}`, with `Nats-Msg-Id` = the task's
//! reply subject, by claim check when a result does not fit in a NATS message (as the
//! gateway sends them), many in flight at once; either all at once (the drain run) or at a
//! fixed rate, remembering when each was published (the paced run).

use std::collections::HashMap;
use std::future::IntoFuture;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, context::PublishAckFuture};
use futures_util::stream::{self, StreamExt};
use indicatif::ProgressBar;

use crate::synth::jobs::Task;
use crate::synth::results::ResultFactory;
use tally::config::NatsArgs;
use tally::results_stream::{self, Objects, Outgoing, MSG_ID_HEADER};

/// Publishes in flight at once in the drain run.
const IN_FLIGHT: usize = 256;

/// Where and how results are published.
pub struct Target<'a> {
    /// JetStream.
    pub js: &'a jetstream::Context,
    /// The results stream's names.
    pub nats: &'a NatsArgs,
    /// The bucket of results too large for one message.
    pub objects: &'a Objects,
    /// The server's `max_payload`.
    pub max_payload: usize,
}

/// Sends one result; the returned future resolves when JetStream has stored it.
async fn send(to: &Target<'_>, job: i64, task: &Task, payload: Vec<u8>) -> anyhow::Result<PublishAckFuture> {
    let item = Outgoing {
        subject: to.nats.results_subject(job),
        headers: vec![(MSG_ID_HEADER, task.reply_subject.clone())],
        payload: payload.into(),
    };
    let (ack, _object) =
        results_stream::send(to.js, to.objects, to.max_payload, item).await.context("publishing a result")?;
    Ok(ack)
}

/// Publishes a result for every task and waits until JetStream stored them all.
pub async fn all(to: &Target<'_>, factory: &ResultFactory, tasks: &[(i64, Task)]) -> anyhow::Result<()> {
    let bar = super::counter_bar(tasks.len() as u64, "publish");
    let results: Vec<anyhow::Result<()>> = stream::iter(tasks)
        .map(|(job, task)| {
            let bar = &bar;
            async move {
                let payload = factory.task_result(&task.reply_subject, task.image);
                let ack = send(to, *job, task, payload).await?.await.context("result not stored")?;
                anyhow::ensure!(!ack.duplicate, "result for {} dropped as a duplicate", task.reply_subject);
                bar.inc(1);
                Ok(())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    bar.finish_and_clear();
    results.into_iter().collect()
}

/// Publishes a result for every task at `rate` per second (payloads are built beforehand, so
/// the pace is not bound by JSON encoding), counting on `bar`. Returns each reply subject's
/// publish instant (just before the publish is handed to the connection) and the rate
/// achieved.
pub async fn paced(
    to: &Target<'_>,
    factory: &ResultFactory,
    tasks: &[(i64, Task)],
    rate: f64,
    bar: &ProgressBar,
) -> anyhow::Result<(HashMap<String, Instant>, f64)> {
    let payloads: Vec<Vec<u8>> = tasks.iter().map(|(_, t)| factory.task_result(&t.reply_subject, t.image)).collect();
    let mut published = HashMap::with_capacity(tasks.len());
    let mut stored = Vec::with_capacity(tasks.len());
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1e-3)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let first = Instant::now();
    let mut last = first;
    for ((job, task), payload) in tasks.iter().zip(payloads) {
        ticks.tick().await;
        last = Instant::now();
        published.insert(task.reply_subject.clone(), last);
        let ack = send(to, *job, task, payload).await?;
        stored.push(tokio::spawn(ack.into_future()));
        bar.inc(1);
    }
    for s in stored {
        s.await.context("publish task")?.context("result not stored")?;
    }
    let seconds = last.duration_since(first).as_secs_f64();
    let achieved = if tasks.len() > 1 && seconds > 0.0 { (tasks.len() - 1) as f64 / seconds } else { rate };
    Ok((published, achieved))
}
