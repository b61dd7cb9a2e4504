//! The CPU budget of in-process workers: P worker threads share the machine's cores, as spawned
//! ranks do (`spawn.rs` gives each `cores / P` threads); and the allocator settings a training
//! step wants.
//!
//! Without this every worker drives candle's pools sized for the whole machine: one global rayon
//! pool all workers queue into, `gemm` asked for `RAYON_NUM_THREADS` (default: every core) tasks per
//! matmul, and candle's barrier pool for element-wise ops, which takes one caller at a time while
//! its threads and the caller busy-wait. With 4 workers on 2 cores the quickstart ran 3x slower than
//! 4 processes. Here each worker runs inside a rayon pool of its own with `cores / P` threads (at
//! least one), which our convolution and candle's parallel loops use.

use anyhow::{Context, Result};

/// Threads each of `workers` in-process workers gets: the user's `RAYON_NUM_THREADS`, else
/// `cores / workers` (at least 1, then also set as `RAYON_NUM_THREADS`, which candle's matmul reads
/// on every call). Unless the user set `CANDLE_NUM_THREADS`, it becomes 1: candle's barrier pool
/// spins while it waits (the caller without ever parking), and on a shared or oversubscribed
/// machine a ResNet-20 step took 1.5-2x as long with it as with element-wise ops on the calling
/// thread. Call before the workers start: candle sizes that pool once, at first use.
pub fn budget_per_worker(workers: usize) -> usize {
    let user = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
    };
    // std's environment lock orders these writes against candle's reads (std::env::var).
    if user("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if let Some(n) = user("RAYON_NUM_THREADS") {
        return n;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = (cores / workers.max(1)).max(1);
    std::env::set_var("RAYON_NUM_THREADS", per.to_string());
    per
}

/// Keeps freed memory in the process instead of handing it back to the kernel after every tensor:
/// candle allocates a fresh buffer per op, and with glibc's defaults every buffer over the mmap
/// threshold is mapped, faulted in page by page and unmapped again (a fifth of a ResNet-20 step
/// on the CPU went to page faults). glibc refuses an mmap threshold above 32 MiB (half its
/// `HEAP_MAX_SIZE` on 64-bit), so that is the one asked for: larger buffers are still mapped.
/// Returns whether the allocator took both settings (false off glibc, where it is a no-op).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before the workers allocate.
    unsafe {
        let max_mmap_threshold = 4 * 1024 * 1024 * std::mem::size_of::<libc::c_long>() as libc::c_int;
        let mmap = libc::mallopt(libc::M_MMAP_THRESHOLD, max_mmap_threshold);
        let trim = libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
        mmap == 1 && trim == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// Runs `f` on a rayon pool of `threads` threads of its own, so the parallel loops inside it (candle's
/// and our convolution's) use this worker's share of the cores, not a pool shared by all workers.
pub fn run_in_pool<R: Send>(threads: usize, name: &str, f: impl FnOnce() -> R + Send) -> Result<R> {
    let prefix = name.to_string();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("{prefix}-cpu{i}"))
        .build()
        .with_context(|| format!("{name}: cannot start a pool of {threads} threads"))?;
    Ok(pool.install(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_has_the_budgeted_threads() {
        let n = run_in_pool(3, "t", rayon::current_num_threads).unwrap();
        assert_eq!(n, 3);
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_takes_the_allocator_settings() {
        assert!(keep_freed_memory());
    }
}
