//! The count strategies the ingest benchmark compares. Only [`CountStrategy::Incremental`]
//! is tally; the others exist so that the benchmark can measure the alternatives side by side,
//! and live here, outside the product: the daemon only offers to ingest without counts and
//! to run work after each commit ([`Counts::Unkept`]).

use std::sync::Arc;

use tally::ingest::batch::AfterCommit;
use tally::server::Counts;
use tally::store::verify::{self, Scope};
use tally::store::Store;

/// How counts are kept while ingesting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountStrategy {
    /// The dataflow computes the changed counts, written in the batch's transaction.
    Incremental,
    /// After each batch commits, recompute the counts of the affected deployments (with their
    /// events and images) from scratch in SQL and write those that differ, as Antenna does
    /// after every result.
    Recompute,
    /// Write no counts while ingesting (the benchmark recomputes once at the end).
    Deferred,
}

impl CountStrategy {
    /// `incremental`, `recompute` or `deferred`.
    pub fn name(self) -> &'static str {
        match self {
            CountStrategy::Incremental => "incremental",
            CountStrategy::Recompute => "recompute",
            CountStrategy::Deferred => "deferred",
        }
    }

    /// How the daemon keeps counts under this strategy.
    pub fn counts(self) -> Counts {
        match self {
            CountStrategy::Incremental => Counts::Incremental,
            CountStrategy::Recompute => Counts::Unkept { after_commit: Some(recompute()) },
            CountStrategy::Deferred => Counts::Unkept { after_commit: None },
        }
    }
}

/// After each commit, `verify` and `fix` the counts of each affected deployment.
fn recompute() -> AfterCommit {
    Arc::new(|store: Store, deployments: Vec<tally_dataflows::Id>| {
        Box::pin(async move {
            for deployment in deployments {
                let scope = Scope { project: None, deployment: Some(deployment) };
                let verification = verify::verify(&store, scope).await?;
                verify::fix(&store, &verification).await?;
            }
            Ok(())
        })
    })
}
