//! One compressor step of every method against brute force, and the step's edge cases.

use super::super::reference::{reduce_reference, select_reference};
use super::super::*;
use super::{bits, gradient, run_group};
use crate::comm::Communicator;
use crate::rng::Rng;
use proptest::prelude::*;

fn cfg(method: Method) -> CompressorConfig {
    CompressorConfig {
        method,
        ..CompressorConfig::default()
    }
}

/// Runs `steps` steps of `config` on `world` workers; per rank, per step: (update, report).
fn run_steps(
    world: usize,
    config: &CompressorConfig,
    sizes: &[usize],
    density: f64,
    steps: u64,
    opts: StepOptions,
    seed: u64,
) -> Vec<Vec<(Vec<f32>, StepReport)>> {
    let d: usize = sizes.iter().sum();
    run_group(world, |c| {
        let mut comp = Compressor::new(config.clone(), sizes).unwrap();
        (0..steps)
            .map(|t| {
                let g = gradient(seed, c.rank(), t, d);
                let mut upd = vec![f32::NAN; d];
                let rep = comp.step(c, &g, density, opts, &mut upd).unwrap();
                (upd, rep)
            })
            .collect()
    })
}

fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
    a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn one_step_of_every_method_matches_brute_force(
        world in 1usize..=6,
        method in prop::sample::select(vec![Method::Dense, Method::Topk, Method::Gtopk, Method::Randomk]),
        algo in prop::sample::select(vec![GtopkAlgo::Tree, GtopkAlgo::RecursiveDoubling]),
        lossy in any::<bool>(),
        sizes in prop::collection::vec(1usize..60, 1..4),
        per_layer in any::<bool>(),
        density in 0.02f64..=1.0,
        seed in any::<u64>(),
    ) {
        let wire = if lossy && matches!(method, Method::Topk | Method::Gtopk) { Wire::Bf16 } else { Wire::F32 };
        let scope = if per_layer { Scope::Layer } else { Scope::Model };
        let config = CompressorConfig { method, scope, gtopk: algo, wire, seed, ..CompressorConfig::default() };
        let out = run_steps(world, &config, &sizes, density, 1, StepOptions::default(), seed);
        let layout = Layout::new(scope, &sizes).unwrap();
        let d = layout.d();
        let ks = layout.ks(density).unwrap();
        let grads: Vec<Vec<f32>> = (0..world).map(|r| gradient(seed, r, 0, d)).collect();
        for o in &out {
            prop_assert_eq!(bits(&o[0].0), bits(&out[0][0].0), "ranks disagree");
        }
        let got = &out[0][0].0;
        let p = world as f32;
        match method {
            Method::Dense => {
                let want: Vec<f32> = (0..d).map(|i| grads.iter().map(|g| g[i]).sum::<f32>() / p).collect();
                prop_assert!(close(got, &want, 1e-5));
                prop_assert_eq!(out[0][0].1.k, d);
            }
            Method::Topk => {
                let mut want = vec![0.0f32; d];
                for g in &grads {
                    for (i, v) in select_reference(&layout, g, &ks).iter() {
                        want[i as usize] += wire.round(v);
                    }
                }
                want.iter_mut().for_each(|x| *x /= p);
                prop_assert_eq!(bits(got), bits(&want));
            }
            Method::Gtopk => {
                let sets: Vec<SparseSet> = grads.iter().map(|g| select_reference(&layout, g, &ks)).collect();
                let global = reduce_reference(algo, &sets, &layout, &ks, wire);
                let mut want = vec![0.0f32; d];
                global.scatter_add(&mut want);
                want.iter_mut().for_each(|x| *x /= p);
                prop_assert_eq!(bits(got), bits(&want));
            }
            Method::Randomk => {
                let coords = random_selection(&layout, &ks, &mut Rng::derive(seed, "randomk", 0));
                let mut want = vec![0.0f32; d];
                for &i in &coords {
                    want[i as usize] = grads.iter().map(|g| g[i as usize]).sum::<f32>() / p;
                }
                prop_assert!(close(got, &want, 1e-5));
                prop_assert_eq!(got.iter().filter(|x| **x != 0.0).count() <= coords.len(), true);
            }
        }
        prop_assert_eq!(out[0][0].1.k, if method == Method::Dense { d } else { ks.iter().sum() });
    }
}

#[test]
fn full_density_sparse_methods_equal_dense_with_zero_residual() {
    let sizes = [30, 17];
    for world in [1usize, 2, 3, 5, 8] {
        let dense = run_steps(world, &cfg(Method::Dense), &sizes, 1.0, 1, StepOptions::default(), 7);
        for method in [Method::Topk, Method::Gtopk, Method::Randomk] {
            for algo in [GtopkAlgo::Tree, GtopkAlgo::RecursiveDoubling] {
                let config = CompressorConfig {
                    method,
                    gtopk: algo,
                    ..CompressorConfig::default()
                };
                let res = run_group(world, |c| {
                    let mut comp = Compressor::new(config.clone(), &sizes).unwrap();
                    let mut upd = vec![0.0; 47];
                    let g = gradient(7, c.rank(), 0, 47);
                    comp.step(c, &g, 1.0, StepOptions::default(), &mut upd).unwrap();
                    (upd, comp.residual().to_vec())
                });
                for (upd, residual) in &res {
                    assert!(close(upd, &dense[0][0].0, 1e-5), "{method:?} {algo:?} P = {world}");
                    assert!(residual.iter().all(|&r| r == 0.0), "{method:?} residual");
                }
            }
        }
    }
}

#[test]
fn errors_are_clear() {
    let mut comps = crate::comm::local::LocalComm::group(1, std::time::Duration::from_secs(1));
    let c = &mut comps[0];
    let mut comp = Compressor::new(cfg(Method::Gtopk), &[5]).unwrap();
    let mut upd = vec![0.0; 5];
    let e = comp
        .step(
            c,
            &[1.0, 2.0, 3.0, f32::NAN, 0.0],
            0.5,
            StepOptions::default(),
            &mut upd,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("index 3 is NaN"), "{e}");
    assert_eq!(comp.steps(), 0);
    assert!(comp.residual().iter().all(|&r| r == 0.0), "failed step changed state");
    for bad in [0.0, -0.1, 1.01, f64::NAN] {
        let e = comp
            .step(c, &[1.0; 5], bad, StepOptions::default(), &mut upd)
            .unwrap_err()
            .to_string();
        assert!(e.contains("density"), "{e}");
    }
    let e = comp
        .step(c, &[1.0; 4], 0.5, StepOptions::default(), &mut upd)
        .unwrap_err()
        .to_string();
    assert!(e.contains("d = 5"), "{e}");
    // Infinities are values; opposite ones in residual and gradient make a NaN accumulator.
    let inf = f32::INFINITY;
    comp.step(c, &[inf, inf, 0.0, 0.0, 0.0], 0.2, StepOptions::default(), &mut upd)
        .unwrap();
    assert_eq!(upd[0], inf);
    assert_eq!(comp.residual(), &[0.0, inf, 0.0, 0.0, 0.0]);
    let e = comp
        .step(c, &[0.0, -inf, 0.0, 0.0, 0.0], 0.2, StepOptions::default(), &mut upd)
        .unwrap_err()
        .to_string();
    assert!(e.contains("accumulator at index 1 is NaN"), "{e}");
    assert_eq!(comp.residual(), &[0.0, inf, 0.0, 0.0, 0.0]);
    let lossy_dense = CompressorConfig {
        method: Method::Dense,
        wire: Wire::F16,
        ..CompressorConfig::default()
    };
    assert!(Compressor::new(lossy_dense, &[5]).is_err());
    let bad_m = CompressorConfig {
        momentum_correction: Some(1.5),
        ..CompressorConfig::default()
    };
    assert!(Compressor::new(bad_m, &[5]).is_err());
    assert!(Compressor::new(cfg(Method::Topk), &[0]).is_err());
}

#[test]
fn opposite_signs_and_equal_magnitudes_pick_smallest_indices() {
    // +x and -x at different indices on different ranks: the global set is deterministic.
    for algo in [GtopkAlgo::Tree, GtopkAlgo::RecursiveDoubling] {
        let config = CompressorConfig {
            gtopk: algo,
            ..CompressorConfig::default()
        };
        let out = run_group(4, |c| {
            let mut g = vec![0.0f32; 16];
            let r = c.rank();
            g[r] = 2.0;
            g[15 - r] = -2.0;
            let mut comp = Compressor::new(config.clone(), &[16]).unwrap();
            let mut upd = vec![0.0; 16];
            comp.step(c, &g, 2.0 / 16.0, StepOptions::default(), &mut upd).unwrap();
            upd
        });
        let nz: Vec<usize> = (0..16).filter(|&i| out[0][i] != 0.0).collect();
        assert_eq!(nz, vec![0, 1], "{algo:?}");
        assert_eq!(out[0][0], 0.5);
        for o in &out {
            assert_eq!(bits(o), bits(&out[0]));
        }
    }
}

#[test]
fn momentum_correction_masks_applied_entries() {
    let config = CompressorConfig {
        method: Method::Topk,
        momentum_correction: Some(0.5),
        ..CompressorConfig::default()
    };
    let mut comps = crate::comm::local::LocalComm::group(1, std::time::Duration::from_secs(1));
    let c = &mut comps[0];
    let mut comp = Compressor::new(config, &[4]).unwrap();
    let g = [1.0f32, 4.0, 2.0, 3.0];
    let mut upd = [0.0f32; 4];
    comp.step(c, &g, 0.25, StepOptions::default(), &mut upd).unwrap();
    assert_eq!(upd, [0.0, 4.0, 0.0, 0.0]);
    // u = [1, 0, 2, 3] after masking; residual = [1, 0, 2, 3].
    assert_eq!(comp.state().momentum.unwrap(), vec![1.0, 0.0, 2.0, 3.0]);
    comp.step(c, &g, 0.25, StepOptions::default(), &mut upd).unwrap();
    // u = 0.5 u + g = [1.5, 4, 3, 4.5]; acc = residual + u = [2.5, 4, 5, 7.5].
    assert_eq!(upd, [0.0, 0.0, 0.0, 7.5]);
    assert_eq!(comp.residual(), &[2.5, 4.0, 5.0, 0.0]);
    assert_eq!(comp.state().momentum.unwrap(), vec![1.5, 4.0, 3.0, 0.0]);
}

#[test]
fn state_round_trips_through_serde_and_resumes_bit_for_bit() {
    let config = CompressorConfig {
        method: Method::Randomk,
        momentum_correction: Some(0.9),
        seed: 11,
        ..CompressorConfig::default()
    };
    let sizes = [50, 30];
    let results = run_group(3, |c| {
        let mut a = Compressor::new(config.clone(), &sizes).unwrap();
        let mut upd = vec![0.0; 80];
        for t in 0..2 {
            let g = gradient(2, c.rank(), t, 80);
            a.step(c, &g, 0.1, StepOptions::default(), &mut upd).unwrap();
        }
        let json = serde_json::to_string(&a.state()).unwrap();
        let mut b = Compressor::new(config.clone(), &sizes).unwrap();
        b.load_state(serde_json::from_str(&json).unwrap()).unwrap();
        let mut ua = vec![0.0; 80];
        let mut ub = vec![0.0; 80];
        let g = gradient(2, c.rank(), 2, 80);
        a.step(c, &g, 0.1, StepOptions::default(), &mut ua).unwrap();
        b.step(c, &g, 0.1, StepOptions::default(), &mut ub).unwrap();
        (bits(&ua) == bits(&ub), a.state() == b.state())
    });
    assert!(results.iter().all(|&(u, s)| u && s));

    let mut comp = Compressor::new(config.clone(), &sizes).unwrap();
    let mut s = comp.state();
    s.residual.pop();
    let e = comp.load_state(s).unwrap_err().to_string();
    assert!(e.contains("residual of 79 values"), "{e}");
    let mut s = comp.state();
    s.momentum = None;
    assert!(comp.load_state(s).is_err());
    let mut dense = Compressor::new(cfg(Method::Dense), &sizes).unwrap();
    assert!(dense.state().residual.is_empty());
    assert!(dense.load_state(comp.state()).is_err());
}

#[test]
fn delta_is_below_one_for_gtopk_and_none_when_k_is_d() {
    let sizes = [400];
    let opts = StepOptions {
        measure_delta: true,
        check_conservation: false,
    };
    let out = run_steps(4, &cfg(Method::Gtopk), &sizes, 0.05, 3, opts, 5);
    for step in &out[0] {
        let d = step.1.delta.unwrap();
        let s = step.1.delta_sampled.unwrap();
        assert!(d > 0.0 && d < 1.0, "delta {d}");
        assert!(s > 0.0 && s < 1.0, "sampled {s}");
    }
    for o in &out {
        let (mine, first) = (&o[2].1, &out[0][2].1);
        assert_eq!(
            (mine.delta, mine.delta_sampled),
            (first.delta, first.delta_sampled),
            "every rank reports the same delta"
        );
    }
    let full = run_steps(2, &cfg(Method::Dense), &sizes, 1.0, 1, opts, 5);
    assert_eq!(full[0][0].1.delta, None);
    assert_eq!(full[0][0].1.delta_sampled, None);
}
