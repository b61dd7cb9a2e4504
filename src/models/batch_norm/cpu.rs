//! Training-mode BatchNorm on the CPU as one custom op each way. candle's BatchNorm is a dozen
//! tensor ops per direction (a transpose copy, means, a square, a square root, broadcasts), each a
//! full pass over the activations that allocates; here the forward is two passes (the batch
//! statistics, then the output) and the backward two more (two sums per channel, then the input
//! gradient, with the weight and bias gradients from the same sums).
//!
//! The tensor is read as [N, C, S] (S the product of the dimensions after the channel). Sums are
//! taken in f64 over groups of rows whose size depends only on the shape, and added in group order:
//! the result is the same at every thread count, which keeps runs on one machine bit-identical
//! across backends and resumes.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// The statistics of one training-mode forward, per channel, over its N * S values.
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    pub mean: Vec<f64>,
    /// The biased variance (divided by the count), the one the output is normalised by.
    pub var: Vec<f64>,
    pub count: usize,
}

/// The float types the op runs on.
pub trait Float:
    Copy
    + Default
    + Send
    + Sync
    + 'static
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
{
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
    fn max_zero(self) -> Self;
    /// The ReLU's backward: `self` (a gradient) where `y` (its output) is positive, else 0.
    fn where_positive(self, y: Self) -> Self;
}

macro_rules! float {
    ($t:ty) => {
        impl Float for $t {
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn max_zero(self) -> Self {
                self.max(0.0)
            }
            #[inline(always)]
            fn where_positive(self, y: Self) -> Self {
                if y > 0.0 {
                    self
                } else {
                    0.0
                }
            }
        }
    };
}

float!(f32);
float!(f64);

/// The [N, C, S] reading of a tensor's dimensions.
#[derive(Clone, Copy, Debug)]
pub(in crate::models) struct Dims {
    n: usize,
    c: usize,
    s: usize,
}

/// About this many values per reduction group: enough work per rayon task, few partial sums.
const GROUP_VALUES: usize = 1 << 14;

impl Dims {
    pub(in crate::models) fn of(dims: &[usize]) -> Result<Self> {
        if dims.len() < 2 {
            bail!("batch norm: input of shape {dims:?}, expected at least [N, C]");
        }
        let d = Self {
            n: dims[0],
            c: dims[1],
            s: dims[2..].iter().product(),
        };
        if d.c == 0 {
            bail!("batch norm: input of shape {dims:?} has no channels");
        }
        if d.n * d.s < 2 {
            bail!("batch norm in training needs more than one value per channel, got an input of shape {dims:?}");
        }
        Ok(d)
    }

    fn row(&self) -> usize {
        self.c * self.s
    }

    pub(in crate::models) fn len(&self) -> usize {
        self.n * self.row()
    }

    fn count(&self) -> usize {
        self.n * self.s
    }
}

/// Per channel, the sums of both parts of `f(channel, range)` over the channel's blocks (one
/// block of S values per sample; `range` is its span in the flat tensor).
fn channel_sums(d: Dims, f: impl Fn(usize, Range<usize>) -> (f64, f64) + Sync) -> Vec<(f64, f64)> {
    let rows = (GROUP_VALUES / d.row().max(1)).max(1);
    let partial = |g: usize| {
        let mut acc = vec![(0.0, 0.0); d.c];
        for n in g * rows..((g + 1) * rows).min(d.n) {
            for (c, sum) in acc.iter_mut().enumerate() {
                let start = n * d.row() + c * d.s;
                let (a, b) = f(c, start..start + d.s);
                sum.0 += a;
                sum.1 += b;
            }
        }
        acc
    };
    let parts: Vec<Vec<(f64, f64)>> = (0..d.n.div_ceil(rows)).into_par_iter().map(partial).collect();
    let mut total = vec![(0.0, 0.0); d.c];
    for part in parts {
        for (t, p) in total.iter_mut().zip(part) {
            t.0 += p.0;
            t.1 += p.1;
        }
    }
    total
}

const LANES: usize = 8;

/// The sums of both parts of `f(j)` for j in 0..n, in LANES interleaved partial sums (so that the
/// adds pipeline and vectorise), combined in a fixed order.
#[inline(always)]
fn lane_sums(n: usize, f: impl Fn(usize) -> (f64, f64)) -> (f64, f64) {
    let (mut a, mut b) = ([0.0f64; LANES], [0.0f64; LANES]);
    let full = n - n % LANES;
    for base in (0..full).step_by(LANES) {
        for l in 0..LANES {
            let (x, y) = f(base + l);
            a[l] += x;
            b[l] += y;
        }
    }
    let (mut sa, mut sb) = (0.0, 0.0);
    for j in full..n {
        let (x, y) = f(j);
        sa += x;
        sb += y;
    }
    (a.iter().sum::<f64>() + sa, b.iter().sum::<f64>() + sb)
}

/// A fresh tensor whose block of each (sample, channel) is written by `f(channel, range, block)`,
/// groups of samples in parallel, with room for `spare` more values.
fn map_blocks<T: Float>(d: Dims, spare: usize, f: impl Fn(usize, Range<usize>, &mut [T]) + Sync) -> Vec<T> {
    let rows_per_task = (GROUP_VALUES / d.row().max(1)).max(1);
    crate::models::cpu_buffers::filled(d.len(), spare, d.row() * rows_per_task, |task, chunk| {
        for (r, row) in chunk.chunks_mut(d.row()).enumerate() {
            let row_start = (task * rows_per_task + r) * d.row();
            for (c, block) in row.chunks_mut(d.s).enumerate() {
                let start = row_start + c * d.s;
                f(c, start..start + d.s, block);
            }
        }
    })
}

fn statistics<T: Float>(d: Dims, x: &[T]) -> Stats {
    // Shifted by each channel's first value, so that the sum of squares does not cancel.
    let shift: Vec<f64> = (0..d.c).map(|c| x[c * d.s].to_f64()).collect();
    let sums = channel_sums(d, |c, r| {
        let (xs, k) = (&x[r], shift[c]);
        lane_sums(xs.len(), |j| {
            let v = xs[j].to_f64() - k;
            (v, v * v)
        })
    });
    let m = d.count() as f64;
    let (mut mean, mut var) = (Vec::with_capacity(d.c), Vec::with_capacity(d.c));
    for (c, (s, ss)) in sums.into_iter().enumerate() {
        let mu = s / m;
        mean.push(shift[c] + mu);
        var.push((ss / m - mu * mu).max(0.0));
    }
    Stats {
        mean,
        var,
        count: d.count(),
    }
}

fn inv_std(stats: &Stats, eps: f64) -> Vec<f64> {
    stats.var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect()
}

/// y = (x - mean) / sqrt(var + eps) * weight + bias, then max(y, 0) if `relu`; the statistics in
/// f64, the output in the tensor's type.
pub(in crate::models) fn forward<T: Float>(
    d: Dims,
    x: &[T],
    w: &[T],
    b: &[T],
    eps: f64,
    relu: bool,
) -> (Vec<T>, Stats) {
    let stats = statistics(d, x);
    let inv = inv_std(&stats, eps);
    let mean: Vec<T> = stats.mean.iter().map(|&m| T::from_f64(m)).collect();
    let scale: Vec<T> = (0..d.c).map(|c| T::from_f64(w[c].to_f64() * inv[c])).collect();
    let y = map_blocks(d, 0, |c, r, out| {
        let (m, k, beta) = (mean[c], scale[c], b[c]);
        for (o, &v) in out.iter_mut().zip(&x[r]) {
            let v = (v - m) * k + beta;
            *o = if relu { v.max_zero() } else { v };
        }
    });
    (y, stats)
}

/// [dx (N * C * S), dweight (C), dbias (C)] in one vector. With `relu`, the output gradient
/// passes only where the output is positive (PyTorch's rule).
///
/// With g the output gradient and xhat = (x - mean) inv_std: dbias = sum g, dweight = sum g xhat,
/// dx = weight inv_std (g - dbias / M - xhat dweight / M), which is a g + b x + e per channel.
#[allow(clippy::too_many_arguments)]
pub(in crate::models) fn backward<T: Float>(
    d: Dims,
    x: &[T],
    dy: &[T],
    y: &[T],
    w: &[f64],
    stats: &Stats,
    eps: f64,
    relu: bool,
) -> Vec<T> {
    // Two loops each, so that the ReLU's gate is a select inside a vectorised loop: as one loop
    // with a run-time test it was a branch on random signs, 2.5x slower (ResNet-20 at 128).
    if relu {
        backward_gated::<T, true>(d, x, dy, y, w, stats, eps)
    } else {
        backward_gated::<T, false>(d, x, dy, y, w, stats, eps)
    }
}

fn backward_gated<T: Float, const RELU: bool>(
    d: Dims,
    x: &[T],
    dy: &[T],
    y: &[T],
    w: &[f64],
    stats: &Stats,
    eps: f64,
) -> Vec<T> {
    let inv = inv_std(stats, eps);
    let gate = |g: T, y: &[T], j: usize| if RELU { g.where_positive(y[j]) } else { g };
    let sums = channel_sums(d, |c, r| {
        let (xs, gs, ys, mean) = (&x[r.clone()], &dy[r.clone()], &y[r], stats.mean[c]);
        // The same length as xs, so that the compiler drops the bounds checks and vectorises.
        let (gs, ys) = (&gs[..xs.len()], &ys[..xs.len()]);
        lane_sums(xs.len(), |j| {
            let g = gate(gs[j], ys, j).to_f64();
            (g, g * (xs[j].to_f64() - mean))
        })
    });
    let m = d.count() as f64;
    // Per channel: dbias, dweight, and the coefficients a, b, e of dx.
    let coef: Vec<(f64, f64, [T; 3])> = (0..d.c)
        .map(|c| {
            let (db, centred) = sums[c];
            let dw = centred * inv[c];
            let a = w[c] * inv[c];
            let b = -a * inv[c] * dw / m;
            let e = -a * db / m - b * stats.mean[c];
            (db, dw, [T::from_f64(a), T::from_f64(b), T::from_f64(e)])
        })
        .collect();
    // Room for dweight and dbias, so that appending them does not copy dx.
    let mut out = map_blocks(d, 2 * d.c, |c, r, out| {
        let [a, b, e] = coef[c].2;
        let (xs, gs, ys) = (&x[r.clone()], &dy[r.clone()], &y[r]);
        let (gs, ys) = (&gs[..xs.len()], &ys[..xs.len()]);
        for (j, (o, &xv)) in out.iter_mut().zip(xs).enumerate() {
            *o = a * gate(gs[j], ys, j) + b * xv + e;
        }
    });
    out.extend(coef.iter().map(|k| T::from_f64(k.1)));
    out.extend(coef.iter().map(|k| T::from_f64(k.0)));
    out
}

fn slice<'a, T>(v: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    crate::models::cpu_buffers::contiguous(v, l, "batch norm", what)
}

fn per_channel<'a, T>(v: &'a [T], l: &Layout, d: Dims, what: &str) -> Result<&'a [T]> {
    let v = slice(v, l, what)?;
    if v.len() != d.c {
        bail!("batch norm: {} {what} values for {} channels", v.len(), d.c);
    }
    Ok(v)
}

/// The training-mode forward: (input, weight, bias) -> output. Its statistics are left in `stats`
/// for the caller's running averages and for the backward.
pub struct Train {
    pub eps: f64,
    pub relu: bool,
    pub stats: Arc<Mutex<Option<Stats>>>,
}

impl Train {
    fn run<T: Float>(&self, d: Dims, x: &[T], w: &[T], b: &[T]) -> Vec<T> {
        let (y, stats) = forward(d, x, w, b, self.eps, self.relu);
        *self.stats.lock().expect("batch norm statistics") = Some(stats);
        y
    }
}

impl CustomOp3 for Train {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of(lx.dims())?;
        let y = match (x, w, b) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => CpuStorage::F32(self.run(
                d,
                slice(x, lx, "input")?,
                per_channel(w, lw, d, "weight")?,
                per_channel(b, lb, d, "bias")?,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => CpuStorage::F64(self.run(
                d,
                slice(x, lx, "input")?,
                per_channel(w, lw, d, "weight")?,
                per_channel(b, lb, d, "bias")?,
            )),
            _ => bail!("batch norm: input, weight and bias must all be f32 or all f64"),
        };
        Ok((y, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self.stats.lock().expect("batch norm statistics").clone();
        let Some(stats) = stats else {
            bail!("batch norm: backward before its forward ran");
        };
        let grad = Grad {
            eps: self.eps,
            relu: self.relu,
            weight: w.to_dtype(candle_core::DType::F64)?.to_vec1()?,
            stats,
        };
        let all = x.apply_op3_no_bwd(&dy.contiguous()?, y, &grad)?;
        let (len, c) = (x.elem_count(), w.elem_count());
        let dx = all.narrow(0, 0, len)?.reshape(x.shape())?;
        // Copies, so that the small gradients do not keep the input gradient's buffer alive.
        let dw = all.narrow(0, len, c)?.copy()?.reshape(w.shape())?;
        let db = all.narrow(0, len + c, c)?.copy()?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// (input, output gradient, output) -> [input gradient, weight gradient, bias gradient], flat.
struct Grad {
    eps: f64,
    relu: bool,
    weight: Vec<f64>,
    stats: Stats,
}

impl Grad {
    fn run<T: Float>(&self, d: Dims, x: &[T], dy: &[T], y: &[T]) -> Result<Vec<T>> {
        if dy.len() != x.len() || y.len() != x.len() || self.weight.len() != d.c {
            bail!("batch norm backward: input, output gradient and output differ in size");
        }
        Ok(backward(d, x, dy, y, &self.weight, &self.stats, self.eps, self.relu))
    }
}

impl CustomOp3 for Grad {
    fn name(&self) -> &'static str {
        "batch-norm-train-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        dy: &CpuStorage,
        ldy: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of(lx.dims())?;
        let out = match (x, dy, y) {
            (CpuStorage::F32(x), CpuStorage::F32(dy), CpuStorage::F32(y)) => CpuStorage::F32(self.run(
                d,
                slice(x, lx, "input")?,
                slice(dy, ldy, "output gradient")?,
                slice(y, ly, "output")?,
            )?),
            (CpuStorage::F64(x), CpuStorage::F64(dy), CpuStorage::F64(y)) => CpuStorage::F64(self.run(
                d,
                slice(x, lx, "input")?,
                slice(dy, ldy, "output gradient")?,
                slice(y, ly, "output")?,
            )?),
            _ => bail!("batch norm backward: input, output gradient and output must share one float type"),
        };
        Ok((out, Shape::from(d.len() + 2 * d.c)))
    }
}
