//! The CPU convolution: three GEMM passes over im2col matrices, hooked into candle's autograd as
//! custom ops (the forward's `bwd` runs the two gradient ops).
//!
//! Per group of samples, with col = their im2col matrices side by side [CK, m L], dy as [O, m L]
//! and W as [O, CK]: forward y = W col; input gradient dx = col2im(W^T dy); weight gradient
//! dW = sum over the groups of dy col^T. A group holds one sample where OH*OW is large and more
//! where it is small, so that every GEMM has at least `MIN_COLUMNS` columns. Groups run in
//! parallel on the current rayon pool (a worker's own pool in training, `RAYON_NUM_THREADS`
//! threads otherwise), each GEMM single-threaded; a single group hands the pool to its GEMM.

use super::geometry::{ConvParams, Geometry};
use super::im2col::{col2im, im2col};
use super::workspace::Elem;
use crate::models::matrix::{gemm_into, pool_parallelism, Mat};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

pub fn conv2d(x: &Tensor, w: &Tensor, p: ConvParams) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Forward(p))
}

/// Columns a GEMM should have at least: below this the `gemm` crate's microkernels starve (a
/// VGG-16 layer at 2x2 has 4 columns a sample) and a weight gradient accumulated sample by sample
/// rereads the whole [O, CK] sum for a product of depth OH*OW.
const MIN_COLUMNS: usize = 512;

/// Samples that share one GEMM: their column matrices side by side, [CK, size * L].
#[derive(Clone, Copy)]
struct Groups {
    size: usize,
    count: usize,
}

impl Groups {
    fn of(g: &Geometry) -> Self {
        let size = MIN_COLUMNS.div_ceil(g.l().max(1)).clamp(1, g.n.max(1));
        Self {
            size,
            count: g.n.div_ceil(size),
        }
    }

    /// The samples of group `i`.
    fn samples(&self, i: usize, n: usize) -> std::ops::Range<usize> {
        i * self.size..((i + 1) * self.size).min(n)
    }
}

/// GEMM threading when the groups themselves do not fill the pool.
fn inner_parallelism(parallel_groups: usize) -> Parallelism {
    if parallel_groups == 1 {
        pool_parallelism()
    } else {
        Parallelism::None
    }
}

/// A fresh output of `per` values a sample, each group's slice (zeroed) written by
/// `f(first sample, slice, gemm threading)`, the groups in parallel.
fn per_group<T: Elem>(n: usize, per: usize, groups: Groups, f: impl Fn(usize, &mut [T], Parallelism) + Sync) -> Vec<T> {
    let par = if groups.count <= 1 {
        inner_parallelism(1)
    } else {
        Parallelism::None
    };
    crate::models::cpu_buffers::filled(n * per, 0, per * groups.size, |i, out| f(i * groups.size, out, par))
}

/// `src` [a, b, inner] into `dst` [b, a, inner]: between a group's per-sample layout [m, O, L]
/// and its GEMM's [O, m * L].
fn swap_outer<T: Copy>(src: &[T], (a, b, inner): (usize, usize, usize), dst: &mut [T]) {
    for i in 0..a {
        for j in 0..b {
            dst[(j * a + i) * inner..][..inner].copy_from_slice(&src[(i * b + j) * inner..][..inner]);
        }
    }
}

/// Workspace values a group of `m` samples needs: its column matrix [CK, m L], then room for its
/// gathered [O, m L] output or output gradient.
fn workspace_len(g: &Geometry, m: usize) -> usize {
    g.ck() * m * g.l() + if m > 1 { g.o * g.l() * m } else { 0 }
}

/// The column matrices of samples `first..first + m` side by side in `col` (row stride m L).
fn group_columns<T: Elem>(g: &Geometry, x: &[T], first: usize, m: usize, col: &mut [T]) {
    let (l, xl) = (g.l(), g.input_len());
    for j in 0..m {
        let i = first + j;
        im2col(g, &x[i * xl..(i + 1) * xl], &mut col[j * l..], m * l);
    }
}

/// The output gradient of samples `first..first + m` as one [O, m L] matrix: `dy`'s own values for
/// one sample, else gathered into `tmp`.
fn group_gradient<'a, T: Elem>(g: &Geometry, dy: &'a [T], first: usize, m: usize, tmp: &'a mut [T]) -> &'a [T] {
    let ol = g.o * g.l();
    let dy_g = &dy[first * ol..(first + m) * ol];
    if m == 1 {
        return dy_g;
    }
    swap_outer(dy_g, (m, g.o, g.l()), tmp);
    tmp
}

pub(in crate::models) fn forward<T: Elem>(g: &Geometry, x: &[T], w: &[T]) -> Vec<T> {
    let (ck, l, ol) = (g.ck(), g.l(), g.o * g.l());
    let groups = Groups::of(g);
    per_group(g.n, ol, groups, |first, y_g, par| {
        let m = y_g.len() / ol;
        let cols = m * l;
        T::with_workspace(workspace_len(g, m), |ws| {
            let (col, tmp) = ws.split_at_mut(ck * cols);
            group_columns(g, x, first, m, col);
            if m == 1 {
                gemm_into((g.o, l, ck), y_g, false, Mat::rows(w, ck), Mat::rows(col, l), par);
            } else {
                gemm_into((g.o, cols, ck), tmp, false, Mat::rows(w, ck), Mat::rows(col, cols), par);
                swap_outer(tmp, (g.o, m, l), y_g);
            }
        })
    })
}

pub(in crate::models) fn input_grad<T: Elem>(g: &Geometry, dy: &[T], w: &[T]) -> Vec<T> {
    let (ck, l, xl) = (g.ck(), g.l(), g.input_len());
    let groups = Groups::of(g);
    per_group(g.n, xl, groups, |first, dx_g, par| {
        let m = dx_g.len() / xl;
        let cols = m * l;
        T::with_workspace(workspace_len(g, m), |ws| {
            let (dcol, tmp) = ws.split_at_mut(ck * cols);
            let dy_m = group_gradient(g, dy, first, m, tmp);
            gemm_into(
                (ck, cols, g.o),
                dcol,
                false,
                Mat::transposed(w, ck),
                Mat::rows(dy_m, cols),
                par,
            );
            for j in 0..m {
                col2im(g, &dcol[j * l..], &mut dx_g[j * xl..(j + 1) * xl], cols);
            }
        })
    })
}

/// Values all of a weight gradient's partial sums may hold together: 16 MiB of f32.
const PARTIAL_VALUES: usize = 4 << 20;

/// Most partial sums of a weight gradient: enough runs of groups for the threads of most machines.
const MAX_PARTIALS: usize = 16;

/// How many partial sums a weight gradient over `count` groups of an `[O, CK]` kernel of `len`
/// values takes: one per group up to `MAX_PARTIALS`, fewer where they would not fit
/// `PARTIAL_VALUES` (a large kernel has few groups anyway: its small maps put many samples in each).
fn weight_grad_partials(count: usize, len: usize) -> usize {
    (PARTIAL_VALUES / len.max(1)).clamp(1, MAX_PARTIALS).min(count).max(1)
}

pub(in crate::models) fn weight_grad<T: Elem>(g: &Geometry, x: &[T], dy: &[T]) -> Vec<T> {
    let (ck, l) = (g.ck(), g.l());
    let groups = Groups::of(g);
    // Partial sums over contiguous runs of groups, added up in run order at the end. How many runs
    // depends on the shape alone, never on the thread count, so the sum's grouping (and its bits)
    // is the same on any pool; the runs then go to the pool's threads.
    let chunks = weight_grad_partials(groups.count, g.o * ck);
    let per = groups.count.div_ceil(chunks);
    let chunks = groups.count.div_ceil(per);
    let par = inner_parallelism(chunks);
    // Which way round the product goes changes the gemm crate's blocking. Timed per layer
    // (docs/PERFORMANCE.md): dW^T = col dy^T is up to 1.7x faster for few output channels
    // (ResNet-20's 16-64), dW = dy col^T up to 3.7x faster for many (VGG-16's 256-512).
    let transposed = g.o <= 128 && g.o < ck;
    let partial = |chunk: usize| {
        let mut acc = vec![T::ZERO; g.o * ck];
        for group in chunk * per..((chunk + 1) * per).min(groups.count) {
            let samples = groups.samples(group, g.n);
            let (first, m) = (samples.start, samples.len());
            let cols = m * l;
            T::with_workspace(workspace_len(g, m), |ws| {
                let (col, tmp) = ws.split_at_mut(ck * cols);
                group_columns(g, x, first, m, col);
                let dy_m = group_gradient(g, dy, first, m, tmp);
                if transposed {
                    let (a, b) = (Mat::rows(col, cols), Mat::transposed(dy_m, cols));
                    gemm_into((ck, g.o, cols), &mut acc, true, a, b, par);
                } else {
                    let (a, b) = (Mat::rows(dy_m, cols), Mat::transposed(col, cols));
                    gemm_into((g.o, ck, cols), &mut acc, true, a, b, par);
                }
            });
        }
        acc
    };
    let parts: Vec<Vec<T>> = if chunks == 1 {
        vec![partial(0)]
    } else {
        (0..chunks).into_par_iter().map(partial).collect()
    };
    let mut parts = parts.into_iter();
    let mut sum = parts.next().unwrap_or_default();
    for part in parts {
        for (d, p) in sum.iter_mut().zip(part) {
            *d += p;
        }
    }
    if !transposed {
        return sum;
    }
    let mut dw = vec![T::ZERO; g.o * ck];
    swap_outer(&sum, (ck, g.o, 1), &mut dw);
    dw
}

/// One of the three passes, on two contiguous operands of one element type.
trait Pass {
    fn run<T: Elem>(&self, g: &Geometry, a: &[T], b: &[T]) -> Vec<T>;
}

fn contiguous<'a, T>(v: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    crate::models::cpu_buffers::contiguous(v, l, "conv2d", what)
}

fn apply(
    pass: &impl Pass,
    g: &Geometry,
    (a, la, what_a): (&CpuStorage, &Layout, &str),
    (b, lb, what_b): (&CpuStorage, &Layout, &str),
) -> Result<CpuStorage> {
    Ok(match (a, b) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) => {
            CpuStorage::F32(pass.run(g, contiguous(a, la, what_a)?, contiguous(b, lb, what_b)?))
        }
        (CpuStorage::F64(a), CpuStorage::F64(b)) => {
            CpuStorage::F64(pass.run(g, contiguous(a, la, what_a)?, contiguous(b, lb, what_b)?))
        }
        _ => bail!(
            "conv2d: {what_a} and {what_b} must both be f32 or both f64, got {:?} and {:?}",
            a.dtype(),
            b.dtype()
        ),
    })
}

fn expect_dims(l: &Layout, want: (usize, usize, usize, usize), what: &str) -> Result<()> {
    let want = [want.0, want.1, want.2, want.3];
    if l.dims() != want {
        bail!("conv2d: {what} has shape {:?}, expected {want:?}", l.dims());
    }
    Ok(())
}

/// (input, kernel) -> output; its backward runs the two gradient ops below.
struct Forward(ConvParams);

impl Pass for Forward {
    fn run<T: Elem>(&self, g: &Geometry, x: &[T], w: &[T]) -> Vec<T> {
        forward(g, x, w)
    }
}

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        "conv2d-im2col"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout, w: &CpuStorage, lw: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(lx.dims(), lw.dims(), self.0)?;
        let y = apply(self, &g, (x, lx, "input"), (w, lw, "kernel"))?;
        Ok((y, g.output_dims().into()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = dy.apply_op2_no_bwd(
            w,
            &InputGrad {
                p: self.0,
                x: x.dims4()?,
            },
        )?;
        let dw = x.apply_op2_no_bwd(
            &dy,
            &WeightGrad {
                p: self.0,
                w: w.dims4()?,
            },
        )?;
        Ok((Some(dx), Some(dw)))
    }
}

/// (output gradient, kernel) -> input gradient, for an input of shape `x`.
struct InputGrad {
    p: ConvParams,
    x: (usize, usize, usize, usize),
}

impl Pass for InputGrad {
    fn run<T: Elem>(&self, g: &Geometry, dy: &[T], w: &[T]) -> Vec<T> {
        input_grad(g, dy, w)
    }
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "conv2d-im2col-input-grad"
    }

    fn cpu_fwd(&self, dy: &CpuStorage, ldy: &Layout, w: &CpuStorage, lw: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = [self.x.0, self.x.1, self.x.2, self.x.3];
        let g = Geometry::new(&x, lw.dims(), self.p)?;
        expect_dims(ldy, g.output_dims(), "output gradient")?;
        let dx = apply(self, &g, (dy, ldy, "output gradient"), (w, lw, "kernel"))?;
        Ok((dx, self.x.into()))
    }
}

/// (input, output gradient) -> kernel gradient, for a kernel of shape `w`.
struct WeightGrad {
    p: ConvParams,
    w: (usize, usize, usize, usize),
}

impl Pass for WeightGrad {
    fn run<T: Elem>(&self, g: &Geometry, x: &[T], dy: &[T]) -> Vec<T> {
        weight_grad(g, x, dy)
    }
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "conv2d-im2col-weight-grad"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout, dy: &CpuStorage, ldy: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = [self.w.0, self.w.1, self.w.2, self.w.3];
        let g = Geometry::new(lx.dims(), &w, self.p)?;
        expect_dims(ldy, g.output_dims(), "output gradient")?;
        let dw = apply(self, &g, (x, lx, "input"), (dy, ldy, "output gradient"))?;
        Ok((dw, self.w.into()))
    }
}
