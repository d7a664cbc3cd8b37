//! How the process hands freed memory back to the system.
//!
//! The count dataflow keeps its state in differential's arrangements, whose batches are large
//! vectors, replaced wholesale each time two batches are merged. glibc's `malloc` serves a
//! request above its mmap threshold with a fresh mapping that `free` returns to the system,
//! but by default the threshold rises to the size of every such block freed (up to 32 MiB),
//! after which merged-away batches are freed into the heap and stay resident. Measured with
//! `tally-tools bench dataflow --sizes 1000000` (docs/benchmarks.md, 2026-12-07): 371 B of
//! resident memory per detection with a 32 MiB threshold, 190 B with a fixed 256 KiB one
//! (and 188 B with 64 KiB, for a bulk load ~4% slower still).
//! [`return_large_frees`] fixes the threshold, as `GLIBC_TUNABLES=glibc.malloc.mmap_threshold`
//! would; an operator's own setting of that tunable is left alone.

/// Allocations of at least this many bytes get their own mapping, returned to the system on
/// free.
pub const MMAP_THRESHOLD: usize = 256 * 1024;

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`] unless `GLIBC_TUNABLES` sets one. Does
/// nothing with other C libraries. Returns whether the threshold was set.
pub fn return_large_frees() -> bool {
    let tuned = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("mmap_threshold"));
    !tuned && set_mmap_threshold(MMAP_THRESHOLD)
}

/// Hands the free memory inside the heap back to the system (glibc's `malloc_trim`), as after
/// loading the whole database into the dataflow: that load goes through arrangements in
/// chunks of 200,000 rows, and the many small blocks it frees stay resident otherwise (~300 MB
/// kept against ~240 MB after trimming, loading 1.2M detections in such chunks; see
/// docs/benchmarks.md, 2026-12-07). Does nothing with other C libraries.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only returns free pages to the system; it takes malloc's own
    // locks and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_mmap_threshold(bytes: usize) -> bool {
    let Ok(bytes) = i32::try_from(bytes) else {
        return false;
    };
    // SAFETY: `mallopt` only changes a malloc parameter; any value is accepted or refused
    // (returns 0), and it is called before the program starts its threads.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_mmap_threshold(_bytes: usize) -> bool {
    false
}
