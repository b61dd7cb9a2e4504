//! A ResNet basic block, relu(bn_b(conv_b(relu(bn_a(conv_a(x))))) + shortcut(x)), as one CPU op
//! each way in training.
//!
//! candle's backward gives every tensor that receives a gradient a fresh zero tensor and adds the
//! gradient into it, on one thread. Built from two conv+bn ops (`conv_bn`) and `add_relu`, a block
//! has four such activation-sized gradients (both conv+bn outputs, the sum, and the input's second
//! share, from the shortcut); as one op it has one, its input's. The add and ReLU at the end run
//! inside the passes of the second BatchNorm. The numbers are those of the layers apart: the same
//! passes (`conv::cpu_*`, `batch_norm::cpu_*`) in the same order, so the results are equal bit for
//! bit (tested in `resnet20`).

use super::batch_norm::{self, BatchNorm, Dims, Float, Stats};
use super::conv::{self, ConvParams, Elem, Geometry};
use super::cpu_buffers::cpu_storage;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

const OP: &str = "basic block";

/// One convolution and the BatchNorm after it.
#[derive(Clone, Copy)]
pub struct Half<'a> {
    pub kernel: &'a Tensor,
    pub params: ConvParams,
    pub bn: &'a BatchNorm,
}

/// What the block adds to its second BatchNorm's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shortcut {
    /// The input itself.
    Identity,
    /// Option A: the input's even rows and columns, then `extra` channels of zeros.
    Subsample { extra: usize },
}

/// The block's output when it runs fused (CPU training, f32 or f64); `None` otherwise, for the
/// caller to run the layers apart.
pub fn fused(x: &Tensor, a: Half, b: Half, shortcut: Shortcut, train: bool) -> Result<Option<Tensor>> {
    let same = |t: &Tensor| t.device().is_cpu() && t.dtype() == x.dtype();
    if !BatchNorm::fuses(x, train) || !same(a.kernel) || !same(b.kernel) {
        return Ok(None);
    }
    let (gamma_a, beta_a) = a.bn.affine(x.dtype())?;
    let (gamma_b, beta_b) = b.bn.affine(x.dtype())?;
    let (ka, kb) = (a.kernel.flatten_all()?, b.kernel.flatten_all()?);
    let params = Tensor::cat(&[&ka, &gamma_a, &beta_a, &kb, &gamma_b, &beta_b], 0)?;
    let saved = Arc::new(Mutex::new(None));
    let op = Block {
        kernels: [(a.kernel.dims4()?, a.params), (b.kernel.dims4()?, b.params)],
        shortcut,
        saved: saved.clone(),
    };
    let out = x.contiguous()?.apply_op2(&params, op)?;
    let saved = saved.lock().expect("basic block state");
    a.bn.update_running(saved.as_ref().map(|s: &Saved| &s.stats[0]))?;
    b.bn.update_running(saved.as_ref().map(|s: &Saved| &s.stats[1]))?;
    Ok(Some(out))
}

/// (input, [kernel a; gamma a; beta a; kernel b; gamma b; beta b]) -> output.
struct Block {
    kernels: [((usize, usize, usize, usize), ConvParams); 2],
    shortcut: Shortcut,
    saved: Arc<Mutex<Option<Saved>>>,
}

/// What the forward keeps for the backward: both batches' statistics, the first convolution's
/// output and its normalised, rectified form (the second's input), the second convolution's output.
struct Saved {
    stats: [Stats; 2],
    ya: CpuStorage,
    za: CpuStorage,
    yb: CpuStorage,
}

/// The shapes of the block's passes, checked.
struct Plan {
    ga: Geometry,
    gb: Geometry,
    da: Dims,
    db: Dims,
    shortcut: Shortcut,
}

impl Plan {
    fn new(x: &[usize], op: &Block, params: usize) -> Result<Self> {
        let dims = |(o, c, kh, kw): (usize, usize, usize, usize)| [o, c, kh, kw];
        let [(ka, pa), (kb, pb)] = op.kernels;
        let ga = Geometry::new(x, &dims(ka), pa)?;
        let gb = Geometry::new(&[ga.n, ga.o, ga.oh, ga.ow], &dims(kb), pb)?;
        let (da, db) = (
            Dims::of(&[ga.n, ga.o, ga.oh, ga.ow])?,
            Dims::of(&[gb.n, gb.o, gb.oh, gb.ow])?,
        );
        let out = [gb.n, gb.o, gb.oh, gb.ow];
        let fits = match op.shortcut {
            Shortcut::Identity => out == [ga.n, ga.c, ga.h, ga.w],
            Shortcut::Subsample { extra } => {
                ga.h % 2 == 0 && ga.w % 2 == 0 && out == [ga.n, ga.c + extra, ga.h / 2, ga.w / 2]
            }
        };
        if !fits {
            bail!(
                "{OP}: output {out:?} does not fit the {:?} shortcut of input {x:?}",
                op.shortcut
            );
        }
        let plan = Self {
            ga,
            gb,
            da,
            db,
            shortcut: op.shortcut,
        };
        let want = plan.lens().iter().sum::<usize>();
        if params != want {
            bail!("{OP}: {params} kernel and batch-norm values, expected {want}");
        }
        Ok(plan)
    }

    /// The lengths of the six parts of the parameter vector.
    fn lens(&self) -> [usize; 6] {
        let (a, b) = (&self.ga, &self.gb);
        [a.o * a.ck(), a.o, a.o, b.o * b.ck(), b.o, b.o]
    }

    fn split<'a, T>(&self, mut p: &'a [T]) -> [&'a [T]; 6] {
        self.lens().map(|len| {
            let (part, rest) = p.split_at(len);
            p = rest;
            part
        })
    }

    /// The input plane (sample, channel) that output plane `plane` adds, if any (a zero channel
    /// of option A adds none).
    fn source(&self, plane: usize) -> Option<usize> {
        let (c, cin) = (plane % self.gb.o, self.ga.c);
        (c < cin).then_some(plane / self.gb.o * cin + c)
    }

    /// The position in its input plane that output position `k` of a plane adds.
    fn at(&self, k: usize) -> usize {
        match self.shortcut {
            Shortcut::Identity => k,
            Shortcut::Subsample { .. } => 2 * (k / self.gb.ow) * self.ga.w + 2 * (k % self.gb.ow),
        }
    }

    /// out = relu(shortcut(x) + out), as `add_relu(shortcut, out)` computes it.
    fn add_shortcut_relu<T: Float>(&self, out: &mut [T], x: &[T]) {
        let (plane, xplane) = (self.gb.l(), self.ga.h * self.ga.w);
        out.par_chunks_mut(plane)
            .enumerate()
            .for_each(|(p, o)| match self.source(p) {
                Some(q) => {
                    let xs = &x[q * xplane..(q + 1) * xplane];
                    o.iter_mut()
                        .enumerate()
                        .for_each(|(k, v)| *v = (xs[self.at(k)] + *v).max_zero());
                }
                None => o.iter_mut().for_each(|v| *v = (T::from_f64(0.0) + *v).max_zero()),
            });
    }

    /// dx += the shortcut's share: the output gradient where the output is positive, at the
    /// input positions the shortcut read.
    fn add_shortcut_grad<T: Float>(&self, dx: &mut [T], dout: &[T], out: &[T]) {
        let (plane, xplane, cin, cout) = (self.gb.l(), self.ga.h * self.ga.w, self.ga.c, self.gb.o);
        dx.par_chunks_mut(xplane).enumerate().for_each(|(q, d)| {
            let p = q / cin * cout + q % cin;
            let (g, o) = (&dout[p * plane..(p + 1) * plane], &out[p * plane..(p + 1) * plane]);
            for k in 0..plane {
                let at = self.at(k);
                d[at] = d[at] + g[k].where_positive(o[k]);
            }
        });
    }
}

fn typed<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    super::cpu_buffers::typed(s, l, OP, what)
}

impl Block {
    fn forward_as<T: Elem + Float + WithDType>(
        &self,
        (x, lx): (&CpuStorage, &Layout),
        (p, lp): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let plan = Plan::new(lx.dims(), self, lp.shape().elem_count())?;
        let (x, p) = (typed::<T>(x, lx, "input")?, typed::<T>(p, lp, "parameters")?);
        let [ka, gamma_a, beta_a, kb, gamma_b, beta_b] = plan.split(p);
        let eps = batch_norm::EPS;
        let ya = conv::cpu_forward(&plan.ga, x, ka);
        let (za, sa) = batch_norm::cpu_forward(plan.da, &ya, gamma_a, beta_a, eps, true);
        let yb = conv::cpu_forward(&plan.gb, &za, kb);
        let (mut out, sb) = batch_norm::cpu_forward(plan.db, &yb, gamma_b, beta_b, eps, false);
        plan.add_shortcut_relu(&mut out, x);
        *self.saved.lock().expect("basic block state") = Some(Saved {
            stats: [sa, sb],
            ya: T::to_cpu_storage_owned(ya),
            za: T::to_cpu_storage_owned(za),
            yb: T::to_cpu_storage_owned(yb),
        });
        Ok((T::to_cpu_storage_owned(out), plan.gb.output_dims().into()))
    }

    /// (dx, dparams) as flat CPU tensors.
    fn backward_as<T: Elem + Float + WithDType>(
        &self,
        saved: &Saved,
        x: &Tensor,
        p: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let plan = Plan::new(x.dims(), self, p.elem_count())?;
        let (xs, lx) = x.storage_and_layout();
        let (ps, lp) = p.storage_and_layout();
        let (os, lo) = out.storage_and_layout();
        let (gs, lg) = dout.storage_and_layout();
        let x = typed::<T>(cpu_storage(&xs, OP, "input")?, lx, "input")?;
        let p = typed::<T>(cpu_storage(&ps, OP, "parameters")?, lp, "parameters")?;
        let out = typed::<T>(cpu_storage(&os, OP, "output")?, lo, "output")?;
        let dout = typed::<T>(cpu_storage(&gs, OP, "output gradient")?, lg, "output gradient")?;
        let (ya, za, yb) = (
            T::cpu_storage_as_slice(&saved.ya)?,
            T::cpu_storage_as_slice(&saved.za)?,
            T::cpu_storage_as_slice(&saved.yb)?,
        );
        if out.len() != plan.db.len() || dout.len() != out.len() || ya.len() != plan.da.len() {
            bail!(
                "{OP} backward: output of {} values, expected {}",
                out.len(),
                plan.db.len()
            );
        }
        let [ka, gamma_a, _, kb, gamma_b, _] = plan.split(p);
        let wide = |v: &[T]| v.iter().map(|&g| Float::to_f64(g)).collect::<Vec<f64>>();
        let eps = batch_norm::EPS;
        // The output's ReLU gates the second BatchNorm's gradient and the shortcut's alike.
        let mut b = batch_norm::cpu_backward(plan.db, yb, dout, out, &wide(gamma_b), &saved.stats[1], eps, true);
        let affine_b = b.split_off(plan.db.len());
        let dza = conv::cpu_input_grad(&plan.gb, &b, kb);
        let dkb = conv::cpu_weight_grad(&plan.gb, za, &b);
        let mut a = batch_norm::cpu_backward(plan.da, ya, &dza, za, &wide(gamma_a), &saved.stats[0], eps, true);
        let affine_a = a.split_off(plan.da.len());
        let mut dx = conv::cpu_input_grad(&plan.ga, &a, ka);
        let dka = conv::cpu_weight_grad(&plan.ga, x, &a);
        plan.add_shortcut_grad(&mut dx, dout, out);
        let mut dp = dka;
        dp.reserve(p.len() - dp.len());
        dp.extend(affine_a);
        dp.extend(dkb);
        dp.extend(affine_b);
        let cpu = |v: Vec<T>| {
            let len = v.len();
            Tensor::from_vec(v, len, &candle_core::Device::Cpu)
        };
        Ok((cpu(dx)?, cpu(dp)?))
    }
}

impl CustomOp2 for Block {
    fn name(&self) -> &'static str {
        "basic-block-train"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout, p: &CpuStorage, lp: &Layout) -> Result<(CpuStorage, Shape)> {
        match (x.dtype(), p.dtype()) {
            (DType::F32, DType::F32) => self.forward_as::<f32>((x, lx), (p, lp)),
            (DType::F64, DType::F64) => self.forward_as::<f64>((x, lx), (p, lp)),
            _ => bail!("{OP}: input and parameters must both be f32 or both f64"),
        }
    }

    fn bwd(&self, x: &Tensor, p: &Tensor, out: &Tensor, dout: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().expect("basic block state");
        let Some(saved) = saved.as_ref() else {
            bail!("{OP}: backward before its forward ran");
        };
        let dout = dout.contiguous()?;
        let (dx, dp) = match x.dtype() {
            DType::F32 => self.backward_as::<f32>(saved, x, p, out, &dout)?,
            DType::F64 => self.backward_as::<f64>(saved, x, p, out, &dout)?,
            t => bail!("{OP} backward: {t:?} operands, expected f32 or f64"),
        };
        Ok((Some(dx.reshape(x.shape())?), Some(dp)))
    }
}
