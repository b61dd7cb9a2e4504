//! `gtopk simulate`: iteration time of dense, Top-k and gTop-k S-SGD on P workers under an
//! alpha-beta network model: a message of n bytes costs alpha + n * beta, and a step waits for its
//! critical path of messages (`theory::critical_path`, the schedules `bench comm` measures).

use super::step::StepBreakdown;
use super::theory::critical_path;
use crate::sparse::{GtopkAlgo, Method};
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Network {
    pub name: &'static str,
    /// Seconds per message (latency of a small message, software stack included).
    pub alpha: f64,
    /// Seconds per byte (the inverse of the achievable point-to-point bandwidth).
    pub beta: f64,
}

/// The presets; docs/PERFORMANCE.md says where the numbers come from.
pub const PRESETS: [Network; 3] = [
    // TCP over commodity 1 Gb/s Ethernet: ~50 us per message through the kernel stack and a
    // switch; ~117 MB/s of TCP goodput out of 125 MB/s line rate.
    Network {
        name: "1gbe",
        alpha: 50e-6,
        beta: 1.0 / 117e6,
    },
    // TCP over 10 Gb/s Ethernet: ~20 us, ~1.17 GB/s.
    Network {
        name: "10gbe",
        alpha: 20e-6,
        beta: 1.0 / 1.17e9,
    },
    // 100 Gb/s InfiniBand (EDR) with RDMA verbs: ~2 us, ~12 GB/s.
    Network {
        name: "ib100",
        alpha: 2e-6,
        beta: 1.0 / 12e9,
    },
];

/// A preset by name, or `fit:ALPHA:BETA` (seconds per message, seconds per byte), as
/// `gtopk bench p2p-rank` fits them to a network.
pub fn preset(name: &str) -> Result<Network> {
    if let Some(rest) = name.strip_prefix("fit:") {
        let parsed: Option<(f64, f64)> = rest
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
        return match parsed {
            Some((alpha, beta)) if alpha >= 0.0 && beta >= 0.0 && alpha.is_finite() && beta.is_finite() => {
                Ok(Network {
                    name: "fit",
                    alpha,
                    beta,
                })
            }
            _ => anyhow::bail!(
                "--networks {name:?}: expected fit:ALPHA:BETA, non-negative seconds per message and per byte"
            ),
        };
    }
    PRESETS
        .iter()
        .find(|n| n.name == name)
        .copied()
        .with_context(|| format!("--networks: unknown network {name:?}; allowed: 1gbe, 10gbe, ib100, fit:ALPHA:BETA"))
}

/// The per-worker costs that do not depend on the network.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    pub d: usize,
    pub k: usize,
    /// Forward and backward, seconds per step.
    pub compute_s: f64,
    /// Local work of the sparse schemes (selection, merges, scatter), seconds per step.
    pub sparsify_s: f64,
}

impl Workload {
    /// From the JSON `gtopk bench step --json` prints (compute, sparsification, d, k).
    pub fn from_step_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("--from-step: cannot read {}", path.display()))?;
        let b: StepBreakdown = serde_json::from_str(text.trim()).with_context(|| {
            format!(
                "--from-step {}: not the JSON of `gtopk bench step --json`",
                path.display()
            )
        })?;
        Ok(Workload {
            d: b.d,
            k: b.k,
            compute_s: b.compute_s,
            sparsify_s: b.sparsification_s,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimRow {
    pub network: String,
    pub workers: usize,
    pub d: usize,
    pub k: usize,
    pub dense_s: f64,
    pub topk_s: f64,
    pub gtopk_tree_s: f64,
    pub gtopk_rd_s: f64,
    /// Dense's iteration time over gTop-k (tree)'s.
    pub speedup_vs_dense: f64,
    /// Top-k's iteration time over gTop-k (tree)'s.
    pub speedup_vs_topk: f64,
}

/// Seconds of communication per step for one scheme.
pub fn comm_seconds(net: &Network, method: Method, algo: GtopkAlgo, world: usize, d: usize, k: usize) -> f64 {
    let c = critical_path(method, algo, world, d, k);
    c.messages as f64 * net.alpha + c.bytes * net.beta
}

pub fn simulate(nets: &[Network], workers: &[usize], w: &Workload) -> Result<Vec<SimRow>> {
    ensure!(w.k >= 1 && w.k <= w.d, "k = {} must be in 1..=d = {}", w.k, w.d);
    ensure!(
        w.compute_s >= 0.0 && w.sparsify_s >= 0.0,
        "--compute and --sparsify must be non-negative seconds"
    );
    let mut rows = Vec::new();
    for net in nets {
        for &p in workers {
            ensure!(p >= 1, "--workers: 0 workers");
            let t = |m: Method, a: GtopkAlgo| {
                let local = if m == Method::Dense { 0.0 } else { w.sparsify_s };
                w.compute_s + local + comm_seconds(net, m, a, p, w.d, w.k)
            };
            let dense_s = t(Method::Dense, GtopkAlgo::Tree);
            let topk_s = t(Method::Topk, GtopkAlgo::Tree);
            let gtopk_tree_s = t(Method::Gtopk, GtopkAlgo::Tree);
            rows.push(SimRow {
                network: net.name.into(),
                workers: p,
                d: w.d,
                k: w.k,
                dense_s,
                topk_s,
                gtopk_tree_s,
                gtopk_rd_s: t(Method::Gtopk, GtopkAlgo::RecursiveDoubling),
                speedup_vs_dense: dense_s / gtopk_tree_s,
                speedup_vs_topk: topk_s / gtopk_tree_s,
            });
        }
    }
    Ok(rows)
}

pub fn render(rows: &[SimRow]) -> String {
    let mut s = format!(
        "{:>6} {:>5} {:>10} {:>7} {:>11} {:>11} {:>11} {:>11} {:>9} {:>9}\n",
        "net", "P", "d", "k", "dense ms", "topk ms", "gtopk ms", "gtopk-rd ms", "x dense", "x topk"
    );
    for r in rows {
        s += &format!(
            "{:>6} {:>5} {:>10} {:>7} {:>11.2} {:>11.2} {:>11.2} {:>11.2} {:>8.2}x {:>8.2}x\n",
            r.network,
            r.workers,
            r.d,
            r.k,
            r.dense_s * 1e3,
            r.topk_s * 1e3,
            r.gtopk_tree_s * 1e3,
            r.gtopk_rd_s * 1e3,
            r.speedup_vs_dense,
            r.speedup_vs_topk
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A network and a d = 1000, k = 10 workload.
    fn setup(alpha: f64, beta: f64, compute_s: f64, sparsify_s: f64) -> (Network, Workload) {
        let net = Network { name: "t", alpha, beta };
        let w = Workload {
            d: 1000,
            k: 10,
            compute_s,
            sparsify_s,
        };
        (net, w)
    }

    #[test]
    fn two_workers_on_a_pure_bandwidth_network() {
        let (net, w) = setup(0.0, 1.0, 1.0, 0.5);
        let r = &simulate(&[net], &[2], &w).unwrap()[0];
        // Ring all-reduce: 2 (P-1)/P * 4d bytes; all-gather: (P-1) 8k; tree: a send and a broadcast.
        assert_eq!(r.dense_s, 1.0 + 4000.0);
        assert_eq!(r.topk_s, 1.5 + 80.0);
        assert_eq!(r.gtopk_tree_s, 1.5 + 160.0);
        assert_eq!(r.gtopk_rd_s, 1.5 + 80.0);
        assert!(render(std::slice::from_ref(r)).contains("x dense"));
    }

    #[test]
    fn latency_terms_and_the_crossover() {
        let (net, w) = setup(1.0, 0.0, 0.0, 0.0);
        let rows = simulate(&[net], &[4, 1024], &w).unwrap();
        assert_eq!((rows[0].dense_s, rows[0].topk_s, rows[0].gtopk_tree_s), (6.0, 3.0, 4.0));
        assert_eq!(rows[1].gtopk_tree_s, 20.0);
        assert_eq!(rows[1].gtopk_rd_s, 10.0);
        // On a slow link gTop-k overtakes Top-k as P grows: its bytes grow as log P, not P.
        let slow = simulate(
            &[preset("1gbe").unwrap()],
            &[4, 32, 1024],
            &Workload {
                d: 270_000,
                k: 270,
                ..w
            },
        )
        .unwrap();
        assert!(slow[2].speedup_vs_topk > slow[0].speedup_vs_topk && slow[2].speedup_vs_topk > 1.0);
        assert!(preset("token-ring").unwrap_err().to_string().contains("--networks"));
        let fit = preset("fit:1.8e-5:8e-8").unwrap();
        assert_eq!((fit.name, fit.alpha, fit.beta), ("fit", 1.8e-5, 8e-8));
        for bad in ["fit:", "fit:1", "fit:-1:1", "fit:1:x", "fit:1:inf"] {
            assert!(preset(bad).unwrap_err().to_string().contains("fit:ALPHA:BETA"), "{bad}");
        }
        assert!(simulate(&[net], &[4], &Workload { k: 0, ..w }).is_err());
    }
}
