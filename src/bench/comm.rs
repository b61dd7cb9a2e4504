//! `gtopk bench comm`: bytes and seconds per aggregation step for dense, Top-k and gTop-k (tree and
//! recursive doubling) over a real communicator, next to the byte counts the schedules predict.

use super::theory::theory_total_bytes;
use crate::comm::Communicator;
use crate::rng::Rng;
use crate::sparse::{Compressor, CompressorConfig, GtopkAlgo, Method, StepOptions};
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// The schemes compared, in table order.
pub const SCHEMES: [(&str, Method, GtopkAlgo); 4] = [
    ("dense", Method::Dense, GtopkAlgo::Tree),
    ("topk", Method::Topk, GtopkAlgo::Tree),
    ("gtopk-tree", Method::Gtopk, GtopkAlgo::Tree),
    ("gtopk-rd", Method::Gtopk, GtopkAlgo::RecursiveDoubling),
];

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommRow {
    pub scheme: String,
    pub workers: usize,
    pub d: usize,
    pub k: usize,
    /// Mean over workers of bytes sent per step, measured.
    pub bytes_per_worker: f64,
    /// The same from the schedule's message count and sizes.
    pub theory_bytes_per_worker: f64,
    /// The busiest worker's bytes per step.
    pub max_bytes_worker: u64,
    /// Median over steps of the slowest worker's seconds per aggregation.
    pub seconds_per_step: f64,
}

/// One worker's part: `steps` timed aggregations (after one warm-up) of fresh normal gradients.
/// Returns (bytes sent per step, seconds per step of each timed step).
pub fn run_worker(
    comm: &mut dyn Communicator,
    method: Method,
    algo: GtopkAlgo,
    d: usize,
    density: f64,
    steps: usize,
) -> Result<(u64, Vec<f64>)> {
    let cfg = CompressorConfig {
        method,
        gtopk: algo,
        ..CompressorConfig::default()
    };
    let mut c = Compressor::new(cfg, &[d])?;
    let mut rng = Rng::derive(1, "bench-comm", comm.rank() as u64);
    let mut grad = vec![0f32; d];
    let mut update = vec![0f32; d];
    let (mut bytes, mut times) = (0, Vec::new());
    for step in 0..=steps {
        grad.iter_mut().for_each(|g| *g = rng.normal());
        let t = Instant::now();
        let r = c.step(comm, &grad, density, StepOptions::default(), &mut update)?;
        if step > 0 {
            times.push(t.elapsed().as_secs_f64());
            bytes = r.traffic.sent;
        }
    }
    Ok((bytes, times))
}

/// Every scheme at every size on this group of workers; the rows are complete on every rank.
pub fn run_group(comm: &mut dyn Communicator, sizes: &[usize], density: f64, steps: usize) -> Result<Vec<CommRow>> {
    let world = comm.world_size();
    let mut rows = Vec::new();
    for &d in sizes {
        let k = ((density * d as f64).floor() as usize).max(1);
        for (name, method, algo) in SCHEMES {
            let (bytes, times) = run_worker(comm, method, algo, d, density, steps)?;
            let mut mine: Vec<u8> = bytes.to_le_bytes().to_vec();
            for t in &times {
                mine.extend(t.to_le_bytes());
            }
            let all = comm.all_gather(&mine)?;
            let parsed: Vec<(u64, Vec<f64>)> = all
                .iter()
                .map(|m| {
                    ensure!(m.len() == 8 * (1 + steps), "a worker sent {} bytes of results", m.len());
                    let b = u64::from_le_bytes(m[..8].try_into().expect("8 bytes"));
                    let ts = m[8..]
                        .chunks_exact(8)
                        .map(|c| f64::from_le_bytes(c.try_into().expect("8")))
                        .collect();
                    Ok((b, ts))
                })
                .collect::<Result<_>>()?;
            let mut slowest: Vec<f64> = (0..steps)
                .map(|s| parsed.iter().map(|(_, t)| t[s]).fold(0.0, f64::max))
                .collect();
            slowest.sort_by(f64::total_cmp);
            let kk = if method == Method::Dense { d } else { k };
            rows.push(CommRow {
                scheme: name.to_string(),
                workers: world,
                d,
                k: kk,
                bytes_per_worker: parsed.iter().map(|(b, _)| *b as f64).sum::<f64>() / world as f64,
                theory_bytes_per_worker: theory_total_bytes(method, algo, world, d, k) as f64 / world as f64,
                max_bytes_worker: parsed.iter().map(|(b, _)| *b).max().unwrap_or(0),
                seconds_per_step: slowest.get(steps / 2).copied().unwrap_or(f64::NAN),
            });
        }
    }
    Ok(rows)
}

/// An nccl-tests-style table.
pub fn render(rows: &[CommRow]) -> String {
    let mut s = format!(
        "{:>12} {:>3} {:>10} {:>8} {:>14} {:>14} {:>6} {:>14} {:>10}\n",
        "scheme", "P", "d", "k", "bytes/worker", "theory", "match", "max/worker", "ms/step"
    );
    for r in rows {
        s += &format!(
            "{:>12} {:>3} {:>10} {:>8} {:>14.0} {:>14.0} {:>6} {:>14} {:>10.3}\n",
            r.scheme,
            r.workers,
            r.d,
            r.k,
            r.bytes_per_worker,
            r.theory_bytes_per_worker,
            if (r.bytes_per_worker - r.theory_bytes_per_worker).abs() < 0.5 {
                "yes"
            } else {
                "NO"
            },
            r.max_bytes_worker,
            r.seconds_per_step * 1e3
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::local::LocalComm;
    use std::time::Duration;

    #[test]
    fn measured_bytes_equal_theory_for_every_scheme_and_p() {
        for world in [1, 2, 3, 4, 5, 8] {
            let handles: Vec<_> = LocalComm::group(world, Duration::from_secs(20))
                .into_iter()
                .map(|mut c| std::thread::spawn(move || run_group(&mut c, &[1000, 777], 0.01, 2).unwrap()))
                .collect();
            let results: Vec<Vec<CommRow>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            for r in &results[0] {
                assert_eq!(r.bytes_per_worker, r.theory_bytes_per_worker, "{r:?}");
                assert!(r.seconds_per_step >= 0.0);
            }
            assert_eq!(results[0].len(), 8);
            let table = render(&results[0]);
            assert!(!table.contains(" NO "), "{table}");
        }
    }
}
