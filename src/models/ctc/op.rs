//! The CTC loss as a candle op: forward computes the reduced loss of time-major log-probabilities
//! [T, N, C] on the host and keeps the gradient; backward hands it to autograd. Feed it
//! `log_softmax(logits)`: autograd through log_softmax then yields warp-ctc's softmax - posterior.

use super::loss::{ctc_loss, CtcOptions, CtcReduction};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use std::sync::Mutex;

pub struct CtcLoss {
    pub input_lengths: Vec<usize>,
    pub targets: Vec<u32>,
    pub target_lengths: Vec<usize>,
    pub opts: CtcOptions,
    pub reduction: CtcReduction,
    grad: Mutex<Option<Vec<f32>>>,
}

impl CtcLoss {
    pub fn new(
        input_lengths: Vec<usize>,
        targets: Vec<u32>,
        target_lengths: Vec<usize>,
        opts: CtcOptions,
        reduction: CtcReduction,
    ) -> Self {
        Self {
            input_lengths,
            targets,
            target_lengths,
            opts,
            reduction,
            grad: Mutex::new(None),
        }
    }

    /// The reduced loss (a scalar tensor) of `log_probs` [T, N, C].
    pub fn apply(self, log_probs: &Tensor) -> candle_core::Result<Tensor> {
        log_probs.contiguous()?.apply_op1(self)
    }
}

impl CustomOp1 for CtcLoss {
    fn name(&self) -> &'static str {
        "ctc-loss"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, n, c) = layout.shape().dims3()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("ctc-loss needs a contiguous input");
        };
        let x = &storage.as_slice::<f32>()?[start..end];
        let out = ctc_loss(
            x,
            t,
            n,
            c,
            &self.input_lengths,
            &self.targets,
            &self.target_lengths,
            self.opts,
        )
        .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        let scale = self.reduction.grad_scale(n) as f32;
        let grad = out.grad.iter().map(|g| g * scale).collect();
        *self.grad.lock().expect("ctc grad lock") = Some(grad);
        let loss = self.reduction.loss(&out.losses) as f32;
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = self.grad.lock().expect("ctc grad lock").clone();
        let Some(grad) = grad else {
            candle_core::bail!("ctc-loss backward before forward");
        };
        let g = Tensor::from_vec(grad, arg.shape(), arg.device())?;
        Ok(Some(g.broadcast_mul(grad_res)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Autograd through log_softmax and the op equals the op's own logits gradient, and the loss
    /// equals the plain function's.
    #[test]
    fn autograd_matches_the_plain_function() {
        let (t, n, c) = (7, 2, 5);
        let logits: Vec<f32> = (0..t * n * c).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
        let v = Var::from_vec(logits.clone(), (t, n, c), &Device::Cpu).unwrap();
        let lp = candle_nn::ops::log_softmax(v.as_tensor(), 2).unwrap();
        let op = CtcLoss::new(
            vec![7, 5],
            vec![1, 2, 2, 3],
            vec![3, 1],
            CtcOptions::default(),
            CtcReduction::SumOverBatch,
        );
        let loss = op.apply(&lp).unwrap();
        let grads = loss.backward().unwrap();
        let g = grads
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();

        let lp_host = super::super::log_softmax(&logits, c);
        let plain = ctc_loss(
            &lp_host,
            t,
            n,
            c,
            &[7, 5],
            &[1, 2, 2, 3],
            &[3, 1],
            CtcOptions::default(),
        )
        .unwrap();
        let want_loss = CtcReduction::SumOverBatch.loss(&plain.losses) as f32;
        assert!((loss.to_scalar::<f32>().unwrap() - want_loss).abs() < 1e-4);
        let scaled: Vec<f32> = plain.grad.iter().map(|x| x / n as f32).collect();
        let want = super::super::ctc_grad_wrt_logits(&lp_host, &scaled, c).unwrap();
        for (a, b) in g.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn impossible_alignment_is_an_error_not_nan() {
        let lp = Tensor::zeros((2, 1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let op = CtcLoss::new(
            vec![2],
            vec![1, 1, 1],
            vec![3],
            CtcOptions::default(),
            CtcReduction::Sum,
        );
        let e = op.apply(&lp).unwrap_err().to_string();
        assert!(e.contains("utterance 0"), "{e}");
    }
}
