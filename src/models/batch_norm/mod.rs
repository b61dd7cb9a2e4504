//! PyTorch's BatchNorm (1d and 2d alike: the channel is dimension 1), optionally followed by a
//! ReLU in the same op. In training on the CPU it runs as one custom op each way (`cpu`); in
//! evaluation, and on other devices, through candle's `BatchNorm`.
//!
//! Parameters and buffers have PyTorch's names and initial values: weight 1, bias 0,
//! running_mean 0, running_var 1; eps 1e-5, momentum 0.1, and the running variance is updated
//! with the unbiased batch variance as PyTorch does. The running statistics are vars in the var
//! map (saved in checkpoints) but never parameters.

mod cpu;
#[cfg(test)]
mod tests;

use super::builder::{Builder, Init};
use candle_core::{DType, ModuleT, Result, Tensor, Var};
use std::sync::{Arc, Mutex};

pub use cpu::Stats;
pub(in crate::models) use cpu::{backward as cpu_backward, forward as cpu_forward, Dims, Float};

pub(in crate::models) const EPS: f64 = 1e-5;
const MOMENTUM: f64 = 0.1;

/// candle's BatchNorm holds the vars; it also runs evaluation and devices without the fused op.
pub struct BatchNorm {
    library: candle_nn::BatchNorm,
}

impl BatchNorm {
    pub fn new(b: &Builder, n: usize) -> Result<Self> {
        let weight = b.var("weight", n, Init::Const(1.0))?;
        let bias = b.var("bias", n, Init::Const(0.0))?;
        let mean = b.var("running_mean", n, Init::Const(0.0))?;
        let var = b.var("running_var", n, Init::Const(1.0))?;
        Ok(Self {
            library: candle_nn::BatchNorm::new(n, mean, var, weight, bias, EPS)?,
        })
    }

    /// Batch statistics in training (updating the running ones), running statistics otherwise.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.run(x, train, false)
    }

    /// `forward_t` then ReLU, fused where the op runs fused.
    pub fn forward_relu(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.run(x, train, true)
    }

    /// Whether training on `x` runs as a fused CPU op.
    pub(in crate::models) fn fuses(x: &Tensor, train: bool) -> bool {
        train && x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
    }

    /// The weight and bias, in `dtype`.
    pub(in crate::models) fn affine(&self, dtype: DType) -> Result<(Tensor, Tensor)> {
        let Some((weight, bias)) = self.library.weight_and_bias() else {
            candle_core::bail!("batch norm: built without weight and bias");
        };
        Ok((weight.to_dtype(dtype)?, bias.to_dtype(dtype)?))
    }

    fn run(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        if !Self::fuses(x, train) {
            let y = self.library.forward_t(x, train)?;
            return if relu { y.relu() } else { Ok(y) };
        }
        let stats = Arc::new(Mutex::new(None));
        let op = cpu::Train {
            eps: EPS,
            relu,
            stats: stats.clone(),
        };
        let (weight, bias) = self.affine(x.dtype())?;
        let y = x.contiguous()?.apply_op3(&weight, &bias, op)?;
        self.update_running(stats.lock().expect("batch norm statistics").as_ref())?;
        Ok(y)
    }

    /// running = (1 - momentum) running + momentum batch, with the batch variance unbiased; the
    /// statistics are those a fused forward left.
    pub(in crate::models) fn update_running(&self, s: Option<&Stats>) -> Result<()> {
        let Some(s) = s else {
            candle_core::bail!("batch norm: the forward left no statistics");
        };
        let m = s.count as f64;
        // The library's running statistics are vars: these share their storage.
        let blend = |running: &Tensor, batch: Vec<f64>| -> Result<()> {
            let var = Var::from_tensor(running)?;
            let old = var.as_tensor();
            let batch = Tensor::from_vec(batch, old.shape(), old.device())?.to_dtype(old.dtype())?;
            var.set(&((old * (1.0 - MOMENTUM))? + (batch * MOMENTUM)?)?)
        };
        blend(self.library.running_mean(), s.mean.clone())?;
        blend(
            self.library.running_var(),
            s.var.iter().map(|v| v * m / (m - 1.0)).collect(),
        )
    }
}
