//! A compressor step puts exactly the theory's bytes on the wire (diagnostics off).

use super::super::*;
use super::{gradient, run_group};
use crate::comm::{broadcast_schedule, ring_chunks, Communicator};

fn sent_bytes(world: usize, config: &CompressorConfig, sizes: &[usize], density: f64) -> Vec<u64> {
    let d: usize = sizes.iter().sum();
    run_group(world, |c| {
        let mut comp = Compressor::new(config.clone(), sizes).unwrap();
        let mut upd = vec![0.0; d];
        let mut per_step = Vec::new();
        for t in 0..2 {
            let before = c.traffic();
            let g = gradient(1, c.rank(), t, d);
            comp.step(c, &g, density, StepOptions::default(), &mut upd).unwrap();
            per_step.push((c.traffic() - before).sent);
        }
        assert_eq!(per_step[0], per_step[1], "every step costs the same");
        per_step[0]
    })
}

/// Bytes rank `rank` sends in a ring all-reduce of `len` f32 values.
fn ring_all_reduce_bytes(len: usize, world: usize, rank: usize) -> u64 {
    let chunks = ring_chunks(len, world);
    let values: usize = (0..world.saturating_sub(1))
        .map(|s| chunks[(rank + world - s) % world].len() + chunks[(rank + 1 + world - s) % world].len())
        .sum();
    4 * values as u64
}

#[test]
fn every_method_sends_what_theory_says() {
    let sizes = [300, 45];
    let layout = Layout::new(Scope::Model, &sizes).unwrap();
    let d = layout.d();
    let density = 0.02;
    let k: usize = layout.ks(density).unwrap().iter().sum();
    for world in 1..=9usize {
        for wire in [Wire::F32, Wire::F16] {
            let pair = wire.bytes_per_pair() as u64;
            let set = k as u64 * pair;
            let config = |method, gtopk| CompressorConfig {
                method,
                gtopk,
                wire,
                ..CompressorConfig::default()
            };

            let tree = sent_bytes(world, &config(Method::Gtopk, GtopkAlgo::Tree), &sizes, density);
            let bcast = broadcast_schedule(world, 0);
            for (r, &got) in tree.iter().enumerate() {
                let bcast_sends = bcast.iter().flatten().filter(|m| m.0 == r).count() as u64;
                let tree_sends = u64::from(r != 0);
                assert_eq!(got, (tree_sends + bcast_sends) * set, "tree P = {world} rank {r}");
            }
            assert_eq!(tree.iter().sum::<u64>(), 2 * (world as u64 - 1) * set);

            let rd = sent_bytes(
                world,
                &config(Method::Gtopk, GtopkAlgo::RecursiveDoubling),
                &sizes,
                density,
            );
            let s = recursive_doubling_schedule(world);
            for (r, &got) in rd.iter().enumerate() {
                let msgs = if r >= s.core {
                    1
                } else {
                    s.rounds.len() + usize::from(r + s.core < world)
                };
                assert_eq!(got, msgs as u64 * set, "rd P = {world} rank {r}");
            }

            let topk = sent_bytes(world, &config(Method::Topk, GtopkAlgo::Tree), &sizes, density);
            assert!(topk.iter().all(|&b| b == (world as u64 - 1) * set), "topk P = {world}");

            if wire == Wire::F32 {
                let dense = sent_bytes(world, &config(Method::Dense, GtopkAlgo::Tree), &sizes, density);
                let randk = sent_bytes(world, &config(Method::Randomk, GtopkAlgo::Tree), &sizes, density);
                for r in 0..world {
                    assert_eq!(dense[r], ring_all_reduce_bytes(d, world, r), "dense P = {world}");
                    assert_eq!(randk[r], ring_all_reduce_bytes(k, world, r), "randomk P = {world}");
                }
            }
        }
    }
}

#[test]
fn gtopk_is_8k_per_round_plus_broadcast_at_the_papers_four_workers() {
    // The paper's setting in numbers: P = 4, d = 10_000, density 0.001 -> k = 10, 80 bytes a set.
    let sent = sent_bytes(4, &CompressorConfig::default(), &[10_000], 0.001);
    // Tree: 1 -> 0, 3 -> 2, 2 -> 0. Broadcast: 0 -> 1, then 0 -> 2 and 1 -> 3.
    assert_eq!(sent, vec![160, 160, 80, 80]);
}
