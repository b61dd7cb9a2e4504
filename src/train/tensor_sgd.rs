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
    /// Tensors the last step made, each as long as the parameters (the device engine's ledger).
    pub allocs: u32,
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
            allocs: 0,
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
        // Every candle op below makes a new tensor of the parameters' length: counted.
        let mut made = 0u32;
        let mut op = |t: candle_core::Result<Tensor>| {
            made += 1;
            t
        };
        let scale = |t: &Tensor, s: f32| t.affine(s as f64, 0.0);
        let wd = op(scale(params, self.weight_decay))?;
        let d = op(grad + wd)?;
        let step = if self.momentum == 0.0 {
            d
        } else {
            let m = self.momentum;
            let b = match &self.buf {
                None => op(d.copy())?,
                Some(b) => {
                    let (mb, md) = (op(scale(b, m))?, op(scale(&d, 1.0 - self.dampening))?);
                    op(mb + md)?
                }
            };
            let step = if self.nesterov {
                let mb = op(scale(&b, m))?;
                op(&d + mb)?
            } else {
                b.clone()
            };
            self.buf = Some(b);
            step
        };
        let lr_step = op(scale(&step, lr))?;
        let out = op(params - lr_step)?;
        self.allocs = made;
        Ok(out)
    }
}

/// Whether every value is finite, and how many tensors of `t`'s length it made to find out.
///
/// A sum with a NaN or an infinity among its terms is not finite (NaN stays NaN; infinities stay
/// or meet their opposite and make NaN), so a finite sum proves every value finite: one reduction,
/// no temporary of `t`'s length, one scalar back to the host. Only a non-finite sum, which finite
/// values can also give by overflowing, needs the exact test: `x - x` is 0 for finite x and NaN
/// otherwise (one temporary, a second reduction).
pub fn all_finite(t: &Tensor) -> Result<(bool, u32)> {
    if t.sum_all()?.to_scalar::<f32>()?.is_finite() {
        return Ok((true, 0));
    }
    Ok((t.sub(t)?.sum_all()?.to_scalar::<f32>()? == 0.0, 1))
}

/// `update` scaled to L2 norm `clip` when it is longer (0 = no clipping), as the host path does;
/// and whether it was scaled.
pub fn clip_norm(update: Tensor, clip: f32) -> Result<(Tensor, bool)> {
    if clip <= 0.0 {
        return Ok((update, false));
    }
    let norm = update.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    if norm > clip {
        let scale = clip / (norm + 1e-6);
        return Ok((update.affine(scale as f64, 0.0)?, true));
    }
    Ok((update, false))
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
        assert_eq!(all_finite(&t(&[1.0, -3.4e38, 0.0, -0.0, 1e-45])).unwrap(), (true, 0));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert_eq!(all_finite(&t(&[1.0, bad, 2.0])).unwrap(), (false, 1), "{bad}");
        }
        // Finite values whose sum overflows are still finite (the exact test decides).
        assert_eq!(all_finite(&t(&[3.0e38, 3.0e38, 1.0])).unwrap(), (true, 1));
        assert_eq!(all_finite(&t(&[f32::INFINITY, f32::NEG_INFINITY])).unwrap(), (false, 1));
    }

    #[test]
    fn clipping_matches_the_host_rule() {
        let u = Tensor::from_slice(&[3.0f32, 4.0], 2, &Device::Cpu).unwrap();
        let same = clip_norm(u.clone(), 0.0).unwrap();
        assert_eq!((same.0.to_vec1::<f32>().unwrap(), same.1), (vec![3.0, 4.0], false));
        let long_enough = clip_norm(u.clone(), 10.0).unwrap();
        assert_eq!(
            (long_enough.0.to_vec1::<f32>().unwrap(), long_enough.1),
            (vec![3.0, 4.0], false)
        );
        let (c, clipped) = clip_norm(u, 1.0).unwrap();
        assert!(clipped);
        let c = c.to_vec1::<f32>().unwrap();
        let scale = 1.0 / (5.0 + 1e-6);
        assert_eq!(c, [3.0 * scale, 4.0 * scale]);
    }
}
