//! One setting of glibc's malloc for a long-running manager: a fixed mmap threshold.
//!
//! glibc raises its mmap threshold to the size of every mmapped block that is freed (up to
//! 32 MiB). Once sled frees its first 8 MiB log buffer, later log buffers and everything
//! else below 8 MiB (sled's pages and values, delivery batches, gRPC buffers) come from the
//! heap arenas, where freed blocks stay resident between small long-lived ones. With the
//! threshold fixed at 1 MiB, each log buffer is mapped and given back whole.
//!
//! Measured with `push-bench --profile backlog` (1,000,000 messages queued for an offline
//! node, then drained; A/B pairs in BENCHMARKS.md): resident with them queued 216–235 →
//! 164–175 MiB, at the drain's peak 460–554 → 304–460 MiB, the same at 128 KiB, 1 MiB and
//! 4 MiB. Not lower than 1 MiB: at glibc's initial 128 KiB, sled's serialized pages (up to 16
//! packs of 16 KiB) and the delivery batches' encode buffers were mapped fresh each time,
//! and their page faults were about a tenth of the manager's CPU (`perf`, `ack-batch`);
//! 1 MiB instead cut its CPU in `fanout10` by 15–30%. It is set only once the store is
//! open: recovery reads the whole log in segment-sized buffers, and with the threshold fixed
//! from the start a restart on 1,000,000 queued took 2.1–2.4 s to serve instead of 0.9–1.0.

/// Fixes the mmap threshold at 1 MiB (see the module docs); a no-op off glibc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn fix_mmap_threshold() {
    // SAFETY: `mallopt` passes no pointer and allocates nothing; it stores malloc's
    // parameters under the main arena's lock. Other threads read those parameters without a
    // lock, but glibc's own `free` rewrites the same fields that way on any thread (the
    // dynamic threshold this turns off), so setting them while the runtime runs adds no
    // kind of race glibc does not already have.
    let set = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1024 * 1024) };
    if set != 1 {
        tracing::warn!("mallopt(M_MMAP_THRESHOLD) failed: memory may stay high after bursts");
    }
}

/// Other C libraries do not raise a threshold this way (and have no `mallopt`).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn fix_mmap_threshold() {}
