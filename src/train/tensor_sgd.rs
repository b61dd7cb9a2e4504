//! `optim::Sgd` over candle tensors, for parameters that stay on the GPU. The same operations in
//! the same order, each its own elementwise op (no fused multiply-add across them), so on the CPU
//! it matches `Sgd` bit for bit; the tests hold it to that.

use super::optim::Sgd;
use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};

pub struct TensorSgd {
    pub momentum: f32,
    pub dampening: f32,
    pub nesterov: bool,
    pub weight_decay: f32,
    /// The momentum buffer; None until the first step (PyTorch clones the first gradient).
    pub buf: Option<Tensor>,
}

impl TensorSgd {
    /// The hyper-parameters of `sgd` (its buffer is not taken).
    pub fn like(sgd: &Sgd) -> Self {
        Self {
            momentum: sgd.momentum,
            dampening: sgd.dampening,
            nesterov: sgd.nesterov,
            weight_decay: sgd.weight_decay,
            buf: None,
        }
    }

    /// The parameters after one step with `grad` (same shape and device).
    pub fn step(&mut self, params: &Tensor, grad: &Tensor, lr: f32) -> Result<Tensor> {
        ensure!(
            params.shape() == grad.shape() && params.dtype() == DType::F32,
            "optimizer: parameters {:?} {:?}, update {:?}",
            params.shape(),
            params.dtype(),
            grad.shape()
        );
        let scale = |t: &Tensor, s: f32| t.affine(s as f64, 0.0);
        let d = (grad + scale(params, self.weight_decay)?)?;
        let step = if self.momentum == 0.0 {
            d
        } else {
            let m = self.momentum;
            let b = match &self.buf {
                None => d.copy()?,
                Some(b) => (scale(b, m)? + scale(&d, 1.0 - self.dampening)?)?,
            };
            let step = if self.nesterov {
                (&d + scale(&b, m)?)?
            } else {
                b.clone()
            };
            self.buf = Some(b);
            step
        };
        Ok((params - scale(&step, lr)?)?)
    }
}

/// Whether every value is finite: x - x is 0 for finite x and NaN otherwise, and one NaN makes
/// the sum NaN. One reduction and one scalar back to the host.
pub fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(t.sub(t)?.sum_all()?.to_scalar::<f32>()? == 0.0)
}

/// `update` scaled to L2 norm `clip` when it is longer (0 = no clipping), as the host path does.
pub fn clip_norm(update: Tensor, clip: f32) -> Result<Tensor> {
    if clip <= 0.0 {
        return Ok(update);
    }
    let norm = update.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    if norm > clip {
        let scale = clip / (norm + 1e-6);
        return Ok(update.affine(scale as f64, 0.0)?);
    }
    Ok(update)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::Device;

    fn normal(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.normal()).collect()
    }

    /// Every combination of the options, several steps, against the host optimizer bit for bit.
    #[test]
    fn matches_the_host_optimizer_bit_for_bit() {
        let mut rng = Rng::derive(7, "tensor-sgd", 0);
        for (m, damp, nesterov, wd) in [
            (0.0, 0.0, false, 0.0),
            (0.0, 0.0, false, 1e-4),
            (0.9, 0.0, false, 1e-4),
            (0.9, 0.0, true, 5e-4),
            (0.5, 0.3, false, 0.0),
        ] {
            let mut host = Sgd::new(m, damp, nesterov, wd);
            let mut dev = TensorSgd::like(&host);
            let mut p = normal(&mut rng, 37);
            let mut pt = Tensor::from_slice(&p, 37, &Device::Cpu).unwrap();
            for step in 0..4 {
                let g = normal(&mut rng, 37);
                let lr = 0.1 / (step + 1) as f32;
                host.step(&mut p, &g, lr);
                let gt = Tensor::from_slice(&g, 37, &Device::Cpu).unwrap();
                pt = dev.step(&pt, &gt, lr).unwrap();
                let got = pt.to_vec1::<f32>().unwrap();
                let same = got
                    .iter()
                    .zip(&p)
                    .all(|(a, b)| a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0));
                assert!(
                    same,
                    "m {m} damp {damp} nesterov {nesterov} wd {wd} step {step}: {got:?} vs {p:?}"
                );
            }
            assert_eq!(dev.buf.is_some(), host.buf.is_some());
            if let (Some(a), Some(b)) = (&dev.buf, &host.buf) {
                assert_eq!(&a.to_vec1::<f32>().unwrap(), b);
            }
        }
    }

    #[test]
    fn finiteness_sees_nan_and_both_infinities() {
        let t = |v: &[f32]| Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap();
        assert!(all_finite(&t(&[1.0, -3.4e38, 0.0, -0.0, 1e-45])).unwrap());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert!(!all_finite(&t(&[1.0, bad, 2.0])).unwrap(), "{bad}");
        }
    }

    #[test]
    fn clipping_matches_the_host_rule() {
        let u = Tensor::from_slice(&[3.0f32, 4.0], 2, &Device::Cpu).unwrap();
        let same = clip_norm(u.clone(), 0.0).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(same, [3.0, 4.0]);
        assert_eq!(
            clip_norm(u.clone(), 10.0).unwrap().to_vec1::<f32>().unwrap(),
            [3.0, 4.0]
        );
        let c = clip_norm(u, 1.0).unwrap().to_vec1::<f32>().unwrap();
        let scale = 1.0 / (5.0 + 1e-6);
        assert_eq!(c, [3.0 * scale, 4.0 * scale]);
    }
}
