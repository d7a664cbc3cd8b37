//! The project filter `passes(o)` of SPEC §2, evaluated per `(determination, project)` pair.
//!
//! The taxon part of the filter (include / exclude through ancestors) depends only on the
//! determination `t` and the project `p`; the score part only on the occurrence's score and
//! `p`'s threshold. Scores are checked where owners' scopes are joined (see `graph.rs`); this
//! module computes, for every `(t, p)` pair some count actually needs (the *demand*), whether
//! `t` passes `p`'s taxon filter. Items keyed by `(t, p)` join against these verdicts.
//!
//! An include or exclude edit changes the verdict of the affected `(t, p)` pairs only, and a
//! threshold edit the pairs of one project, so a filter edit costs work proportional to the
//! occurrences it affects, not to the database.

use differential_dataflow::operators::ThresholdTotal;

use crate::graph::owners::{ByKey, Coll};
use crate::graph::rows::OptI64;
use crate::graph::spines::ArrangeCompact;
use crate::model::{Id, Taxon};

/// The inputs the filter reads.
pub struct FilterInputs<'s> {
    /// Taxa by id: ancestors from `parents_json`.
    pub taxa: ByKey<'s, Id, Taxon>,
    /// `(project, taxon)` include rows.
    pub include: Coll<'s, (Id, Id)>,
    /// `(project, taxon)` exclude rows.
    pub exclude: Coll<'s, (Id, Id)>,
}

/// Every demanded `(t, p)` whose taxon passes `p`'s include and exclude sets.
pub(super) fn verdicts<'s>(demand: Coll<'s, (OptI64, Id)>, inputs: FilterInputs<'s>) -> ByKey<'s, (OptI64, Id), ()> {
    let FilterInputs { taxa, include, exclude } = inputs;
    let demand = demand.distinct_total();
    let include = include.distinct_total();
    let exclude = exclude.distinct_total();
    let include_projects = include.clone().map(|(p, _t)| p).distinct_total();

    // ((p, a), t) for every a in A(t) = {t} ∪ ancestors(t). A taxon without a row has A(t) = {t}.
    let named = demand.clone().flat_map(|(t, p)| t.get().map(|t| (t, p)));
    let ancestors =
        named.clone().join_core(taxa, |t, p, taxon| taxon.ancestors.iter().map(|a| ((*p, *a), *t)).collect::<Vec<_>>());
    let ancestors = named.clone().map(|(t, p)| ((p, t), t)).concat(ancestors);
    let hits = |set: Coll<'s, (Id, Id)>| ancestors.clone().semijoin(set).map(|((p, _a), t)| (t, p)).distinct_total();
    let include_hits = hits(include);
    let exclude_hits = hits(exclude);

    // excl_ok ∧ incl_ok for a named determination.
    let not_excluded = named.map(|pair| (pair, ())).antijoin(exclude_hits);
    let included = not_excluded.clone().semijoin(include_hits).map(|(pair, ())| pair);
    let unrestricted = not_excluded.map(|((t, p), ())| (p, t)).antijoin(include_projects.clone()).map(|(p, t)| (t, p));
    let named_ok = included.concat(unrestricted).map(|(t, p)| (p, Some(t)));

    // A NULL determination fails an include set and passes an exclude-only filter.
    let unnamed_ok = demand
        .flat_map(|(t, p)| match t.get() {
            Some(_) => None,
            None => Some((p, ())),
        })
        .antijoin(include_projects)
        .map(|(p, ())| (p, None));

    named_ok
        .concat(unnamed_ok)
        .map(|(p, t)| ((OptI64::from(t), p), ()))
        .arrange_by_key_named_compact("Arrange: filter verdicts")
}
