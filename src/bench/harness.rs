//! The one timing and reporting harness behind `gtopk bench select|merge|scatter`: warm-up, `reps`
//! timed calls, median and spread, and achieved bandwidth beside the machine's copy bandwidth for
//! the same bytes, measured in the same run (so a loaded machine lowers both).

use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Seconds per call over the timed repetitions.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
}

/// The median of a non-empty sample: the middle value, or the mean of the two middle values of an
/// even count (the upper one alone would be the maximum of two).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_unstable_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl Timing {
    fn of(mut times: Vec<f64>) -> Self {
        times.sort_unstable_by(f64::total_cmp);
        Timing {
            median_s: median(&times),
            min_s: times[0],
            max_s: times[times.len() - 1],
        }
    }
}

/// One warm-up call (page faults, caches, lazy allocation), then `reps` timed calls.
pub fn time_calls(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    f()?;
    let mut times = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(Timing::of(times))
}

/// One row of a kernel benchmark.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelRow {
    /// `select`, `merge` or `scatter`.
    pub op: String,
    /// The implementation: the device's kernel (`radix`, `merge`, `scatter`) or a CPU baseline.
    pub variant: String,
    pub device: String,
    pub d: usize,
    pub density: f64,
    pub k: usize,
    /// The bytes the operation must at least read and write (see `Op::bytes`).
    pub bytes: u64,
    pub time: Timing,
    /// `bytes / time.median_s`, in GB/s (1e9 bytes).
    pub gbps: f64,
    /// The same bytes through a plain copy on this device, median, in GB/s: the memory floor.
    pub copy_gbps: f64,
    /// For baselines: same result as the device's kernel (select: the same k-th magnitude).
    pub agree: bool,
}

impl KernelRow {
    /// The fraction of the copy bandwidth this kernel reached.
    pub fn of_floor(&self) -> f64 {
        self.gbps / self.copy_gbps
    }
}

/// A table with one line per row.
pub fn render(rows: &[KernelRow]) -> String {
    let mut out = format!(
        "{:>7} {:>10} {:>4} {:>10} {:>7} {:>8} {:>11} {:>10} {:>10} {:>10} {:>8} {:>8} {:>7} {:>5}\n",
        "op",
        "variant",
        "dev",
        "d",
        "density",
        "k",
        "bytes",
        "median ms",
        "min ms",
        "max ms",
        "GB/s",
        "copy",
        "%copy",
        "agree"
    );
    for r in rows {
        out += &format!(
            "{:>7} {:>10} {:>4} {:>10} {:>7} {:>8} {:>11} {:>10.3} {:>10.3} {:>10.3} {:>8.2} {:>8.2} {:>6.1}% {:>5}\n",
            r.op,
            r.variant,
            r.device,
            r.d,
            r.density,
            r.k,
            r.bytes,
            r.time.median_s * 1e3,
            r.time.min_s * 1e3,
            r.time.max_s * 1e3,
            r.gbps,
            r.copy_gbps,
            100.0 * r.of_floor(),
            if r.agree { "yes" } else { "NO" }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_orders_and_counts_calls() {
        let mut calls = 0;
        let t = time_calls(4, || {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, 5, "one warm-up and four timed calls");
        assert!(t.min_s <= t.median_s && t.median_s <= t.max_s);
        let t = Timing::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((t.min_s, t.median_s, t.max_s), (1.0, 2.0, 3.0));
        assert_eq!(median(&[4.0, 1.0]), 2.5);
        assert!(time_calls(2, || anyhow::bail!("boom")).is_err());
    }
}
