//! What each aggregation scheme puts on the wire, derived from the same schedules the
//! communicating code follows: total bytes (which `bench comm` checks its measurements against)
//! and the critical path (which `simulate` prices with an alpha-beta model).

use crate::comm::broadcast_schedule;
use crate::sparse::{recursive_doubling_schedule, tree_schedule, GtopkAlgo, Method};

/// Bytes of one sparse set on the wire: k (u32 index, f32 value) pairs.
pub fn set_bytes(k: usize) -> u64 {
    8 * k as u64
}

/// Bytes all workers send in one step, by the schedule.
pub fn theory_total_bytes(method: Method, algo: GtopkAlgo, world: usize, d: usize, k: usize) -> u64 {
    let p = world as u64;
    let pair = set_bytes(k);
    match (method, algo) {
        // Ring reduce-scatter + all-gather: every chunk crosses P-1 links twice.
        (Method::Dense, _) => 2 * (p - 1) * 4 * d as u64,
        (Method::Topk, _) => p * (p - 1) * pair,
        (Method::Randomk, _) => theory_total_bytes(Method::Dense, algo, world, k, k),
        (Method::Gtopk, GtopkAlgo::Tree) => {
            let tree: usize = tree_schedule(world).iter().map(Vec::len).sum();
            (tree as u64 + p - 1) * pair
        }
        (Method::Gtopk, GtopkAlgo::RecursiveDoubling) => recursive_doubling_schedule(world).messages() as u64 * pair,
    }
}

/// The sequence of messages one step waits for: `messages` latencies and `bytes` of transfer, on
/// the busiest path through the schedule (one message per worker per round).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CriticalPath {
    pub messages: usize,
    pub bytes: f64,
}

pub fn critical_path(method: Method, algo: GtopkAlgo, world: usize, d: usize, k: usize) -> CriticalPath {
    let ring = |rounds: usize, m: Method| CriticalPath {
        messages: rounds,
        // Every worker of a ring sends the same share of the total, round after round.
        bytes: theory_total_bytes(m, algo, world, d, k) as f64 / world as f64,
    };
    let per_round = |rounds: usize| CriticalPath {
        messages: rounds,
        bytes: rounds as f64 * set_bytes(k) as f64,
    };
    match (method, algo) {
        (Method::Dense, _) | (Method::Randomk, _) => ring(2 * (world - 1), method),
        (Method::Topk, _) => ring(world - 1, method),
        // log2 P merge rounds up the tree, then the binomial broadcast of the global set.
        (Method::Gtopk, GtopkAlgo::Tree) => per_round(tree_schedule(world).len() + broadcast_schedule(world, 0).len()),
        (Method::Gtopk, GtopkAlgo::RecursiveDoubling) => {
            let s = recursive_doubling_schedule(world);
            per_round(usize::from(!s.prefold.is_empty()) + s.rounds.len() + usize::from(!s.postfold.is_empty()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log2_ceil(p: usize) -> usize {
        (p as f64).log2().ceil() as usize
    }

    #[test]
    fn closed_forms() {
        let (d, k) = (270_000, 270);
        for p in [1usize, 2, 3, 4, 6, 8, 32, 100, 1024] {
            let dense = critical_path(Method::Dense, GtopkAlgo::Tree, p, d, k);
            assert_eq!(dense.messages, 2 * (p - 1));
            let want = 2.0 * (p as f64 - 1.0) / p as f64 * 4.0 * d as f64;
            assert!((dense.bytes - want).abs() < 1e-6 * want.max(1.0), "P = {p}");
            let topk = critical_path(Method::Topk, GtopkAlgo::Tree, p, d, k);
            assert_eq!((topk.messages, topk.bytes), (p - 1, (p - 1) as f64 * 8.0 * k as f64));
            let tree = critical_path(Method::Gtopk, GtopkAlgo::Tree, p, d, k);
            assert_eq!(tree.messages, 2 * log2_ceil(p));
            assert_eq!(tree.bytes, (2 * log2_ceil(p) * 8 * k) as f64);
            let rd = critical_path(Method::Gtopk, GtopkAlgo::RecursiveDoubling, p, d, k);
            let fold = if p.is_power_of_two() { 0 } else { 2 };
            assert_eq!(rd.messages, (p as f64).log2().floor() as usize + fold, "P = {p}");
        }
    }

    #[test]
    fn critical_paths_follow_the_schedules() {
        for p in 1..=64 {
            // Each tree round and each broadcast round moves one set along the path; over all
            // workers the rounds' messages add up to the total bytes.
            let tree = critical_path(Method::Gtopk, GtopkAlgo::Tree, p, 1000, 10);
            let rounds = tree_schedule(p).len() + broadcast_schedule(p, 0).len();
            assert_eq!(tree.messages, rounds);
            let msgs: usize = tree_schedule(p)
                .iter()
                .chain(&broadcast_schedule(p, 0))
                .map(Vec::len)
                .sum();
            assert_eq!(
                theory_total_bytes(Method::Gtopk, GtopkAlgo::Tree, p, 1000, 10),
                msgs as u64 * 80
            );
            let rd = recursive_doubling_schedule(p);
            let path = critical_path(Method::Gtopk, GtopkAlgo::RecursiveDoubling, p, 1000, 10);
            assert!(path.messages >= rd.rounds.len() && path.messages <= rd.rounds.len() + 2);
            // Rings: the path is one worker's share of the total.
            for m in [Method::Dense, Method::Topk] {
                let c = critical_path(m, GtopkAlgo::Tree, p, 1000, 10);
                let total = theory_total_bytes(m, GtopkAlgo::Tree, p, 1000, 10) as f64;
                assert_eq!(c.bytes * p as f64, total);
            }
        }
    }
}
