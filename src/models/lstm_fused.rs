//! An LSTM layer's time loop as one CPU custom op each way (f32).
//!
//! Composed of candle ops, a time step is a dozen small ops forward and more backward, and reading
//! step t out of the input projection (`xw.get(t)`) costs, in the backward, a zero tensor the size
//! of the whole projection (candle pads a narrow's gradient to its input's shape): O(T^2) values
//! per layer, most of a PTB step. Here the forward runs the T steps over plain slices and keeps
//! the gate activations and the cells; the backward goes back through time once, one GEMM a step
//! for the recurrent gradient and one GEMM for the whole recurrent weight's gradient.
//!
//! The forward's arithmetic is candle's (sigmoid as 1 / (1 + exp(-x)), `f32::tanh`,
//! c = f c + i g, h = o tanh(c)); the backward sums in another order than candle's autograd, so
//! gradients agree to rounding (tested against the composed layer and PyTorch).

use super::matrix::{gemm_into, pool_parallelism, Mat};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use std::sync::{Arc, Mutex};

/// The layer over all T steps: `xw` [T, B, 4H] (the input projection with both biases, gates in
/// PyTorch's order i, f, g, o), `w_hh` [4H, H], the initial state `h0`, `c0` [B, H]. Returns the
/// outputs [T, B, H] and the final (h, c), or `None` where the op does not apply (off the CPU, not
/// f32, no time step) and the caller composes the layer from candle ops.
pub fn layer(xw: &Tensor, w_hh: &Tensor, h0: &Tensor, c0: &Tensor) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let all = [xw, w_hh, h0, c0];
    if all.iter().any(|t| !t.device().is_cpu() || t.dtype() != DType::F32) || xw.dim(0)? == 0 {
        return Ok(None);
    }
    let t_len = xw.dim(0)?;
    let s0 = Tensor::stack(&[h0, c0], 0)?.contiguous()?;
    let op = Layer {
        saved: Arc::new(Mutex::new(None)),
    };
    let out = xw.contiguous()?.apply_op3(&w_hh.contiguous()?, &s0, op)?;
    Ok(Some((out.narrow(0, 0, t_len)?, out.get(t_len - 1)?, out.get(t_len)?)))
}

/// (xw, w_hh, [h0; c0]) -> [h_1 .. h_T; c_T], [T + 1, B, H].
struct Layer {
    saved: Arc<Mutex<Option<Saved>>>,
}

/// What the backward needs beyond the op's inputs and output.
struct Saved {
    /// The gate activations i, f, g, o of every step, [T, B, 4H].
    acts: Vec<f32>,
    /// The cells c_1 .. c_T, [T, B, H].
    cells: Vec<f32>,
}

#[derive(Clone, Copy)]
struct Dims {
    t: usize,
    b: usize,
    h: usize,
}

impl Dims {
    fn of(xw: &[usize], w: &[usize], s0: &[usize]) -> Result<Self> {
        let (&[t, b, g4], &[wr, h], &[two, sb, sh]) = (xw, w, s0) else {
            bail!(
                "lstm layer: projection {xw:?}, recurrent weight {w:?}, state {s0:?}: expected 3, 2 and 3 dimensions"
            );
        };
        if g4 != 4 * h || wr != 4 * h || two != 2 || sb != b || sh != h {
            bail!("lstm layer: projection {xw:?}, recurrent weight {w:?} and state {s0:?} do not fit one hidden size");
        }
        Ok(Self { t, b, h })
    }

    /// Values of one step's state, B * H.
    fn state(&self) -> usize {
        self.b * self.h
    }
}

fn values<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => crate::models::cpu_buffers::contiguous(v, l, "lstm layer", what),
        _ => bail!("lstm layer: the {what} is {:?}, expected f32", s.dtype()),
    }
}

/// A CPU tensor's storage, or an error naming `what`.
fn cpu<'a>(s: &'a Storage, what: &str) -> Result<&'a CpuStorage> {
    crate::models::cpu_buffers::cpu_storage(s, "lstm layer backward", what)
}

/// candle-nn's sigmoid, to the bit.
fn sigmoid(v: f32) -> f32 {
    ((-v).exp() + 1.0).recip()
}

/// The forward: the output [T + 1, B, H] and what the backward keeps.
fn forward(d: Dims, xw: &[f32], w: &[f32], s0: &[f32]) -> (Vec<f32>, Saved) {
    let (n, h) = (d.state(), d.h);
    let mut out = vec![0.0f32; (d.t + 1) * n];
    let mut acts = vec![0.0f32; d.t * 4 * n];
    let mut cells = vec![0.0f32; d.t * n];
    let mut z = vec![0.0f32; 4 * n];
    let (h0, c0) = s0.split_at(n);
    for t in 0..d.t {
        let (done, rest) = out.split_at_mut(t * n);
        let h_prev = if t == 0 { h0 } else { &done[(t - 1) * n..] };
        // z = h_{t-1} W_hh^T, [B, 4H].
        gemm_into(
            (d.b, 4 * h, h),
            &mut z,
            false,
            Mat::rows(h_prev, h),
            Mat::transposed(w, h),
            pool_parallelism(),
        );
        let (c_done, c_rest) = cells.split_at_mut(t * n);
        let c_prev = if t == 0 { c0 } else { &c_done[(t - 1) * n..] };
        let (h_t, c_t) = (&mut rest[..n], &mut c_rest[..n]);
        let a_t = &mut acts[t * 4 * n..(t + 1) * 4 * n];
        let x_t = &xw[t * 4 * n..(t + 1) * 4 * n];
        for b in 0..d.b {
            let row = b * 4 * h;
            for j in 0..h {
                let pre = |k: usize| x_t[row + k * h + j] + z[row + k * h + j];
                let (i, f, g, o) = (sigmoid(pre(0)), sigmoid(pre(1)), pre(2).tanh(), sigmoid(pre(3)));
                let c = f * c_prev[b * h + j] + i * g;
                c_t[b * h + j] = c;
                h_t[b * h + j] = o * c.tanh();
                for (k, v) in [i, f, g, o].into_iter().enumerate() {
                    a_t[row + k * h + j] = v;
                }
            }
        }
    }
    out[d.t * n..].copy_from_slice(&cells[(d.t - 1) * n..]);
    (out, Saved { acts, cells })
}

/// The gradients of (xw, w_hh, s0) from `dout`, the gradient of the output [T + 1, B, H].
fn backward(
    d: Dims,
    w: &[f32],
    s0: &[f32],
    out: &[f32],
    saved: &Saved,
    dout: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (n, h) = (d.state(), d.h);
    let (h0, c0) = s0.split_at(n);
    let mut dz = vec![0.0f32; d.t * 4 * n];
    let mut dh_next = vec![0.0f32; n];
    let mut dc_next = dout[d.t * n..].to_vec();
    for t in (0..d.t).rev() {
        let a_t = &saved.acts[t * 4 * n..(t + 1) * 4 * n];
        let c_t = &saved.cells[t * n..(t + 1) * n];
        let c_prev = if t == 0 { c0 } else { &saved.cells[(t - 1) * n..t * n] };
        let dh_out = &dout[t * n..(t + 1) * n];
        let dz_t = &mut dz[t * 4 * n..(t + 1) * 4 * n];
        for b in 0..d.b {
            let row = b * 4 * h;
            for j in 0..h {
                let s = b * h + j;
                let act = |k: usize| a_t[row + k * h + j];
                let (i, f, g, o) = (act(0), act(1), act(2), act(3));
                let dh = dh_out[s] + dh_next[s];
                let tc = c_t[s].tanh();
                let dc = dc_next[s] + dh * o * (1.0 - tc * tc);
                let grads = [
                    dc * g * i * (1.0 - i),
                    dc * c_prev[s] * f * (1.0 - f),
                    dc * i * (1.0 - g * g),
                    dh * tc * o * (1.0 - o),
                ];
                for (k, v) in grads.into_iter().enumerate() {
                    dz_t[row + k * h + j] = v;
                }
                dc_next[s] = dc * f;
            }
        }
        // dh_{t-1} = dz_t W_hh, [B, H].
        gemm_into(
            (d.b, h, 4 * h),
            &mut dh_next,
            false,
            Mat::rows(dz_t, 4 * h),
            Mat::rows(w, h),
            pool_parallelism(),
        );
    }
    // dW_hh = sum over t of dz_t^T h_{t-1}: h_0 from the state, h_1 .. h_{T-1} from the output.
    let mut dw = vec![0.0f32; 4 * h * h];
    let par = pool_parallelism();
    gemm_into(
        (4 * h, h, d.b),
        &mut dw,
        false,
        Mat::transposed(&dz[..4 * n], 4 * h),
        Mat::rows(h0, h),
        par,
    );
    let rows = (d.t - 1) * d.b;
    let later = Mat::transposed(&dz[4 * n..], 4 * h);
    gemm_into(
        (4 * h, h, rows),
        &mut dw,
        true,
        later,
        Mat::rows(&out[..(d.t - 1) * n], h),
        par,
    );
    let mut ds0 = dh_next;
    ds0.extend_from_slice(&dc_next);
    (dz, dw, ds0)
}

impl CustomOp3 for Layer {
    fn name(&self) -> &'static str {
        "lstm-layer"
    }

    fn cpu_fwd(
        &self,
        xw: &CpuStorage,
        lxw: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        s0: &CpuStorage,
        ls0: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of(lxw.dims(), lw.dims(), ls0.dims())?;
        let (xw, w, s0) = (
            values(xw, lxw, "input projection")?,
            values(w, lw, "recurrent weight")?,
            values(s0, ls0, "initial state")?,
        );
        let (out, saved) = forward(d, xw, w, s0);
        *self.saved.lock().expect("lstm layer state") = Some(saved);
        Ok((CpuStorage::F32(out), (d.t + 1, d.b, d.h).into()))
    }

    fn bwd(
        &self,
        xw: &Tensor,
        w: &Tensor,
        s0: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().expect("lstm layer state");
        let Some(saved) = saved.as_ref() else {
            bail!("lstm layer: backward before its forward ran");
        };
        let d = Dims::of(xw.dims(), w.dims(), s0.dims())?;
        let dout = dout.contiguous()?;
        let (ws, lw) = w.storage_and_layout();
        let (ss, ls) = s0.storage_and_layout();
        let (os, lo) = out.storage_and_layout();
        let (ds, ld) = dout.storage_and_layout();
        let (dxw, dw, ds0) = backward(
            d,
            values(cpu(&ws, "recurrent weight")?, lw, "recurrent weight")?,
            values(cpu(&ss, "initial state")?, ls, "initial state")?,
            values(cpu(&os, "output")?, lo, "output")?,
            saved,
            values(cpu(&ds, "output gradient")?, ld, "output gradient")?,
        );
        let cpu = &candle_core::Device::Cpu;
        Ok((
            Some(Tensor::from_vec(dxw, xw.shape(), cpu)?),
            Some(Tensor::from_vec(dw, w.shape(), cpu)?),
            Some(Tensor::from_vec(ds0, s0.shape(), cpu)?),
        ))
    }
}
