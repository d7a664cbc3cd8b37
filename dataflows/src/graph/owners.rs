//! Resolves `P`, the project whose filter applies to an owner's counts (SPEC §2).
//!
//! `P` is the owner's own `project_id`, else its deployment's. A missing deployment row gives
//! no fallback (SQL's `LEFT JOIN` yields NULL): `P` is NULL and nothing is filtered.

use differential_dataflow::operators::arrange::{Arranged, TraceAgent};
use differential_dataflow::VecCollection;

use super::spines::{ArrangeCompact, Spine};

use crate::model::{Deployment, Id};

/// The dataflow's timestamp: one tick per applied batch.
pub type Time = u64;

/// A collection of `D` at [`Time`] with signed multiplicities.
pub type Coll<'s, D> = VecCollection<'s, Time, D, isize>;

/// A collection arranged by key, shareable between joins.
pub type ByKey<'s, K, V> = Arranged<'s, TraceAgent<Spine<K, V>>>;

/// An owner row as `(id, (own project, deployment))`.
pub type OwnerRow = (Id, (Option<Id>, Option<Id>));

/// `(owner id, P)` for every owner row given as `(id, (own project, deployment))`.
///
/// `deployments` is every deployment row by id, and `deployment_ids` its keys (needed to find
/// dangling references).
pub fn resolve<'s>(
    rows: Coll<'s, OwnerRow>,
    deployments: ByKey<'s, Id, Deployment>,
    deployment_ids: Coll<'s, Id>,
) -> Coll<'s, (Id, Option<Id>)> {
    let own = rows.clone().flat_map(|(id, (project, _))| project.map(|p| (id, Some(p))));
    let fallback = rows.flat_map(|(id, (project, deployment))| match project {
        Some(_) => None,
        None => Some((deployment, id)),
    });
    let no_deployment = fallback.clone().flat_map(|(deployment, id)| match deployment {
        Some(_) => None,
        None => Some((id, None)),
    });
    let via_deployment = fallback.flat_map(|(deployment, id)| deployment.map(|d| (d, id)));
    let found = via_deployment
        .clone()
        .arrange_by_key_named_compact("Arrange: owners by deployment")
        .join_core(deployments, |_d, id, row| Some((*id, row.project)));
    let dangling = via_deployment.antijoin(deployment_ids).map(|(_d, id)| (id, None));
    own.concat(no_deployment).concat(found).concat(dangling)
}
