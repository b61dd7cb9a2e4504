//! The engine for a model on a GPU: the flat gradient, the residual, the update, the parameters
//! and the optimizer's momentum stay in device memory. A sparse step is one fused pass (residual +
//! gradient, histogram) and the selection, which leaves the residual behind; gTop-k's tree then
//! merges on the device, its k-pair sets sent from device memory (GPU to GPU under NCCL; through
//! the host on the other backends), and the global set is scattered into the update.
//!
//! The step is written once over `Kernels`, the few device operations it needs: the CUDA kernels
//! in a `cuda` build (`cuda.rs`), and their CPU twins in the tests, which hold this engine to the
//! host engine's results step by step.
//!
//! Covered: dense, top-k and gTop-k (tree on the device, recursive doubling through the host;
//! either residual policy) with model scope and f32 pairs; Assumption 1's delta on the steps that
//! ask for it (one download). Layer scope, random-k, f16/bf16 pairs, DGC momentum correction and
//! the per-step conservation check run on the host engine (`unsupported` names which).

#[cfg(feature = "cuda")]
pub mod cuda;
mod ledger;
#[cfg(test)]
mod tests;

pub use ledger::Costs;
use ledger::Ledger;

use super::engine::{compressor_config, Engine, EngineState};
use super::host_engine::optimizer;
use super::tensor_sgd::{all_finite, clip_norm, TensorSgd};
use crate::comm::timed::Timed;
use crate::comm::Communicator;
use crate::config::Config;
use crate::models::Model;
use crate::rng::Rng;
use crate::sparse::{
    delta_expected, delta_sampled, group_leader, recursive_doubling_schedule, tree_schedule, CompressorConfig,
    GtopkAlgo, Layout, Method, ResidualPolicy, Scope, SparseSet, StepOptions, StepReport,
};
use anyhow::{bail, ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::Tensor;

/// The device side of a step. `Buf` is a d-length f32 vector in device memory, `Set` a sparse set
/// there with room for the step's k pairs (its length is known to whoever made it).
///
/// What each call costs the host, a contract the engine's `Ledger` counts by and every
/// implementation keeps: `accumulate_select` and `merge_into` wait for the device once (their
/// NaN checks read a few words back); `send_set`, `recv_set`, `exchange_set`, `broadcast_set` and
/// `all_reduce` wait once (they return when the transfer is done); `download*` wait once;
/// `zeros` and `all_reduce` allocate one d-length buffer; nothing else waits or allocates d floats.
pub trait Kernels: Send {
    type Buf: Send;
    type Set: Send;

    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    /// `residual += grad`, then the k largest magnitudes of it as pairs (sorted by index, ties to
    /// the smaller index), zeroed in `residual`, which is left as the new residual.
    fn accumulate_select(&mut self, residual: &mut Self::Buf, grad: &Tensor, k: usize) -> Result<Self::Set>;
    /// The paper's merge of two k-sets: `a` becomes the k kept pairs; the dropped ones are added
    /// into `absorb` when given.
    fn merge_into(&mut self, a: &mut Self::Set, b: &Self::Set, k: usize, absorb: Option<&mut Self::Buf>) -> Result<()>;
    fn send_set(&mut self, comm: &mut dyn Communicator, to: usize, set: &Self::Set, k: usize) -> Result<()>;
    fn recv_set(&mut self, comm: &mut dyn Communicator, from: usize, k: usize) -> Result<Self::Set>;
    /// Sends `set` to `peer` and returns `peer`'s, both at once.
    fn exchange_set(
        &mut self,
        comm: &mut dyn Communicator,
        peer: usize,
        set: &Self::Set,
        k: usize,
    ) -> Result<Self::Set>;
    fn broadcast_set(&mut self, comm: &mut dyn Communicator, root: usize, set: &mut Self::Set, k: usize) -> Result<()>;
    fn download_set(&self, set: &Self::Set, k: usize) -> Result<SparseSet>;
    /// `dense[i] += v / divisor` for the set's k pairs.
    fn scatter_set(&mut self, set: &Self::Set, k: usize, divisor: f32, dense: &mut Self::Buf) -> Result<()>;
    /// `dense[i] += v / divisor` for every pair from the host (indices unique).
    fn scatter(&mut self, pairs: &SparseSet, divisor: f32, dense: &mut Self::Buf) -> Result<()>;
    /// `grad` summed over every rank, in a fresh buffer.
    fn all_reduce(&mut self, comm: &mut dyn Communicator, grad: &Tensor) -> Result<Self::Buf>;
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    fn upload(&self, host: &[f32], buf: &mut Self::Buf) -> Result<()>;
    /// Hands a buffer to candle as a 1-D tensor on the model's device, without a copy.
    fn tensor_of(&self, buf: Self::Buf) -> Result<Tensor>;
}

/// The global set of a sparse step, where the exchange left it.
enum Global<S> {
    Host(SparseSet),
    Device(S),
}

/// What a sparse step's exchange leaves: the global set and, when the delta is measured, this
/// rank's accumulator.
struct Exchanged<S> {
    global: Global<S>,
    acc: Option<Vec<f32>>,
}

/// What of `cfg` the device engine does not do (None: all of it).
pub fn unsupported(cfg: &Config) -> Option<String> {
    let s = &cfg.sparse;
    if s.method == Method::Randomk {
        return Some("sparse.method = \"randomk\"".into());
    }
    if s.method != Method::Dense && s.scope == Scope::Layer {
        return Some("sparse.scope = \"layer\"".into());
    }
    if s.wire.is_lossy() {
        return Some(format!("sparse.wire = {:?}", s.wire));
    }
    if s.momentum_correction {
        return Some("sparse.momentum_correction".into());
    }
    if cfg.debug.check_conservation {
        return Some("debug.check_conservation".into());
    }
    None
}

pub struct DeviceEngine<K: Kernels> {
    cfg: CompressorConfig,
    layout: Layout,
    kernels: K,
    /// This step's flat gradient.
    grad: Option<Tensor>,
    /// Error feedback between steps (none for dense).
    residual: Option<K::Buf>,
    /// The aggregated update (divided by P) until `apply` takes it.
    update: Option<Tensor>,
    update_finite: bool,
    params: Tensor,
    sgd: TensorSgd,
    step: u64,
    /// `1.0 * P` on the device, made once: a division by it keeps the host engine's bits, and a
    /// scalar made each step would be a host-to-device copy each step.
    world: Option<(usize, Tensor)>,
    ledger: Ledger,
    /// Print each step's costs (`GTOPK_DEBUG_COSTS=1`, rank 0).
    announce: bool,
}

impl<K: Kernels> DeviceEngine<K> {
    /// `cfg` must be one `unsupported` passes.
    pub fn new(cfg: &Config, model: &Model, kernels: K) -> Result<Self> {
        if let Some(what) = unsupported(cfg) {
            bail!("the device engine does not cover {what}");
        }
        let c = compressor_config(cfg);
        let layout = Layout::new(c.scope, &model.param_sizes())?;
        let residual = match c.method {
            Method::Dense => None,
            _ => Some(kernels.zeros(layout.d())?),
        };
        Ok(Self {
            residual,
            kernels,
            grad: None,
            update: None,
            update_finite: true,
            params: model.flat_params_tensor()?,
            sgd: TensorSgd::like(&optimizer(cfg)),
            step: 0,
            cfg: c,
            layout,
            world: None,
            ledger: Ledger::default(),
            announce: false,
        })
    }

    /// Prints every step's costs to stderr when `GTOPK_DEBUG_COSTS` is set (for rank 0).
    pub fn announcing(mut self, yes: bool) -> Self {
        self.announce = yes && std::env::var_os("GTOPK_DEBUG_COSTS").is_some_and(|v| v != "0");
        self
    }

    /// What the last finished step (load_grad to apply) cost the host.
    pub fn last_costs(&self) -> Option<Costs> {
        self.ledger.last()
    }

    /// `all_finite`, counted.
    fn finite(&mut self, t: &Tensor) -> Result<bool> {
        let (ok, made) = all_finite(t)?;
        self.ledger.sync(1 + u32::from(made > 0));
        self.ledger.alloc(made);
        Ok(ok)
    }

    fn world_tensor(&mut self, world: usize, device: &candle_core::Device) -> Result<Tensor> {
        match &self.world {
            Some((p, t)) if *p == world => Ok(t.clone()),
            _ => {
                let t = Tensor::new(world as f32, device)?;
                self.world = Some((world, t.clone()));
                Ok(t)
            }
        }
    }

    fn d(&self) -> usize {
        self.layout.d()
    }

    /// Top-k or gTop-k: selection on the device, then the exchange. gTop-k keeps the sets on the
    /// device (merges there, pairs sent from device memory: NCCL moves them GPU to GPU); top-k's
    /// all-gather goes through the host. Returns the global sum (not yet divided) and, when asked,
    /// the accumulator for the delta measurement.
    fn sparse(
        &mut self,
        comm: &mut dyn Communicator,
        grad: &Tensor,
        k: usize,
        want_acc: bool,
    ) -> Result<Exchanged<K::Set>> {
        let d = self.d();
        let residual = self.residual.as_mut().context("a sparse method keeps a residual")?;
        let set = self
            .kernels
            .accumulate_select(residual, grad, k)
            .context("accumulating the gradient into the residual")?;
        self.ledger.sync(1);
        let origin_index = self.cfg.residual_policy == ResidualPolicy::OriginIndex;
        let mine = if want_acc || self.cfg.method == Method::Topk || origin_index {
            self.ledger.sync(1);
            Some(self.kernels.download_set(&set, k)?)
        } else {
            None
        };
        // The accumulator is what the residual holds now plus what was taken out of it.
        let acc = match (&mine, want_acc) {
            (Some(m), true) => {
                self.ledger.sync(1);
                let residual = self.residual.as_mut().context("a sparse method keeps a residual")?;
                let mut a = self.kernels.download(residual)?;
                m.scatter_add(&mut a);
                Some(a)
            }
            _ => None,
        };
        let global = match (self.cfg.method, mine) {
            (Method::Topk, Some(mine)) => {
                let wire = self.cfg.wire;
                let ks = [k];
                let pieces = comm.all_gather(&wire.encode(&mine))?;
                let sets = pieces
                    .iter()
                    .enumerate()
                    .map(|(r, p)| {
                        wire.decode(p, d)
                            .and_then(|s| self.layout.check_counts(&s, &ks).map(|()| s))
                            .with_context(|| format!("top-k all-gather: set of rank {r}"))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Global::Host(SparseSet::sum_in_order(&sets))
            }
            (Method::Gtopk, mine) => {
                let global = match self.cfg.gtopk {
                    GtopkAlgo::Tree => self.tree(comm, set, k)?,
                    GtopkAlgo::RecursiveDoubling => self.recursive_doubling(comm, set, k)?,
                };
                if let Some(mine) = mine.filter(|_| origin_index) {
                    self.ledger.sync(1);
                    let back = not_in(&mine, &self.kernels.download_set(&global, k)?)?;
                    let residual = self.residual.as_mut().context("a sparse method keeps a residual")?;
                    self.kernels.scatter(&back, 1.0, residual)?;
                }
                Global::Device(global)
            }
            _ => bail!("the sparse step is for top-k and gTop-k"),
        };
        Ok(Exchanged { global, acc })
    }

    /// Merges `other` into `set`; `absorb`: this rank keeps the dropped pairs (under `conserve`).
    fn merge(&mut self, set: &mut K::Set, other: &K::Set, k: usize, absorb: bool) -> Result<()> {
        let conserve = self.cfg.residual_policy == ResidualPolicy::Conserve;
        let residual = if absorb && conserve {
            self.residual.as_mut()
        } else {
            None
        };
        self.ledger.sync(1);
        self.kernels.merge_into(set, other, k, residual)
    }

    /// gTop-k's binomial tree (`sparse::tree_schedule`, as `sparse::gtopk_reduce`) on device sets:
    /// a receiver merges and keeps the dropped pairs; rank 0 broadcasts the global set.
    fn tree(&mut self, comm: &mut dyn Communicator, mut set: K::Set, k: usize) -> Result<K::Set> {
        let (rank, world) = (comm.rank(), comm.world_size());
        'rounds: for (r, round) in tree_schedule(world).iter().enumerate() {
            for &(from, to) in round {
                if from == rank {
                    self.ledger.sync(1);
                    self.kernels
                        .send_set(comm, to, &set, k)
                        .with_context(|| format!("gtop-k tree round {r}"))?;
                    break 'rounds;
                }
                if to == rank {
                    self.ledger.sync(1);
                    let other = self
                        .kernels
                        .recv_set(comm, from, k)
                        .with_context(|| format!("gtop-k tree round {r}"))?;
                    self.merge(&mut set, &other, k, true)?;
                }
            }
        }
        if world > 1 {
            self.ledger.sync(1);
            self.kernels
                .broadcast_set(comm, 0, &mut set, k)
                .context("gtop-k tree: broadcast of the global set")?;
        }
        Ok(set)
    }

    /// Recursive doubling (`sparse::recursive_doubling_schedule`, as `sparse::gtopk_reduce`) on
    /// device sets: ranks past the largest power of two fold in first and get the result last;
    /// in each round both peers merge alike, so only the group's lowest rank keeps the dropped
    /// pairs (`group_leader`).
    fn recursive_doubling(&mut self, comm: &mut dyn Communicator, mut set: K::Set, k: usize) -> Result<K::Set> {
        let (rank, world) = (comm.rank(), comm.world_size());
        let s = recursive_doubling_schedule(world);
        if rank >= s.core {
            let partner = rank - s.core;
            self.ledger.sync(1);
            self.kernels
                .send_set(comm, partner, &set, k)
                .context("gtop-k recursive doubling: pre-fold")?;
            self.ledger.sync(1);
            return self
                .kernels
                .recv_set(comm, partner, k)
                .context("gtop-k recursive doubling: final set");
        }
        if rank + s.core < world {
            self.ledger.sync(1);
            let other = self
                .kernels
                .recv_set(comm, rank + s.core, k)
                .context("gtop-k recursive doubling: pre-fold")?;
            self.merge(&mut set, &other, k, true)?;
        }
        for r in 0..s.rounds.len() as u32 {
            let peer = rank ^ (1 << r);
            self.ledger.sync(1);
            let other = self
                .kernels
                .exchange_set(comm, peer, &set, k)
                .with_context(|| format!("gtop-k recursive doubling round {r}"))?;
            self.merge(&mut set, &other, k, group_leader(rank, r + 1) == rank)?;
        }
        if rank + s.core < world {
            self.ledger.sync(1);
            self.kernels
                .send_set(comm, rank + s.core, &set, k)
                .context("gtop-k recursive doubling: post-fold")?;
        }
        Ok(set)
    }
}

/// The authors' `origin-index` rule: of this rank's sent pairs, those not in the global set go back
/// into its residual.
fn not_in(mine: &SparseSet, global: &SparseSet) -> Result<SparseSet> {
    let (idx, val): (Vec<u32>, Vec<f32>) = mine.iter().filter(|&(i, _)| !global.contains(i)).unzip();
    SparseSet::new(idx, val)
}

impl<K: Kernels> Engine for DeviceEngine<K> {
    fn load_grad(&mut self, model: &Model, grads: &GradStore, rank: usize, step: u64) -> Result<bool> {
        // A step is load_grad to apply (or to the next load_grad, when one was skipped).
        let costs = self.ledger.close();
        if self.announce && self.step > 0 {
            eprintln!(
                "device engine, step {}: {} host waits, {} allocations of d = {} floats",
                self.step,
                costs.syncs,
                costs.d_allocs,
                self.d()
            );
        }
        // One concatenation: the flat gradient.
        self.ledger.alloc(1);
        let mut grad = model.flat_grad_tensor(grads)?;
        // Fault injection (tests of the non-finite handling) edits the first value.
        let mut probe = [0.0f32];
        crate::fault::bad_grad(rank, step, &mut probe);
        crate::fault::stall(rank, step);
        if probe[0] != 0.0 {
            let head = Tensor::new(&probe, grad.device())?;
            grad = Tensor::cat(&[head, grad.narrow(0, 1, self.d() - 1)?], 0)?;
        }
        let finite = self.finite(&grad)?;
        self.grad = Some(grad);
        Ok(finite)
    }

    fn aggregate(&mut self, comm: &mut dyn Communicator, density: f64, opts: StepOptions) -> Result<StepReport> {
        ensure!(
            !opts.check_conservation,
            "the device engine does not check conservation (debug.check_conservation selects the host engine)"
        );
        let grad = self.grad.take().context("aggregate before load_grad")?;
        let (d, world) = (self.d(), comm.world_size());
        let before = comm.traffic();
        let mut timed = Timed::new(comm);
        let (update, k, acc) = match self.cfg.method {
            Method::Dense => {
                self.ledger.sync(1);
                self.ledger.alloc(2);
                let sum = self.kernels.all_reduce(&mut timed, &grad)?;
                let sum = self.kernels.tensor_of(sum)?;
                // A division, not a product with 1/P: the host engine's bits.
                let update = sum.broadcast_div(&self.world_tensor(world, sum.device())?)?;
                self.update_finite = self.finite(&update)?;
                (update, d, None)
            }
            _ => {
                let k = self.layout.ks(density)?[0];
                let Exchanged { global, acc } = self.sparse(&mut timed, &grad, k, opts.measure_delta)?;
                // The update is global / P at the global set's indices and zero elsewhere. A fresh
                // buffer each step (from the stream's pool): candle takes it over as a tensor.
                self.ledger.alloc(1);
                let mut sum = self.kernels.zeros(d)?;
                match &global {
                    Global::Host(g) => self.kernels.scatter(g, world as f32, &mut sum)?,
                    Global::Device(g) => self.kernels.scatter_set(g, k, world as f32, &mut sum)?,
                }
                let update = self.kernels.tensor_of(sum)?;
                self.update_finite = self.finite(&update)?;
                (update, k, acc)
            }
        };
        let mut report = StepReport {
            k,
            comm_s: timed.seconds,
            traffic: comm.traffic() - before,
            ..StepReport::default()
        };
        // As on the host, the measurement's all-reduce is neither traffic nor time of the step.
        if let Some(mut a) = acc {
            comm.all_reduce_sum(&mut a)?;
            a.iter_mut().for_each(|x| *x /= world as f32);
            self.ledger.sync(1);
            let (u, ks) = (update.to_vec1::<f32>()?, [k]);
            report.delta = delta_expected(&a, &u, &self.layout, &ks);
            let mut rng = Rng::derive(self.cfg.seed, "delta", self.step);
            report.delta_sampled = delta_sampled(&a, &u, &self.layout, &ks, &mut rng);
        }
        self.update = Some(update);
        self.step += 1;
        Ok(report)
    }

    fn update_finite(&self) -> Result<bool> {
        Ok(self.update_finite)
    }

    fn apply(&mut self, model: &Model, lr: f32, clip: f32) -> Result<()> {
        let update = self.update.take().context("apply before aggregate")?;
        if clip > 0.0 {
            // The norm: a square (d floats) and a scalar read; a scaled copy when it clips.
            self.ledger.sync(1);
            self.ledger.alloc(1);
        }
        let (update, clipped) = clip_norm(update, clip)?;
        self.ledger.alloc(u32::from(clipped));
        self.params = self.sgd.step(&self.params, &update, lr)?;
        self.ledger.alloc(self.sgd.allocs);
        // Views of the flat tensor copied into the variables: no allocation, and no wait: the
        // optimizer's kernels run behind the host, which goes on to the next batch (their time
        // falls into the next step's forward pass in the time split).
        model.set_flat_params_tensor(&self.params)?;
        Ok(())
    }

    fn state(&self) -> Result<EngineState> {
        Ok(EngineState {
            residual: match &self.residual {
                Some(r) => self.kernels.download(r)?,
                None => Vec::new(),
            },
            dgc_momentum: None,
            sgd_momentum: self.sgd.buf.as_ref().map(|b| b.to_vec1::<f32>()).transpose()?,
            compressor_step: self.step,
        })
    }

    fn load_state(&mut self, model: &Model, s: EngineState) -> Result<()> {
        let (d, keeps) = (self.d(), if self.cfg.method == Method::Dense { 0 } else { self.d() });
        ensure!(
            s.residual.len() == keeps,
            "compressor state: residual of {} values, this {:?} compressor keeps {keeps} (d = {d})",
            s.residual.len(),
            self.cfg.method,
        );
        ensure!(
            s.dgc_momentum.is_none(),
            "compressor state has a momentum buffer but momentum_correction is off"
        );
        if let Some(p) = s.residual.iter().position(|v| v.is_nan()) {
            bail!("compressor state: residual value at index {p} is NaN");
        }
        self.params = model.flat_params_tensor()?;
        self.sgd.buf = match s.sgd_momentum {
            Some(m) => {
                ensure!(
                    m.len() == d,
                    "momentum buffer has {} values for {d} parameters",
                    m.len()
                );
                Some(Tensor::from_vec(m, d, model.device())?)
            }
            None => None,
        };
        if let Some(r) = &mut self.residual {
            self.kernels.upload(&s.residual, r)?;
        }
        self.step = s.compressor_step;
        Ok(())
    }
}
