//! The one thing the trainer calls: a worker's gradient in, the aggregated update out (identical
//! bits on every rank), with error feedback kept across steps.

use super::accumulate::accumulate;
use super::config::{CompressorConfig, CompressorState, Method, ResidualPolicy, StepOptions, StepReport};
use super::delta::{delta_expected, delta_sampled};
use super::layout::Layout;
use super::randomk::random_selection;
use super::reduce::{gtopk_reduce, topk_gather};
use super::set::SparseSet;
use crate::comm::timed::Timed;
use crate::comm::Communicator;
use crate::par;
use crate::rng::Rng;
use anyhow::{bail, ensure, Result};

pub struct Compressor {
    cfg: CompressorConfig,
    layout: Layout,
    /// Per worker: what was accumulated but not yet applied. Empty for dense.
    residual: Vec<f32>,
    /// DGC's velocity u, when momentum correction is on.
    momentum: Option<Vec<f32>>,
    /// Scratch: this step's accumulator, residual + (u or grad).
    acc: Vec<f32>,
    step: u64,
}

impl Compressor {
    /// `tensor_sizes` in flat-layout order; their sum is d.
    pub fn new(cfg: CompressorConfig, tensor_sizes: &[usize]) -> Result<Self> {
        let layout = Layout::new(cfg.scope, tensor_sizes)?;
        if let Some(m) = cfg.momentum_correction {
            ensure!(
                m.is_finite() && (0.0..1.0).contains(&m),
                "momentum_correction = {m} must be in [0, 1)"
            );
        }
        if matches!(cfg.method, Method::Dense | Method::Randomk) && cfg.wire.is_lossy() {
            bail!(
                "wire = {:?} applies to the sparse pair messages of topk and gtopk; {:?} \
                 all-reduces f32 values",
                cfg.wire,
                cfg.method
            );
        }
        let d = layout.d();
        let residual = match cfg.method {
            Method::Dense => Vec::new(),
            _ => vec![0.0; d],
        };
        Ok(Self {
            momentum: cfg.momentum_correction.map(|_| vec![0.0; d]),
            cfg,
            layout,
            residual,
            acc: vec![0.0; d],
            step: 0,
        })
    }

    pub fn config(&self) -> &CompressorConfig {
        &self.cfg
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// This worker's residual (empty for dense).
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// `grad`: this worker's flat gradient (length d). Writes the global sum / P into `update`
    /// (length d), identical bits on every rank. `density` in (0, 1].
    pub fn step(
        &mut self,
        comm: &mut dyn Communicator,
        grad: &[f32],
        density: f64,
        opts: StepOptions,
        update: &mut [f32],
    ) -> Result<StepReport> {
        let d = self.layout.d();
        ensure!(
            grad.len() == d && update.len() == d,
            "compressor: gradient of {} and update of {} values, layout has d = {d}",
            grad.len(),
            update.len()
        );
        if let Some(p) = par::first_nan(grad) {
            bail!("compressor: gradient value at index {p} is NaN");
        }
        let ks = match self.cfg.method {
            Method::Dense => self.layout.segments().iter().map(|s| s.len).collect(),
            _ => self.layout.ks(density)?,
        };
        self.accumulate(grad)?;

        let world = comm.world_size();
        // `update` holds the global sum until the division by P at the end.
        let before = comm.traffic();
        let mut timed = Timed::new(comm);
        let applied = match self.cfg.method {
            Method::Dense => {
                par::copy(update, &self.acc);
                timed.all_reduce_sum(update)?;
                Applied::Everything
            }
            Method::Topk => self.topk(&mut timed, &ks, update)?,
            Method::Gtopk => self.gtopk(&mut timed, &ks, update)?,
            Method::Randomk => self.randomk(&mut timed, &ks, update)?,
        };
        let comm_s = timed.seconds;

        let mut report = StepReport {
            k: ks.iter().sum(),
            traffic: comm.traffic() - before,
            comm_s,
            ..StepReport::default()
        };
        crate::fault::leak_mass(comm.rank(), self.step + 1, &mut self.residual);
        if opts.check_conservation {
            self.check_conservation(comm, update, &mut report)?;
        }
        let p = world as f32;
        // x / 1 is x, bit for bit: one worker skips a pass over d values.
        if world > 1 {
            par::each_mut(update, |c| c.iter_mut().for_each(|u| *u /= p));
        }
        if let Some(u) = &mut self.momentum {
            match &applied {
                Applied::Everything => u.fill(0.0),
                Applied::Indices(idx) => {
                    for &i in idx {
                        u[i as usize] = 0.0;
                    }
                }
            }
        }
        if opts.measure_delta {
            let mut a = self.acc.clone();
            comm.all_reduce_sum(&mut a)?;
            for x in &mut a {
                *x /= p;
            }
            report.delta = delta_expected(&a, update, &self.layout, &ks);
            let mut rng = Rng::derive(self.cfg.seed, "delta", self.step);
            report.delta_sampled = delta_sampled(&a, update, &self.layout, &ks, &mut rng);
        }
        self.step += 1;
        Ok(report)
    }

    /// acc = residual + grad, or with momentum correction u = m u + grad, acc = residual + u.
    /// Checked for NaN (inf - inf) before any state changes, so a failed step leaves none.
    fn accumulate(&mut self, grad: &[f32]) -> Result<()> {
        // Dense keeps no residual.
        let residual = (!self.residual.is_empty()).then_some(&self.residual[..]);
        let m = self.cfg.momentum_correction.unwrap_or(0.0);
        accumulate(
            grad,
            residual,
            &mut self.acc,
            self.momentum.as_deref_mut().map(|u| (u, m)),
        );
        // Only a sum can make a NaN of finite values: without residual or velocity acc is grad,
        // checked already.
        let summed = residual.is_some() || self.momentum.is_some();
        if let Some(p) = summed.then(|| par::first_nan(&self.acc)).flatten() {
            bail!("compressor: accumulator at index {p} is NaN (residual and gradient are opposite infinities)");
        }
        Ok(())
    }

    /// This worker's k largest entries of its accumulator (an NVTX range for the profiler).
    fn select(&self, ks: &[usize]) -> Result<SparseSet> {
        let _r = crate::profile::range("sparse.select");
        self.layout.select(&self.acc, ks)
    }

    fn topk(&mut self, comm: &mut dyn Communicator, ks: &[usize], sum: &mut [f32]) -> Result<Applied> {
        let wire = self.cfg.wire;
        let sel = self.select(ks)?;
        let sets = topk_gather(comm, &sel, &self.layout, ks, wire)?;
        par::each_mut(sum, |c| c.fill(0.0));
        for set in &sets {
            set.scatter_add(sum);
        }
        par::copy(&mut self.residual, &self.acc);
        for (i, v) in sel.iter() {
            let sent = wire.round(v);
            self.residual[i as usize] = if sent == v { 0.0 } else { v - sent };
        }
        Ok(Applied::Indices(sel.idx().to_vec()))
    }

    fn gtopk(&mut self, comm: &mut dyn Communicator, ks: &[usize], sum: &mut [f32]) -> Result<Applied> {
        let sel = self.select(ks)?;
        let red = gtopk_reduce(comm, self.cfg.gtopk, sel.clone(), &self.layout, ks, self.cfg.wire)?;
        par::each_mut(sum, |c| c.fill(0.0));
        red.global.scatter_add(sum);
        par::copy(&mut self.residual, &self.acc);
        let included = included(&sel, &red.global);
        match self.cfg.residual_policy {
            ResidualPolicy::Conserve => {
                for &i in sel.idx() {
                    self.residual[i as usize] = 0.0;
                }
                for &(i, v) in &red.absorb {
                    self.residual[i as usize] += v;
                }
            }
            ResidualPolicy::OriginIndex => {
                for &i in &included {
                    self.residual[i as usize] = 0.0;
                }
            }
        }
        Ok(Applied::Indices(included))
    }

    fn randomk(&mut self, comm: &mut dyn Communicator, ks: &[usize], sum: &mut [f32]) -> Result<Applied> {
        let mut rng = Rng::derive(self.cfg.seed, "randomk", self.step);
        let coords = random_selection(&self.layout, ks, &mut rng);
        let mut vals: Vec<f32> = coords.iter().map(|&i| self.acc[i as usize]).collect();
        comm.all_reduce_sum(&mut vals)?;
        par::each_mut(sum, |c| c.fill(0.0));
        par::copy(&mut self.residual, &self.acc);
        for (&i, &v) in coords.iter().zip(&vals) {
            sum[i as usize] = v;
            self.residual[i as usize] = 0.0;
        }
        Ok(Applied::Indices(coords))
    }

    fn check_conservation(&self, comm: &mut dyn Communicator, sum: &[f32], report: &mut StepReport) -> Result<()> {
        let mut acc = self.acc.clone();
        comm.all_reduce_sum(&mut acc)?;
        let mut res = if self.residual.is_empty() {
            vec![0.0; self.layout.d()]
        } else {
            self.residual.clone()
        };
        comm.all_reduce_sum(&mut res)?;
        let (mut l1, mut l2, mut na, mut ns, mut nr) = (0.0f64, 0.0, 0.0, 0.0, 0.0);
        for ((&a, &s), &r) in acc.iter().zip(sum).zip(&res) {
            let (a, s, r) = (a as f64, s as f64, r as f64);
            let lost = a - s - r;
            l1 += lost.abs();
            l2 += lost * lost;
            na += a * a;
            ns += s * s;
            nr += r * r;
        }
        let scale = na.sqrt().max(ns.sqrt() + nr.sqrt());
        report.conservation_rel_err = Some(if scale > 0.0 { l2.sqrt() / scale } else { 0.0 });
        report.lost_mass = Some(l1);
        Ok(())
    }

    pub fn state(&self) -> CompressorState {
        CompressorState {
            residual: self.residual.clone(),
            momentum: self.momentum.clone(),
            step: self.step,
        }
    }

    /// Validates lengths against this compressor's layout and configuration.
    pub fn load_state(&mut self, s: CompressorState) -> Result<()> {
        ensure!(
            s.residual.len() == self.residual.len(),
            "compressor state: residual of {} values, this {:?} compressor keeps {} (d = {})",
            s.residual.len(),
            self.cfg.method,
            self.residual.len(),
            self.layout.d()
        );
        match (&s.momentum, &self.momentum) {
            (Some(a), Some(b)) => ensure!(
                a.len() == b.len(),
                "compressor state: momentum of {} values, expected d = {}",
                a.len(),
                b.len()
            ),
            (None, None) => {}
            (Some(_), None) => {
                bail!("compressor state has a momentum buffer but momentum_correction is off")
            }
            (None, Some(_)) => {
                bail!("compressor state has no momentum buffer but momentum_correction is on")
            }
        }
        if let Some(p) = par::first_nan(&s.residual) {
            bail!("compressor state: residual value at index {p} is NaN");
        }
        self.residual = s.residual;
        self.momentum = s.momentum;
        self.step = s.step;
        Ok(())
    }
}

/// Which accumulator entries the step applied, for DGC's momentum masking.
enum Applied {
    Everything,
    Indices(Vec<u32>),
}

/// This worker's sent indices that are in the global set (the authors' membership test).
fn included(sent: &SparseSet, global: &SparseSet) -> Vec<u32> {
    sent.idx().iter().copied().filter(|&i| global.contains(i)).collect()
}
