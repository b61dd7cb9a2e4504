//! The CPU thread budget of in-process workers: P worker threads share the machine's cores, as
//! spawned ranks do (`spawn.rs` gives each `cores / P` threads).
//!
//! Without this every worker drives candle's pools sized for the whole machine: one global rayon
//! pool all workers queue into, `gemm` asked for `RAYON_NUM_THREADS` (default: every core) tasks per
//! matmul, and candle's spinning barrier pool for element-wise ops, which takes one caller at a time
//! while its threads spin. With 4 workers on 2 cores the quickstart ran 4.5x slower than 4
//! processes. Here each worker runs inside a rayon pool of its own with `cores / P` threads (at
//! least one), and candle's own thread counts are set to the same number before its pools start.

use anyhow::{Context, Result};

/// Threads each of `workers` in-process workers gets; also sets `RAYON_NUM_THREADS` and
/// `CANDLE_NUM_THREADS` to it unless the user set either (then their `RAYON_NUM_THREADS`, or the
/// machine's cores, is every worker's count, as before). Call before the workers start: candle
/// sizes its barrier pool once, at first use.
pub fn budget_per_worker(workers: usize) -> usize {
    let user = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
    };
    if let Some(n) = user("RAYON_NUM_THREADS") {
        return n;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if user("CANDLE_NUM_THREADS").is_some() {
        return cores;
    }
    let per = (cores / workers.max(1)).max(1);
    // std's environment lock orders this against candle's reads (std::env::var) in other threads.
    std::env::set_var("RAYON_NUM_THREADS", per.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", per.to_string());
    per
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
}
