//! The arrangements' layout: differential's ordered batches, with offsets stored as runs.
//!
//! A batch of differential's `OrdValBatch` keeps, besides its keys and values, two lists of
//! offsets: where each key's values start, and where each value's `(time, diff)` updates
//! start. Differential stores each offset in 4 bytes ([`OffsetList`]). In this graph the
//! offsets are mostly regular: the rows of a table, an occurrence's single detection, have one
//! value per key, so the first list counts 0, 1, 2, …; and once times are compacted every
//! update is the same `(time, +1)`, which differential stores once and then repeats by
//! pushing the same offset, so the second list is 1, 1, 1, …. [`RunOffsets`] stores such a
//! list as runs of equal steps, 24 bytes a run, and keeps a plain [`OffsetList`] when a list
//! turns out irregular. For a detection that is up to 8 of the ~30 bytes each arrangement
//! spends on it.
//!
//! [`Spine`], [`Batcher`] and [`Builder`] are differential's `ValSpine`, `ValBatcher` and
//! `ValBuilder` (and the key-only ones) with this one container swapped in: keys and values
//! stay in plain vectors, so cursors still hand out `&K` and `&V` and every operator works
//! unchanged.

use std::rc::Rc;

use differential_dataflow::batcher::merge::vec::VecMerger;
use differential_dataflow::batcher::merge::MergeBatcher;
use differential_dataflow::operators::arrange::{Arranged, TraceAgent};
use differential_dataflow::trace::implementations::ord_neu::{OrdKeyBatch, OrdKeyBuilder, OrdValBatch, OrdValBuilder};
use differential_dataflow::trace::implementations::spine_fueled::Spine as FueledSpine;
use differential_dataflow::trace::implementations::{BatchContainer, ContainerChunker, OffsetList};
use timely::container::PushInto;

use super::owners::{ByKey, Coll, Time};

/// The diff type of every arrangement of the graph.
type Diff = isize;

/// The layout of a `(key, value)` arrangement.
pub type Layout<K, V> = (Vec<K>, Vec<V>, Vec<Time>, Vec<Diff>, RunOffsets);

/// The updates an arrangement is built from.
type Updates<K, V> = Vec<((K, V), Time, Diff)>;

/// A `(key, value)` arrangement's trace.
pub type Spine<K, V> = FueledSpine<Rc<OrdValBatch<Layout<K, V>>>>;
/// Builds a `(key, value)` arrangement's batches.
pub type Builder<K, V> = OrdValBuilder<Layout<K, V>, Updates<K, V>>;
/// Sorts updates into a `(key, value)` arrangement's batches.
pub type Batcher<K, V> = MergeBatcher<ContainerChunker<Updates<K, V>>, VecMerger<(K, V), Time, Diff>, Builder<K, V>>;

/// A key-only arrangement's trace.
pub type KeySpine<K> = FueledSpine<Rc<OrdKeyBatch<Layout<K, ()>>>>;
/// Sorts updates into a key-only arrangement's batches.
pub type KeyBatcher<K> = MergeBatcher<
    ContainerChunker<Updates<K, ()>>,
    VecMerger<(K, ()), Time, Diff>,
    OrdKeyBuilder<Layout<K, ()>, Updates<K, ()>>,
>;

/// Arranges a collection of `(key, value)` pairs by key in this module's layout.
pub trait ArrangeCompact<'s, K: Ord + Clone + 'static, V: Ord + Clone + 'static> {
    /// Like differential's `arrange_by_key_named`, in a [`Spine`].
    fn arrange_by_key_named_compact(self, name: &str) -> ByKey<'s, K, V>;
}

impl<'s, K, V> ArrangeCompact<'s, K, V> for Coll<'s, (K, V)>
where
    K: differential_dataflow::ExchangeData + differential_dataflow::Hashable,
    V: differential_dataflow::ExchangeData,
{
    fn arrange_by_key_named_compact(self, name: &str) -> ByKey<'s, K, V> {
        self.arrange_named::<Batcher<K, V>, Spine<K, V>>(name, Batcher::new)
    }
}

/// Arranges a collection by its records, in a [`KeySpine`].
pub fn arrange_keys<'s, K>(records: Coll<'s, K>, name: &str) -> Arranged<'s, TraceAgent<KeySpine<K>>>
where
    K: differential_dataflow::ExchangeData + differential_dataflow::Hashable,
{
    records.map(|k| (k, ())).arrange_named::<KeyBatcher<K>, KeySpine<K>>(name, KeyBatcher::new)
}

/// One run of offsets in arithmetic progression: element `start + n` is `first + n * step`.
#[derive(Clone, Copy, Debug)]
struct Run {
    start: usize,
    first: usize,
    step: usize,
}

/// A list of offsets stored as runs of equal steps; see the [module](self) documentation.
#[derive(Clone, Debug, Default)]
pub struct RunOffsets {
    /// The runs, by `start`; unused once `plain` is set.
    runs: Vec<Run>,
    /// Elements in the list.
    len: usize,
    /// The list, once runs stopped paying for themselves.
    plain: Option<OffsetList>,
}

impl RunOffsets {
    /// Below this many runs a list stays in runs whatever its length.
    const FEW_RUNS: usize = 8;

    fn push(&mut self, offset: usize) {
        if let Some(plain) = &mut self.plain {
            plain.push(offset);
            self.len += 1;
            return;
        }
        let at = self.len;
        self.len += 1;
        if let Some(run) = self.runs.last_mut() {
            let length = at - run.start;
            if length == 1 && offset >= run.first {
                run.step = offset - run.first;
                return;
            }
            if run.step.checked_mul(length).and_then(|d| d.checked_add(run.first)) == Some(offset) {
                return;
            }
        }
        self.runs.push(Run { start: at, first: offset, step: 0 });
        // A run costs 24 bytes and a plain offset 4: past one run per six offsets the plain
        // list is smaller, and stays so.
        if self.runs.len() > Self::FEW_RUNS && self.runs.len() * 6 > self.len {
            let mut plain = OffsetList::with_capacity(self.len);
            for index in 0..self.len {
                plain.push(self.index_in_runs(index));
            }
            self.runs = Vec::new();
            self.plain = Some(plain);
        }
    }

    fn index_in_runs(&self, index: usize) -> usize {
        let at = match self.runs.len() {
            1 => 0,
            _ => self.runs.partition_point(|run| run.start <= index) - 1,
        };
        let run = self.runs[at];
        run.first + run.step * (index - run.start)
    }
}

impl PushInto<usize> for RunOffsets {
    fn push_into(&mut self, item: usize) {
        self.push(item);
    }
}

impl BatchContainer for RunOffsets {
    type Owned = usize;
    type ReadItem<'a> = usize;

    #[inline(always)]
    fn into_owned<'a>(item: Self::ReadItem<'a>) -> Self::Owned {
        item
    }
    #[inline(always)]
    fn reborrow<'b, 'a: 'b>(item: Self::ReadItem<'a>) -> Self::ReadItem<'b> {
        item
    }

    fn push_ref(&mut self, item: Self::ReadItem<'_>) {
        self.push(item)
    }
    fn push_own(&mut self, item: &Self::Owned) {
        self.push(*item)
    }

    fn clear(&mut self) {
        self.runs.clear();
        self.len = 0;
        self.plain = None;
    }

    fn with_capacity(_size: usize) -> Self {
        Self::default()
    }

    fn merge_capacity(_cont1: &Self, _cont2: &Self) -> Self {
        Self::default()
    }

    #[inline]
    fn index(&self, index: usize) -> Self::ReadItem<'_> {
        match &self.plain {
            Some(plain) => plain.index(index),
            None => self.index_in_runs(index),
        }
    }

    fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn round_trip(offsets: &[usize]) -> RunOffsets {
        let mut list = RunOffsets::default();
        for offset in offsets {
            list.push_own(offset);
        }
        assert_eq!(list.len(), offsets.len());
        for (at, offset) in offsets.iter().enumerate() {
            assert_eq!(list.index(at), *offset, "offset {at} of {offsets:?}");
        }
        list
    }

    #[test]
    fn regular_lists_are_a_few_runs() {
        let counting: Vec<usize> = (0..10_000).collect();
        assert_eq!(round_trip(&counting).runs.len(), 1);
        // Differential's singleton optimization: the first update, then the same offset.
        let repeated: Vec<usize> = std::iter::once(0).chain(std::iter::repeat_n(1, 9_999)).collect();
        assert_eq!(round_trip(&repeated).runs.len(), 2);
        let strided: Vec<usize> = (0..1_000).map(|n| 3 * n).chain((0..1_000).map(|n| 3_000 + 7 * n)).collect();
        let list = round_trip(&strided);
        assert!(list.runs.len() <= 3 && list.plain.is_none(), "{:?}", list.runs);
    }

    #[test]
    fn irregular_lists_fall_back_to_plain_offsets() {
        let mut offset = 0;
        let irregular: Vec<usize> = (0..1_000usize)
            .map(|n| {
                offset += (n * 7919) % 5;
                offset
            })
            .collect();
        let list = round_trip(&irregular);
        assert!(list.plain.is_some());
        assert!(list.runs.is_empty());
    }

    #[test]
    fn large_offsets_round_trip() {
        round_trip(&[0, u32::MAX as usize, u32::MAX as usize + 1, usize::MAX / 2, usize::MAX / 2]);
    }

    proptest! {
        #[test]
        fn any_non_decreasing_list_round_trips(steps in prop::collection::vec((0usize..4, 1usize..50), 0..40)) {
            // Runs of equal steps, of random steps and lengths: what batches hold.
            let mut offsets = Vec::new();
            let mut offset = 0;
            for (step, length) in steps {
                for _ in 0..length {
                    offsets.push(offset);
                    offset += step;
                }
            }
            round_trip(&offsets);
        }

        #[test]
        fn any_list_round_trips(offsets in prop::collection::vec(0usize..1_000, 0..200)) {
            round_trip(&offsets);
        }
    }
}
