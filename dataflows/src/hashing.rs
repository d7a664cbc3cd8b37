//! Maps keyed by database ids, hashed with foldhash rather than `std`'s SipHash.
//!
//! SipHash resists hash flooding, which ids from our own database do not need, and it cost
//! ~11% of bulk-load cycles (perf). foldhash is the hasher differential-dataflow itself uses, so
//! it adds no crate to the build. The seed is fixed ([`FixedState`]) rather than drawn per
//! process, so that a map's iteration order, and any run of the benchmarks, is the same every
//! time.

use std::collections::{HashMap, HashSet};

use foldhash::fast::FixedState;

/// A `HashMap` hashed with foldhash under a fixed seed.
pub type IdMap<K, V> = HashMap<K, V, FixedState>;

/// A `HashSet` hashed with foldhash under a fixed seed.
pub type IdSet<K> = HashSet<K, FixedState>;

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::*;

    #[test]
    fn sequential_ids_spread_over_buckets() {
        let mut buckets = [0u32; 64];
        for id in 0..64_000u64 {
            buckets[(FixedState::default().hash_one(id) >> 58) as usize] += 1;
        }
        assert!(buckets.iter().all(|&n| n > 500), "{buckets:?}");
    }
}
