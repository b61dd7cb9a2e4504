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

mod node_share;

use anyhow::{Context, Result};

/// Threads each of `workers` in-process workers gets: the user's `RAYON_NUM_THREADS`, else
/// `cores / workers` (at least 1, then also set as `RAYON_NUM_THREADS`, which candle's matmul reads
/// on every call). Unless the user set `CANDLE_NUM_THREADS`, it becomes 1: candle's barrier pool
/// spins while it waits (the caller without ever parking), and on a shared or oversubscribed
/// machine a ResNet-20 step took 1.5-2x as long with it as with element-wise ops on the calling
/// thread. Call before the workers start: candle sizes that pool once, at first use.
pub fn budget_per_worker(workers: usize) -> usize {
    element_wise_on_the_caller();
    if let Some(n) = user_count("RAYON_NUM_THREADS") {
        return n;
    }
    let per = (cores() / workers.max(1)).max(1);
    std::env::set_var("RAYON_NUM_THREADS", per.to_string());
    per
}

/// A positive count the user set in variable `k`; anything else counts as unset, as rayon and
/// candle read it.
fn user_count(k: &str) -> Option<usize> {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
}

/// Cores this process may run on (its affinity mask and CPU quota, as the launcher left them).
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `CANDLE_NUM_THREADS` = 1 unless the user chose (see `budget_per_worker`).
fn element_wise_on_the_caller() {
    // std's environment lock orders this write against candle's reads (std::env::var).
    if user_count("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// A rank's compute threads and where the number came from, for its start line.
#[derive(Debug, PartialEq, Eq)]
pub struct RankThreads {
    pub threads: usize,
    pub why: String,
}

/// Threads for this process as one rank of a job that `launcher` started (`LaunchInfo::source`):
/// the user's `RAYON_NUM_THREADS`; under Slurm, `SLURM_CPUS_PER_TASK`; else this node's cores
/// shared by the ranks the launcher put on it, as the spawner's processes share them. Without
/// this every rank took every core: `mpirun -np 4` on 2 cores ran 8 compute threads. Sets
/// `RAYON_NUM_THREADS` to the result (candle's matmul and the global pool read it); call before
/// the first parallel op. A malformed launcher variable is an error naming it.
pub fn budget_per_rank(launcher: &str) -> anyhow::Result<RankThreads> {
    element_wise_on_the_caller();
    let t = rank_threads(launcher, cores(), |k| std::env::var(k).ok())?;
    std::env::set_var("RAYON_NUM_THREADS", t.threads.to_string());
    Ok(t)
}

/// `budget_per_rank` on `cores` cores and the environment `env`.
fn rank_threads(launcher: &str, cores: usize, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<RankThreads> {
    let get = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    if let Some(n) = get("RAYON_NUM_THREADS")
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return Ok(RankThreads {
            threads: n,
            why: "from RAYON_NUM_THREADS".into(),
        });
    }
    if launcher == "slurm" {
        if let Some(v) = get("SLURM_CPUS_PER_TASK") {
            let n = positive("SLURM_CPUS_PER_TASK", &v, "CPUs per task")?;
            return Ok(RankThreads {
                threads: n.min(cores),
                why: format!("from SLURM_CPUS_PER_TASK = {n}, on {cores} cores"),
            });
        }
    }
    Ok(match node_share::ranks_on_this_node(launcher, &get)? {
        Some((ranks, var)) => RankThreads {
            threads: (cores / ranks).max(1),
            why: format!("{cores} cores shared by {ranks} ranks on this node, from {var}"),
        },
        None => RankThreads {
            threads: cores,
            why: format!(
                "all {cores} cores: the launcher says not how many ranks share this node; set RAYON_NUM_THREADS"
            ),
        },
    })
}

/// `value` of variable `var` as a positive count of `what`, else an error naming both.
pub(super) fn positive(var: &str, value: &str, what: &str) -> anyhow::Result<usize> {
    value
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| anyhow::anyhow!("{var} = {value:?}: expected the number of {what} (a positive integer)"))
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

    fn threads(launcher: &str, cores: usize, vars: &[(&str, &str)]) -> anyhow::Result<RankThreads> {
        rank_threads(launcher, cores, |k| {
            vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn ranks_on_one_node_share_its_cores() {
        let mpi = [("OMPI_COMM_WORLD_LOCAL_SIZE", "4")];
        let t = threads("openmpi", 2, &mpi).unwrap();
        assert_eq!(t.threads, 1);
        assert!(t.why.contains("2 cores shared by 4 ranks") && t.why.contains("OMPI_COMM_WORLD_LOCAL_SIZE"));
        assert_eq!(threads("openmpi", 16, &mpi).unwrap().threads, 4);
        assert_eq!(
            threads("torchrun", 16, &[("LOCAL_WORLD_SIZE", "3")]).unwrap().threads,
            5
        );
        // The user's choice wins; Slurm's CPUs per task, where given, are the task's share.
        let t = threads(
            "openmpi",
            16,
            &[("OMPI_COMM_WORLD_LOCAL_SIZE", "4"), ("RAYON_NUM_THREADS", "7")],
        );
        assert_eq!(
            t.unwrap(),
            RankThreads {
                threads: 7,
                why: "from RAYON_NUM_THREADS".into()
            }
        );
        let slurm = [("SLURM_CPUS_PER_TASK", "6"), ("SLURM_NTASKS_PER_NODE", "4")];
        assert_eq!(threads("slurm", 32, &slurm).unwrap().threads, 6);
        assert_eq!(threads("slurm", 32, &slurm[1..]).unwrap().threads, 8);
        let alone = threads("none", 8, &[]).unwrap();
        assert_eq!(alone.threads, 8);
        assert!(alone.why.contains("set RAYON_NUM_THREADS"), "{}", alone.why);
        let e = format!(
            "{:#}",
            threads("slurm", 8, &[("SLURM_CPUS_PER_TASK", "many")]).unwrap_err()
        );
        assert!(e.contains("SLURM_CPUS_PER_TASK = \"many\""), "{e}");
    }

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
