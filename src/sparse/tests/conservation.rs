//! Nothing is lost under `conserve`: every step, sum_p acc_p == global sum + sum_p residual_p.
//! Checked independently of the compressor's own report, from the outside: acc_p is the previous
//! residual plus the gradient, and the global sum is P times the update.

use super::super::*;
use super::{gradient, run_group};
use crate::comm::Communicator;

struct Observed {
    acc: Vec<f32>,
    residual: Vec<f32>,
    update: Vec<f32>,
    report: StepReport,
}

fn observe(world: usize, config: &CompressorConfig, sizes: &[usize], density: f64, steps: u64) -> Vec<Vec<Observed>> {
    let d: usize = sizes.iter().sum();
    let opts = StepOptions {
        measure_delta: false,
        check_conservation: true,
    };
    run_group(world, |c| {
        let mut comp = Compressor::new(config.clone(), sizes).unwrap();
        (0..steps)
            .map(|t| {
                let g = gradient(17 + t, c.rank(), t, d);
                let acc: Vec<f32> = if comp.residual().is_empty() {
                    g.clone()
                } else {
                    comp.residual().iter().zip(&g).map(|(r, g)| r + g).collect()
                };
                let mut update = vec![0.0; d];
                let report = comp.step(c, &g, density, opts, &mut update).unwrap();
                let residual = if comp.residual().is_empty() {
                    vec![0.0; d]
                } else {
                    comp.residual().to_vec()
                };
                Observed {
                    acc,
                    residual,
                    update,
                    report,
                }
            })
            .collect()
    })
}

/// ||sum acc - P update - sum residual||_1 / ||sum |acc| ||_1 for one step.
fn imbalance(per_rank: &[&Observed]) -> f64 {
    let p = per_rank.len() as f64;
    let d = per_rank[0].acc.len();
    let (mut lost, mut scale) = (0.0f64, 0.0f64);
    for i in 0..d {
        let acc: f64 = per_rank.iter().map(|o| o.acc[i] as f64).sum();
        let res: f64 = per_rank.iter().map(|o| o.residual[i] as f64).sum();
        lost += (acc - p * per_rank[0].update[i] as f64 - res).abs();
        scale += per_rank.iter().map(|o| (o.acc[i] as f64).abs()).sum::<f64>();
    }
    lost / scale
}

#[test]
fn conserve_loses_nothing_for_every_world_size_algorithm_and_wire() {
    let sizes = [120, 7, 73];
    for world in 1..=9 {
        for algo in [GtopkAlgo::Tree, GtopkAlgo::RecursiveDoubling] {
            for wire in [Wire::F32, Wire::F16, Wire::Bf16] {
                for scope in [Scope::Model, Scope::Layer] {
                    let config = CompressorConfig {
                        gtopk: algo,
                        wire,
                        scope,
                        ..CompressorConfig::default()
                    };
                    let out = observe(world, &config, &sizes, 0.05, 4);
                    for t in 0..4 {
                        let step: Vec<&Observed> = out.iter().map(|o| &o[t]).collect();
                        let what = format!("P = {world} {algo:?} {wire:?} {scope:?} step {t}");
                        let err = imbalance(&step);
                        assert!(err < 1e-6, "{what}: imbalance {err}");
                        let rel = step[0].report.conservation_rel_err.unwrap();
                        assert!(rel < 1e-6, "{what}: reported {rel}");
                    }
                }
            }
        }
    }
}

#[test]
fn the_other_methods_conserve_too() {
    for method in [Method::Topk, Method::Randomk, Method::Dense] {
        for world in [1usize, 3, 4] {
            let wire = if method == Method::Topk { Wire::F16 } else { Wire::F32 };
            let config = CompressorConfig {
                method,
                wire,
                ..CompressorConfig::default()
            };
            let out = observe(world, &config, &[90], 0.1, 3);
            for t in 0..3 {
                let step: Vec<&Observed> = out.iter().map(|o| &o[t]).collect();
                assert!(imbalance(&step) < 1e-6, "{method:?} P = {world}");
                assert!(step[0].report.conservation_rel_err.unwrap() < 1e-6);
            }
        }
    }
}

/// Rank 0's entry at index 0 loses to rank 1's larger entry in round 0, while rank 2 carries
/// index 0 into the final set: origin-index zeroes rank 0's value although it was never applied.
#[test]
fn origin_index_reports_the_mass_it_loses() {
    let grads = [
        [1.0f32, 0.0, 0.0, 0.0],
        [0.0, 2.0, 0.0, 0.0],
        [5.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.5, 0.0],
    ];
    let opts = StepOptions {
        measure_delta: false,
        check_conservation: true,
    };
    for (policy, lost) in [(ResidualPolicy::OriginIndex, 1.0), (ResidualPolicy::Conserve, 0.0)] {
        let config = CompressorConfig {
            residual_policy: policy,
            ..CompressorConfig::default()
        };
        let out = run_group(4, |c| {
            let mut comp = Compressor::new(config.clone(), &[4]).unwrap();
            let mut upd = vec![0.0; 4];
            let g = grads[c.rank()];
            let rep = comp.step(c, &g, 0.25, opts, &mut upd).unwrap();
            (upd, rep, comp.residual().to_vec())
        });
        assert_eq!(out[0].0, vec![1.25, 0.0, 0.0, 0.0], "the global set is {{0: 5}}");
        for o in &out {
            assert_eq!(o.1.lost_mass, Some(lost), "{policy:?}");
        }
        if policy == ResidualPolicy::OriginIndex {
            assert_eq!(out[0].2, vec![0.0; 4], "rank 0's 1.0 is gone");
            assert_eq!(out[1].2, vec![0.0, 2.0, 0.0, 0.0]);
        } else {
            // Rank 0 merged rank 1's set and dropped its own 1.0, then dropped 2.0 in round 1.
            assert_eq!(out[0].2, vec![1.0, 2.0, 0.0, 0.0]);
            assert_eq!(out[2].2, vec![0.0, 0.0, 0.5, 0.0]);
        }
    }
}
