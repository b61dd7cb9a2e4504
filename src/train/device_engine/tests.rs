//! The device engine over the kernels' CPU twins, held to the host engine step by step: same
//! gradients, same communicator, the models' parameters and the residuals compared after every
//! step. The CUDA kernels are held to the same twins by `gtopk gpu-check`.

use super::*;
use crate::comm::local::LocalComm;
use crate::sparse::{accumulate, merge, top_k, Wire};
use crate::train::host_engine::HostEngine;
use candle_core::{Device, Tensor};
use std::time::Duration;

/// The specification of `cuda::CudaKernels`; `d` checks the sets it receives.
struct CpuKernels {
    d: usize,
}

impl Kernels for CpuKernels {
    type Buf = Vec<f32>;
    type Set = SparseSet;

    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }

    fn accumulate_select(&mut self, residual: &mut Vec<f32>, grad: &Tensor, k: usize) -> Result<SparseSet> {
        let g = grad.to_vec1::<f32>()?;
        let mut acc = vec![0.0; g.len()];
        accumulate(&g, Some(residual), &mut acc, None);
        let sel = top_k(&acc, k)?;
        for &i in sel.idx() {
            acc[i as usize] = 0.0;
        }
        *residual = acc;
        Ok(sel)
    }

    fn merge_into(&mut self, a: &mut SparseSet, b: &SparseSet, k: usize, absorb: Option<&mut Vec<f32>>) -> Result<()> {
        let (kept, dropped) = merge(a, b, k)?;
        if let Some(r) = absorb {
            dropped.scatter_add(r);
        }
        *a = kept;
        Ok(())
    }

    fn send_set(&mut self, comm: &mut dyn Communicator, to: usize, set: &SparseSet, k: usize) -> Result<()> {
        ensure!(set.len() == k, "{} pairs where k = {k}", set.len());
        comm.send(to, &Wire::F32.encode(set))
    }

    fn recv_set(&mut self, comm: &mut dyn Communicator, from: usize, k: usize) -> Result<SparseSet> {
        let set = Wire::F32.decode(&comm.recv(from)?, self.d)?;
        ensure!(set.len() == k, "{} pairs from rank {from} where k = {k}", set.len());
        Ok(set)
    }

    fn exchange_set(
        &mut self,
        comm: &mut dyn Communicator,
        peer: usize,
        set: &SparseSet,
        k: usize,
    ) -> Result<SparseSet> {
        let got = Wire::F32.decode(&comm.exchange(peer, &Wire::F32.encode(set))?, self.d)?;
        ensure!(got.len() == k, "{} pairs from rank {peer} where k = {k}", got.len());
        Ok(got)
    }

    fn broadcast_set(&mut self, comm: &mut dyn Communicator, root: usize, set: &mut SparseSet, k: usize) -> Result<()> {
        let mut msg = Wire::F32.encode(set);
        comm.broadcast(root, &mut msg)?;
        *set = Wire::F32.decode(&msg, self.d)?;
        ensure!(set.len() == k, "{} pairs from rank {root} where k = {k}", set.len());
        Ok(())
    }

    fn download_set(&self, set: &SparseSet, k: usize) -> Result<SparseSet> {
        ensure!(set.len() == k, "{} pairs where k = {k}", set.len());
        Ok(set.clone())
    }

    fn scatter_set(&mut self, set: &SparseSet, k: usize, divisor: f32, dense: &mut Vec<f32>) -> Result<()> {
        ensure!(set.len() == k, "{} pairs where k = {k}", set.len());
        set.scatter_add_div(dense, divisor);
        Ok(())
    }

    fn scatter(&mut self, pairs: &SparseSet, divisor: f32, dense: &mut Vec<f32>) -> Result<()> {
        pairs.scatter_add_div(dense, divisor);
        Ok(())
    }

    fn all_reduce(&mut self, comm: &mut dyn Communicator, grad: &Tensor) -> Result<Vec<f32>> {
        let mut g = grad.to_vec1::<f32>()?;
        comm.all_reduce_sum(&mut g)?;
        Ok(g)
    }

    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }

    fn upload(&self, host: &[f32], buf: &mut Vec<f32>) -> Result<()> {
        buf.copy_from_slice(host);
        Ok(())
    }

    fn tensor_of(&self, buf: Vec<f32>) -> Result<Tensor> {
        let n = buf.len();
        Ok(Tensor::from_vec(buf, n, &Device::Cpu)?)
    }
}

fn kernels(model: &Model) -> CpuKernels {
    CpuKernels { d: model.num_params() }
}

fn config(sets: &[&str]) -> Config {
    let base = r#"
        name = "engine"
        seed = 5
        [model]
        arch = "lstm-ptb"
        hidden = 6
        layers = 1
        dropout = 0.0
        [data]
        source = "synthetic-text"
        [train]
        epochs = 1
        batch_size = 60
        lr = 0.5
        momentum = 0.9
        weight_decay = 1e-3
        [dist]
        workers = 3
    "#;
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Config::parse(base, &sets).unwrap()
}

/// A gradient for every parameter but the first (which reads as zeros), a function of the rank
/// and the step, with a few exact ties.
fn grads(model: &Model, rank: usize, step: u64) -> GradStore {
    let mut rng = Rng::derive(11, "engine-grads", step * 16 + rank as u64);
    let mut g = GradStore::default();
    for (_, v) in model.params().iter().skip(1) {
        let vals: Vec<f32> = (0..v.elem_count())
            .map(|i| if i % 7 == 3 { 0.25 } else { rng.normal() })
            .collect();
        g.insert(v.as_tensor(), Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap());
    }
    g
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Five steps on three ranks through both engines; `exact` asks for identical bits.
fn agree(sets: &[&str], exact: bool) {
    agree_on(3, sets, exact)
}

/// `f` on every rank of a local group, each in its own thread, with the config `sets` and
/// `dist.workers = ranks`; the ranks' results in rank order.
fn on_ranks<T: Send + 'static>(
    ranks: usize,
    sets: &[&str],
    f: impl Fn(Config, LocalComm) -> T + Clone + Send + 'static,
) -> Vec<T> {
    let workers = format!("dist.workers={ranks}");
    let cfg = config(&[sets, &[workers.as_str()]].concat());
    let handles: Vec<_> = LocalComm::group(ranks, Duration::from_secs(20))
        .into_iter()
        .map(|comm| {
            let (cfg, f) = (cfg.clone(), f.clone());
            std::thread::spawn(move || f(cfg, comm))
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("a rank failed")).collect()
}

fn agree_on(ranks: usize, sets: &[&str], exact: bool) {
    on_ranks(ranks, sets, move |cfg, mut comm| {
        let rank = comm.rank();
        let build = || Model::build(&cfg.model, 20, cfg.seed, &Device::Cpu).unwrap();
        let (mh, md) = (build(), build());
        let mut host = HostEngine::new(&cfg, &mh).unwrap();
        let mut dev = DeviceEngine::new(&cfg, &md, kernels(&md)).unwrap();
        for step in 1..=5u64 {
            let (gh, gd) = (grads(&mh, rank, step), grads(&md, rank, step));
            assert!(host.load_grad(&mh, &gh, rank, step).unwrap());
            assert!(dev.load_grad(&md, &gd, rank, step).unwrap());
            let opts = StepOptions {
                measure_delta: step == 3,
                check_conservation: false,
            };
            let density = if step == 1 { 0.3 } else { 0.05 };
            let rh = host.aggregate(&mut comm, density, opts).unwrap();
            let rd = dev.aggregate(&mut comm, density, opts).unwrap();
            assert_eq!((rh.k, rh.traffic), (rd.k, rd.traffic), "step {step}");
            if let (Some(a), Some(b)) = (rh.delta, rd.delta) {
                assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "delta {a} vs {b}");
            }
            assert_eq!(rh.delta.is_some(), rd.delta.is_some());
            assert!(host.update_finite().unwrap() && dev.update_finite().unwrap());
            // The clipping norm is a sum in another order: from then on only close.
            let clip = if step == 5 { 0.01 } else { 0.0 };
            host.apply(&mh, 0.5, clip).unwrap();
            dev.apply(&md, 0.5, clip).unwrap();
            let (ph, pd) = (mh.flat_params().unwrap(), md.flat_params().unwrap());
            let (sh, sd) = (host.state().unwrap(), dev.state().unwrap());
            if exact && clip == 0.0 {
                assert!(
                    ph == pd,
                    "rank {rank} step {step}: parameters differ by {}",
                    max_diff(&ph, &pd)
                );
                assert!(sh == sd, "rank {rank} step {step}: states differ");
            } else {
                assert!(max_diff(&ph, &pd) < 1e-5, "rank {rank} step {step}: parameters");
                assert!(max_diff(&sh.residual, &sd.residual) < 1e-5, "rank {rank} step {step}");
            }
        }
        // A checkpoint's state goes into a fresh engine and comes out the same.
        let state = dev.state().unwrap();
        let mut again = DeviceEngine::new(&cfg, &md, kernels(&md)).unwrap();
        again.load_state(&md, state.clone()).unwrap();
        assert_eq!(again.state().unwrap(), state);
    });
}

#[test]
fn dense_matches_the_host_engine_exactly() {
    agree(&["sparse.method=\"dense\""], true);
}

#[test]
fn topk_matches_the_host_engine_exactly() {
    agree(&["sparse.method=\"topk\""], true);
}

/// The tree on device sets: each merge's dropped pairs go into the residual round by round, the
/// host engine's order, so both residual policies agree to the bit.
/// Both reductions on device sets: each merge's dropped pairs go into the residual as the host
/// engine's do, in the same order, so both residual policies agree to the bit, for powers of two
/// and for the pre-folded rest.
#[test]
fn gtopk_matches_the_host_engine_exactly() {
    for algo in ["tree", "recursive-doubling"] {
        let algo = format!("sparse.gtopk=\"{algo}\"");
        for ranks in [1, 2, 3, 4, 5] {
            agree_on(ranks, &["sparse.method=\"gtopk\"", &algo], true);
        }
        let origin = "sparse.residual_policy=\"origin-index\"";
        agree(&["sparse.method=\"gtopk\"", &algo, origin], true);
    }
}

#[test]
fn what_the_device_engine_leaves_to_the_host_is_named() {
    for (set, named) in [
        ("sparse.method=\"randomk\"", "randomk"),
        ("sparse.scope=\"layer\"", "sparse.scope"),
        ("sparse.wire=\"f16\"", "sparse.wire"),
        ("sparse.momentum_correction=true", "momentum_correction"),
        ("debug.check_conservation=true", "check_conservation"),
    ] {
        let cfg = config(&["sparse.method=\"gtopk\"", set]);
        let why = unsupported(&cfg).unwrap_or_default();
        assert!(why.contains(named), "{set}: {why:?}");
        let model = Model::build(&cfg.model, 20, 1, &Device::Cpu).unwrap();
        assert!(DeviceEngine::new(&cfg, &model, kernels(&model)).is_err());
    }
    assert_eq!(unsupported(&config(&["sparse.method=\"gtopk\""])), None);
}

#[test]
fn a_bad_checkpoint_state_is_refused() {
    let cfg = config(&["sparse.method=\"gtopk\""]);
    let model = Model::build(&cfg.model, 20, 1, &Device::Cpu).unwrap();
    let mut e = DeviceEngine::new(&cfg, &model, kernels(&model)).unwrap();
    let good = e.state().unwrap();
    let short = EngineState {
        residual: vec![0.0; 3],
        ..good.clone()
    };
    let err = e.load_state(&model, short).unwrap_err().to_string();
    assert!(err.contains("residual of 3 values"), "{err}");
    let mut nan = good.clone();
    nan.residual[2] = f32::NAN;
    assert!(e
        .load_state(&model, nan)
        .unwrap_err()
        .to_string()
        .contains("index 2 is NaN"));
    let momentum = EngineState {
        sgd_momentum: Some(vec![0.0; 2]),
        ..good
    };
    assert!(e
        .load_state(&model, momentum)
        .unwrap_err()
        .to_string()
        .contains("momentum buffer"));
}

/// Each rank's costs (host waits, d-length allocations) of steps 1 and 2 on `ranks` ranks.
fn costs_on(ranks: usize, sets: &[&str]) -> Vec<[Costs; 2]> {
    on_ranks(ranks, sets, |cfg, mut comm| {
        let rank = comm.rank();
        let model = Model::build(&cfg.model, 20, cfg.seed, &Device::Cpu).unwrap();
        let mut dev = DeviceEngine::new(&cfg, &model, kernels(&model)).unwrap();
        let mut seen = Vec::new();
        for step in 1..=3u64 {
            assert!(dev.load_grad(&model, &grads(&model, rank, step), rank, step).unwrap());
            seen.extend(dev.last_costs().filter(|_| step > 1));
            if step == 3 {
                break;
            }
            let opts = StepOptions::default();
            dev.aggregate(&mut comm, 0.05, opts).unwrap();
            dev.apply(&model, 0.5, 0.0).unwrap();
        }
        [seen[0], seen[1]]
    })
}

/// The numbers docs/GPU.md states. SGD with momentum and weight decay makes 5 tensors of length
/// d on its first step (the momentum buffer starts as a copy) and 7 after; the flat gradient is
/// one more, the sparse update's zeroed buffer one more, dense's reduced copy and its division two.
/// The waits: the gradient's and the update's finiteness (one scalar each), the selection's NaN
/// word, each merge's outcome, and each communicator call.
#[test]
fn host_waits_and_allocations_per_step_are_as_documented() {
    let c = |syncs, d_allocs| Costs { syncs, d_allocs };
    let sgd = [5, 7];
    let per_step = |syncs: u32, allocs: u32| [c(syncs, allocs + sgd[0]), c(syncs, allocs + sgd[1])];
    // gTop-k's tree on 4 ranks: rank 0 receives and merges twice, rank 2 once, all get the broadcast.
    assert_eq!(
        costs_on(4, &["sparse.method=\"gtopk\""]),
        vec![per_step(8, 2), per_step(5, 2), per_step(7, 2), per_step(5, 2)]
    );
    // Recursive doubling on 4 ranks: two exchanges and two merges each.
    let rd = per_step(1 + 1 + 2 * 2 + 1, 2);
    assert_eq!(
        costs_on(4, &["sparse.method=\"gtopk\"", "sparse.gtopk=\"recursive-doubling\""]),
        vec![rd; 4]
    );
    // Top-k: the selected set comes down for the all-gather.
    assert_eq!(costs_on(2, &["sparse.method=\"topk\""]), vec![per_step(4, 2); 2]);
    // Dense: the all-reduce.
    assert_eq!(costs_on(2, &["sparse.method=\"dense\""]), vec![per_step(3, 3); 2]);
}
