//! Mean cross-entropy of logits [n, classes] against class labels [n], as one CPU op each way.
//!
//! candle_nn's is a log-softmax and a gather: about ten logits-sized passes each way, and in the
//! backward every one of them also gets a fresh zero tensor to add its gradient into, on one
//! thread. For the language model's logits (700 rows of the vocabulary a step) that was about a
//! tenth of the step. Here the forward is one pass over each row (its log-sum-exp kept for the
//! backward) and the backward one: dlogits = (softmax - onehot(label)) * dloss / n. Sums are in
//! f64, per row in a fixed order, so the loss does not depend on the thread count.

use super::cpu_buffers::{contiguous, filled};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

const OP: &str = "cross-entropy";

/// The mean over rows of -log softmax(logits)[label]: fused on the CPU for f32 and f64 logits,
/// candle_nn's composition elsewhere.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let fused = logits.device().is_cpu()
        && labels.device().is_cpu()
        && matches!(logits.dtype(), DType::F32 | DType::F64)
        && matches!(labels.dtype(), DType::U8 | DType::U32 | DType::I64);
    if !fused {
        return candle_nn::loss::cross_entropy(logits, labels);
    }
    let (rows, classes) = match *logits.dims() {
        [r, c] => (r, c),
        ref d => bail!("{OP}: logits of shape {d:?}, expected [rows, classes]"),
    };
    if labels.dims() != [rows] {
        bail!("{OP}: labels of shape {:?} for {rows} rows of logits", labels.dims());
    }
    if rows == 0 || classes == 0 {
        bail!("{OP}: empty logits {:?}", logits.dims());
    }
    let labels: Vec<i64> = match labels.dtype() {
        DType::I64 => labels.to_vec1::<i64>()?,
        _ => labels
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?
            .into_iter()
            .map(i64::from)
            .collect(),
    };
    if let Some((row, label)) = labels.iter().enumerate().find(|(_, &l)| l < 0 || l >= classes as i64) {
        bail!("{OP}: label {label} of row {row} is out of range for {classes} classes");
    }
    let op = Fused {
        classes,
        labels: labels.into_iter().map(|l| l as usize).collect(),
        lse: Mutex::new(Vec::new()),
    };
    // The labels are not a tensor operand: they get no gradient, and the op reads them as indices.
    logits.contiguous()?.apply_op1(op)
}

struct Fused {
    classes: usize,
    labels: Vec<usize>,
    /// Each row's log-sum-exp, left by the forward for the backward.
    lse: Mutex<Vec<f64>>,
}

/// The logits' element type: exponentials in its own precision (f32's is several times faster
/// than f64's), sums in f64.
trait Logit: Copy + Default + Send + Sync + std::ops::Mul<Output = Self> {
    fn wide(self) -> f64;
    fn narrow(v: f64) -> Self;
    fn exp_minus(self, m: f64) -> Self;
}

macro_rules! logit {
    ($t:ty) => {
        impl Logit for $t {
            fn wide(self) -> f64 {
                self as f64
            }
            fn narrow(v: f64) -> Self {
                v as $t
            }
            fn exp_minus(self, m: f64) -> Self {
                (self - m as $t).exp()
            }
        }
    };
}
logit!(f32);
logit!(f64);

/// Per row: log sum exp(x); and the mean over rows of log sum exp(x) - x[label].
fn rows_forward<T: Logit>(x: &[T], classes: usize, labels: &[usize]) -> (Vec<f64>, f64) {
    let lse: Vec<f64> = x
        .par_chunks(classes)
        .map(|row| {
            let m = row.iter().map(|&v| v.wide()).fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = row.iter().map(|&v| v.exp_minus(m).wide()).sum();
            m + s.ln()
        })
        .collect();
    let total: f64 = lse
        .iter()
        .zip(labels)
        .enumerate()
        .map(|(i, (&l, &y))| l - x[i * classes + y].wide())
        .sum();
    (lse, total / labels.len() as f64)
}

impl CustomOp1 for Fused {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (lse, loss) = match s {
            CpuStorage::F32(v) => rows_forward(contiguous(v, l, OP, "logits")?, self.classes, &self.labels),
            CpuStorage::F64(v) => rows_forward(contiguous(v, l, OP, "logits")?, self.classes, &self.labels),
            _ => bail!("{OP}: {:?} logits, expected f32 or f64", s.dtype()),
        };
        *self.lse.lock().expect("cross-entropy state") = lse;
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(vec![loss as f32]),
            _ => CpuStorage::F64(vec![loss]),
        };
        Ok((out, Shape::from(())))
    }

    fn bwd(&self, logits: &Tensor, _loss: &Tensor, dloss: &Tensor) -> Result<Option<Tensor>> {
        let g = dloss.to_dtype(DType::F64)?.to_scalar::<f64>()? / self.labels.len() as f64;
        let lse = self.lse.lock().expect("cross-entropy state");
        if lse.len() != self.labels.len() {
            bail!("{OP}: backward before its forward ran");
        }
        let (s, l) = logits.storage_and_layout();
        let cpu = super::cpu_buffers::cpu_storage(&s, OP, "logits")?;
        let d = match cpu {
            CpuStorage::F32(v) => self.gradient(contiguous(v, l, OP, "logits")?, &lse, g, logits),
            CpuStorage::F64(v) => self.gradient(contiguous(v, l, OP, "logits")?, &lse, g, logits),
            _ => bail!("{OP} backward: {:?} logits", cpu.dtype()),
        };
        Ok(Some(d?))
    }
}

impl Fused {
    /// dlogits = g (softmax(x) - onehot(label)) as a tensor shaped like `logits`.
    fn gradient<T: Logit + candle_core::WithDType>(
        &self,
        x: &[T],
        lse: &[f64],
        g: f64,
        logits: &Tensor,
    ) -> Result<Tensor> {
        Tensor::from_vec(self.rows_backward(x, lse, g), logits.shape(), logits.device())
    }

    /// dlogits = g (softmax(x) - onehot(label)), row by row.
    fn rows_backward<T: Logit>(&self, x: &[T], lse: &[f64], g: f64) -> Vec<T> {
        let c = self.classes;
        let gt = T::narrow(g);
        filled(x.len(), 0, c, |i, out| {
            let row = &x[i * c..(i + 1) * c];
            for (o, &v) in out.iter_mut().zip(row) {
                *o = gt * v.exp_minus(lse[i]);
            }
            let y = self.labels[i];
            out[y] = T::narrow(g * (row[y].exp_minus(lse[i]).wide() - 1.0));
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::conv::tests::flat;
    use crate::rng::Rng;
    use candle_core::{Device, Var};

    /// Loss and logits gradient against candle_nn's log-softmax + gather, on random logits with a
    /// wide range (so that the max shift matters), f32 and f64, one row, one class, labels at both
    /// ends, and u32 and i64 labels.
    #[test]
    fn matches_candle_nn() {
        let mut rng = Rng::new(9);
        for (rows, classes) in [(1, 1), (1, 7), (5, 3), (37, 10), (64, 1000)] {
            for dtype in [DType::F32, DType::F64] {
                let v: Vec<f32> = (0..rows * classes).map(|_| rng.normal() * 8.0).collect();
                let x = Tensor::from_vec(v, (rows, classes), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let mut labels: Vec<u32> = (0..rows).map(|_| rng.below(classes as u64) as u32).collect();
                labels[0] = classes as u32 - 1;
                let y = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
                let xv = Var::from_tensor(&x).unwrap();
                let r = (rng.normal() + 2.0) as f64; // dloss other than 1
                let run = |fused: bool, y: &Tensor| {
                    let loss = if fused {
                        cross_entropy(xv.as_tensor(), y).unwrap()
                    } else {
                        candle_nn::loss::cross_entropy(xv.as_tensor(), y).unwrap()
                    };
                    let grads = (&loss * r).unwrap().backward().unwrap();
                    (flat(&loss)[0], flat(grads.get(xv.as_tensor()).unwrap()))
                };
                let (want, dwant) = run(false, &y);
                let tol = if dtype == DType::F32 { 2e-6 } else { 1e-12 };
                let y64 = y.to_dtype(DType::I64).unwrap();
                for y in [&y, &y64] {
                    let (got, dgot) = run(true, y);
                    assert!(
                        (got - want).abs() <= tol * want.abs().max(1.0),
                        "{rows}x{classes} {dtype:?}: {got} vs {want}"
                    );
                    for (a, b) in dgot.iter().zip(&dwant) {
                        assert!(
                            (a - b).abs() <= tol * r,
                            "{rows}x{classes} {dtype:?}: gradient {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// Loss and gradient against PyTorch's F.cross_entropy (scripts/cross_entropy_torch_fixture.py).
    #[test]
    fn matches_pytorch() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cross_entropy_torch.safetensors");
        let f = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        for case in ["small", "vocab", "one_row"] {
            let t = |k: &str| f[format!("{case}.{k}").as_str()].clone();
            let labels: Vec<u32> = flat(&t("labels")).iter().map(|&v| v as u32).collect();
            let y = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
            let x = Var::from_tensor(&t("logits")).unwrap();
            let r = flat(&t("r"))[0];
            let loss = cross_entropy(x.as_tensor(), &y).unwrap();
            let grads = (&loss * r).unwrap().backward().unwrap();
            let (got, want) = (flat(&loss)[0], flat(&t("loss"))[0]);
            assert!(
                (got - want).abs() < 1e-6 * want.abs().max(1.0),
                "{case}: loss {got} vs PyTorch's {want}"
            );
            let dgot = flat(grads.get(x.as_tensor()).unwrap());
            let d = dgot
                .iter()
                .zip(flat(&t("grad")))
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            // f32 softmax: x - lse rounds at ulp(|x|), up to 30 here, before the exponential.
            assert!(d < 1e-6 * r, "{case}: the gradient differs from PyTorch's by {d}");
        }
    }

    #[test]
    fn bad_labels_and_shapes_are_errors() {
        let x = Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap();
        let e = cross_entropy(&x, &Tensor::new(&[0u32, 4, 1], &Device::Cpu).unwrap()).unwrap_err();
        assert!(
            e.to_string().contains("label 4 of row 1 is out of range for 4 classes"),
            "{e}"
        );
        let e = cross_entropy(&x, &Tensor::new(&[0i64, -1, 1], &Device::Cpu).unwrap()).unwrap_err();
        assert!(e.to_string().contains("of row 1 is out of range"), "{e}");
        let e = cross_entropy(&x, &Tensor::new(&[0u32, 1], &Device::Cpu).unwrap()).unwrap_err();
        assert!(e.to_string().contains("labels of shape [2] for 3 rows"), "{e}");
        let e = cross_entropy(&x.flatten_all().unwrap(), &Tensor::new(&[0u32], &Device::Cpu).unwrap()).unwrap_err();
        assert!(e.to_string().contains("expected [rows, classes]"), "{e}");
    }
}
