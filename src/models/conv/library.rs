//! The convolution out of candle's own `conv2d` calls only (im2col + cuBLAS on CUDA), for devices
//! other than the CPU. candle's backward of `conv2d` would run `conv_transpose2d` for the input
//! gradient (a naive kernel without cuDNN), so the forward is computed detached and handed to a
//! custom op (`Attach`) whose backward is two more `conv2d` calls:
//! - input gradient: a stride-1 `conv2d` of the output gradient, dilated by the stride (zeros
//!   between its values) and padded by the kernel size minus one (plus the rows and columns the
//!   forward's stride left unread), with the kernel flipped in both spatial axes and its in/out
//!   channels swapped;
//! - weight gradient: `conv2d` of the input with channels and batch swapped, the output gradient
//!   (likewise swapped) as the kernel, dilation = stride (what candle's backprop does).
//!
//! candle's `conv2d` takes one stride and one padding for both axes: other paddings (and one as
//! large as the kernel) are made with explicit zeros, and a stride that differs between the axes runs at stride 1 and keeps every
//! stride-th output row or column (AN4's (2, 1) convolution pays twice its work here).

use super::geometry::{ConvParams, Geometry};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

pub fn conv2d(x: &Tensor, w: &Tensor, p: ConvParams) -> Result<Tensor> {
    let g = Geometry::new(x.dims(), w.dims(), p)?;
    let ((sh, sw), (ph, pw)) = (p.stride, p.padding);
    let (xp, padding) = if ph == pw && ph < g.kh.min(g.kw) {
        (x.clone(), ph)
    } else {
        (x.pad_with_zeros(2, ph, ph)?.pad_with_zeros(3, pw, pw)?, 0)
    };
    let stride = if sh == sw { sh } else { 1 };
    let y = xp.detach().conv2d(&w.detach(), padding, stride, 1, 1)?.contiguous()?;
    let y = xp.apply_op3(w, &y, Attach { stride, padding })?;
    if stride == sh && stride == sw {
        Ok(y)
    } else {
        subsample(&y, sh, sw)
    }
}

/// Input gradient of a convolution with stride `s` and padding `p < kernel size` on both axes, by a
/// stride-1 `conv2d`.
pub fn input_grad(dy: &Tensor, w: &Tensor, s: usize, p: usize, input_hw: (usize, usize)) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    let (_, _, oh, ow) = dy.dims4()?;
    let d = dilate(&dilate(dy, 2, s)?, 3, s)?;
    // Rows the forward never read (the remainder of the stride) get gradient zero: pad them too.
    let rh = input_hw.0 + 2 * p - ((oh - 1) * s + kh);
    let rw = input_hw.1 + 2 * p - ((ow - 1) * s + kw);
    let d = d
        .pad_with_zeros(2, kh - 1 - p, kh - 1 - p + rh)?
        .pad_with_zeros(3, kw - 1 - p, kw - 1 - p + rw)?;
    let flipped = flip(&flip(w, 2)?, 3)?.transpose(0, 1)?.contiguous()?;
    d.conv2d(&flipped, 0, 1, 1, 1)
}

/// Weight gradient of a convolution with stride `s` and padding `p` on both axes.
pub fn weight_grad(x: &Tensor, dy: &Tensor, s: usize, p: usize, kernel_hw: (usize, usize)) -> Result<Tensor> {
    let g = x
        .transpose(0, 1)?
        .contiguous()?
        .conv2d(&dy.transpose(0, 1)?.contiguous()?, p, 1, s, 1)?
        .transpose(0, 1)?;
    // The last rows/columns of the input that no output reads make the result too large by them.
    g.narrow(2, 0, kernel_hw.0)?.narrow(3, 0, kernel_hw.1)?.contiguous()
}

/// Zeros between the values of `x` along `dim`: `s - 1` after every value but the last.
fn dilate(x: &Tensor, dim: usize, s: usize) -> Result<Tensor> {
    if s == 1 {
        return Ok(x.clone());
    }
    let len = x.dim(dim)?;
    let mut dims = x.dims().to_vec();
    dims[dim] = len * s;
    x.unsqueeze(dim + 1)?
        .pad_with_zeros(dim + 1, 0, s - 1)?
        .reshape(dims)?
        .narrow(dim, 0, (len - 1) * s + 1)
}

fn flip(x: &Tensor, dim: usize) -> Result<Tensor> {
    let n = x.dim(dim)?;
    let rev: Vec<u32> = (0..n as u32).rev().collect();
    x.index_select(&Tensor::from_vec(rev, n, x.device())?, dim)
}

/// x[:, :, ::sh, ::sw].
fn subsample(x: &Tensor, sh: usize, sw: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (h2, w2) = (h.div_ceil(sh), w.div_ceil(sw));
    let x = x.pad_with_zeros(2, 0, h2 * sh - h)?.pad_with_zeros(3, 0, w2 * sw - w)?;
    x.reshape((n, c, h2, sh, w2, sw))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((n, c, h2, w2))
}

/// (input, kernel, the detached forward's output) -> that output, with the backward above.
struct Attach {
    stride: usize,
    padding: usize,
}

/// A copy of the whole storage keeps its layout only when that starts at 0 and is contiguous
/// (`conv2d` makes sure: the forward's output is fresh and made contiguous).
fn same<S: BackendStorage>(y: &S, l: &Layout) -> Result<(S, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("conv2d-library: the forward's output must be contiguous from offset 0");
    }
    Ok((y.try_clone(l)?, l.shape().clone()))
}

impl CustomOp3 for Attach {
    fn name(&self) -> &'static str {
        "conv2d-library"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same(y, ly)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        y: &candle_core::CudaStorage,
        ly: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        same(y, ly)
    }

    fn bwd(
        &self,
        xp: &Tensor,
        w: &Tensor,
        _: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, _, h, wd) = xp.dims4()?;
        let (_, _, kh, kw) = w.dims4()?;
        let (s, p) = (self.stride, self.padding);
        let dx = input_grad(dy, w, s, p, (h, wd))?;
        let dw = weight_grad(xp, dy, s, p, (kh, kw))?;
        Ok((Some(dx), Some(dw), None))
    }
}
