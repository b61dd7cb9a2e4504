//! A 2-D convolution made for training: forward, input gradient and weight gradient each run
//! through a GEMM, on every device, with per-axis stride and padding (the AN4 model's (2, 1)
//! stride and (20, 5) padding included).
//!
//! candle 0.11's own `conv2d` backward computes the input gradient with a direct
//! `conv_transpose2d` (a naive loop on the CPU, a naive kernel on CUDA without cuDNN): most of a
//! ResNet-20 step. Here:
//! - CPU (`cpu`): im2col + `gemm` for the forward, `gemm` + col2im for the input gradient, im2col +
//!   `gemm` accumulated over the batch for the weight gradient; samples in parallel on the current
//!   rayon pool, im2col buffers reused across calls (`workspace`).
//! - Other devices (`library`): only calls that run as im2col + cuBLAS on CUDA: the forward is
//!   candle's `conv2d`, the input gradient a stride-1 `conv2d` of the zero-dilated, padded output
//!   gradient with the flipped, transposed kernel, the weight gradient a `conv2d` of the transposed
//!   tensors (as candle's backprop does).

mod cpu;
mod geometry;
mod im2col;
mod library;
mod workspace;

#[cfg(test)]
pub(in crate::models) mod tests;

/// The CPU passes on plain slices, for ops that fuse a convolution with what follows it.
pub(in crate::models) use cpu::{forward as cpu_forward, input_grad as cpu_input_grad, weight_grad as cpu_weight_grad};
pub use geometry::ConvParams;
pub(in crate::models) use geometry::Geometry;
pub(in crate::models) use workspace::Elem;

use candle_core::{Result, Tensor};

/// `x` [N, C, H, W] convolved with `w` [O, C, KH, KW] (cross-correlation, as PyTorch), no bias:
/// [N, O, OH, OW]. Gradients flow to both through the passes described above.
pub fn conv2d(x: &Tensor, w: &Tensor, p: ConvParams) -> Result<Tensor> {
    if x.device().is_cpu() {
        cpu::conv2d(x, w, p)
    } else {
        library::conv2d(x, w, p)
    }
}
