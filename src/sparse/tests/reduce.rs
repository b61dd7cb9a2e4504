//! The reductions against the single-threaded reference, bit for bit, on every rank.

use super::super::reference::reduce_reference;
use super::super::*;
use super::{bits, gradient, run_group};
use crate::comm::{broadcast_schedule, Communicator};
use proptest::prelude::*;

fn algo() -> impl Strategy<Value = GtopkAlgo> {
    prop::sample::select(vec![GtopkAlgo::Tree, GtopkAlgo::RecursiveDoubling])
}

fn wire() -> impl Strategy<Value = Wire> {
    prop::sample::select(vec![Wire::F32, Wire::F16, Wire::Bf16])
}

fn layout() -> impl Strategy<Value = Layout> {
    (prop::collection::vec(1usize..80, 1..4), any::<bool>()).prop_map(|(sizes, per_layer)| {
        let scope = if per_layer { Scope::Layer } else { Scope::Model };
        Layout::new(scope, &sizes).unwrap()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn global_set_matches_reference_and_is_identical_everywhere(
        world in 1usize..=9,
        algo in algo(),
        wire in wire(),
        layout in layout(),
        density in 0.01f64..=1.0,
        seed in any::<u64>(),
    ) {
        let ks = layout.ks(density).unwrap();
        let locals: Vec<SparseSet> = (0..world)
            .map(|r| layout.select(&gradient(seed, r, 0, layout.d()), &ks).unwrap())
            .collect();
        let out = run_group(world, |c| {
            let local = locals[c.rank()].clone();
            gtopk_reduce(c, algo, local, &layout, &ks, wire).unwrap()
        });
        let want = reduce_reference(algo, &locals, &layout, &ks, wire);
        for red in &out {
            prop_assert_eq!(red.global.idx(), want.idx());
            prop_assert_eq!(bits(red.global.val()), bits(want.val()));
        }
        // Nothing lost: what went in is the global set plus what the ranks absorb.
        let mut total = vec![0.0f64; layout.d()];
        for s in &locals {
            for (i, v) in s.iter() {
                total[i as usize] += v as f64;
            }
        }
        for (i, v) in want.iter() {
            total[i as usize] -= v as f64;
        }
        for red in &out {
            for &(i, v) in &red.absorb {
                total[i as usize] -= v as f64;
            }
        }
        let scale: f64 = locals.iter().flat_map(|s| s.val()).map(|v| v.abs() as f64).sum();
        let lost: f64 = total.iter().map(|x| x.abs()).sum();
        // Infinities make the balance meaningless; the generator makes none.
        prop_assert!(lost <= 1e-6 * scale.max(1.0), "lost {} of {}", lost, scale);
    }
}

#[test]
fn bytes_follow_the_schedules() {
    for world in 1..=9usize {
        for wire in [Wire::F32, Wire::F16] {
            let layout = Layout::new(Scope::Layer, &[40, 25]).unwrap();
            let ks = layout.ks(0.2).unwrap();
            let msg = (ks.iter().sum::<usize>() * wire.bytes_per_pair()) as u64;
            for algo in [GtopkAlgo::Tree, GtopkAlgo::RecursiveDoubling] {
                let sent = run_group(world, |c| {
                    let local = layout.select(&gradient(3, c.rank(), 0, layout.d()), &ks).unwrap();
                    gtopk_reduce(c, algo, local, &layout, &ks, wire).unwrap();
                    c.traffic()
                });
                let want: Vec<u64> = (0..world)
                    .map(|r| {
                        let n = match algo {
                            GtopkAlgo::Tree => {
                                let tree = tree_schedule(world).iter().flatten().filter(|m| m.0 == r).count();
                                let bcast = broadcast_schedule(world, 0)
                                    .iter()
                                    .flatten()
                                    .filter(|m| m.0 == r)
                                    .count();
                                tree + bcast
                            }
                            GtopkAlgo::RecursiveDoubling => {
                                let s = recursive_doubling_schedule(world);
                                s.prefold.iter().filter(|m| m.0 == r).count()
                                    + s.rounds.iter().flatten().filter(|m| m.0 == r || m.1 == r).count()
                                    + s.postfold.iter().filter(|m| m.0 == r).count()
                            }
                        };
                        n as u64 * msg
                    })
                    .collect();
                let got: Vec<u64> = sent.iter().map(|t| t.sent).collect();
                assert_eq!(got, want, "P = {world} {algo:?} {wire:?}");
                let total: u64 = got.iter().sum();
                let msgs = match algo {
                    GtopkAlgo::Tree => 2 * (world as u64 - 1),
                    GtopkAlgo::RecursiveDoubling => recursive_doubling_schedule(world).messages() as u64,
                };
                assert_eq!(total, msgs * msg);
                assert_eq!(total, sent.iter().map(|t| t.recv).sum::<u64>());
            }
        }
    }
}

#[test]
fn malformed_message_from_a_peer_is_an_error() {
    let layout = Layout::new(Scope::Model, &[100]).unwrap();
    let ks = [5];
    let errs = run_group(2, |c| {
        if c.rank() == 1 {
            // Right length, but the indices run backwards.
            let mut bad = Vec::new();
            for i in (0..5u32).rev() {
                bad.extend_from_slice(&i.to_le_bytes());
            }
            bad.extend_from_slice(&[0u8; 20]);
            c.send(0, &bad).unwrap();
            return String::new();
        }
        let local = layout.select(&gradient(1, 0, 0, 100), &ks).unwrap();
        format!(
            "{:#}",
            gtopk_reduce(c, GtopkAlgo::Tree, local, &layout, &ks, Wire::F32).unwrap_err()
        )
    });
    assert!(
        errs[0].contains("from rank 1") && errs[0].contains("not strictly increasing"),
        "{}",
        errs[0]
    );
}

#[test]
fn a_set_with_the_wrong_count_is_an_error() {
    let layout = Layout::new(Scope::Model, &[100]).unwrap();
    let errs = run_group(2, |c| {
        let k = 3 + c.rank();
        let local = layout.select(&gradient(1, c.rank(), 0, 100), &[k]).unwrap();
        gtopk_reduce(c, GtopkAlgo::RecursiveDoubling, local, &layout, &[3], Wire::F32).map_err(|e| format!("{e:#}"))
    });
    let e = errs[1].as_ref().unwrap_err();
    assert!(e.contains("own set") && e.contains("expected k = 3"), "{e}");
}

#[test]
fn ties_resolve_to_the_smallest_indices_on_every_rank() {
    // All magnitudes equal, signs alternating by rank and index: sums cancel or double.
    for algo in [GtopkAlgo::Tree, GtopkAlgo::RecursiveDoubling] {
        for world in [2usize, 3, 4, 7] {
            let layout = Layout::new(Scope::Model, &[64]).unwrap();
            let ks = [8];
            let out = run_group(world, |c| {
                let r = c.rank();
                let g: Vec<f32> = (0..64).map(|i| if (i + r) % 2 == 0 { 1.0 } else { -1.0 }).collect();
                let local = layout.select(&g, &ks).unwrap();
                assert_eq!(local.idx(), &[0, 1, 2, 3, 4, 5, 6, 7]);
                gtopk_reduce(c, algo, local, &layout, &ks, Wire::F32).unwrap().global
            });
            for g in &out {
                assert_eq!(g, &out[0]);
                assert_eq!(g.len(), 8);
            }
            let locals: Vec<SparseSet> = (0..world)
                .map(|r| {
                    let g: Vec<f32> = (0..64).map(|i| if (i + r) % 2 == 0 { 1.0 } else { -1.0 }).collect();
                    layout.select(&g, &ks).unwrap()
                })
                .collect();
            assert_eq!(out[0], reduce_reference(algo, &locals, &layout, &ks, Wire::F32));
        }
    }
}
