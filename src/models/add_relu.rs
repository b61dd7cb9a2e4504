//! relu(a + b) as one op each way on the CPU: the end of every residual block. candle runs it as
//! an add and a ReLU whose backward alone is four full passes (a zero tensor, a comparison, a
//! cast and a product); here the forward is one pass and the backward one (the output gradient
//! where the output is positive, PyTorch's rule), shared by both inputs.

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Values per rayon task.
const CHUNK: usize = 1 << 14;

/// relu(a + b) for tensors of one shape; other devices and types run candle's two ops.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let fused = a.device().is_cpu() && a.dims() == b.dims() && matches!(a.dtype(), DType::F32 | DType::F64);
    if fused {
        a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
    } else {
        (a + b)?.relu()
    }
}

fn elementwise<T: Copy + Send + Sync + Default>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::default(); a.len()];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, o)| {
        let at = i * CHUNK;
        for ((o, &x), &y) in o.iter_mut().zip(&a[at..]).zip(&b[at..]) {
            *o = f(x, y);
        }
    });
    out
}

fn slice<'a, T>(v: &'a [T], l: &Layout) -> Result<&'a [T]> {
    crate::models::cpu_buffers::contiguous(v, l, "add_relu", "operand")
}

/// Applies `f` to two same-shaped contiguous f32 or f64 operands.
fn apply(
    (a, la): (&CpuStorage, &Layout),
    (b, lb): (&CpuStorage, &Layout),
    f32_op: impl Fn(f32, f32) -> f32 + Sync,
    f64_op: impl Fn(f64, f64) -> f64 + Sync,
) -> Result<(CpuStorage, Shape)> {
    if la.dims() != lb.dims() {
        bail!("add_relu: shapes {:?} and {:?} differ", la.dims(), lb.dims());
    }
    let out = match (a, b) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) => CpuStorage::F32(elementwise(slice(a, la)?, slice(b, lb)?, f32_op)),
        (CpuStorage::F64(a), CpuStorage::F64(b)) => CpuStorage::F64(elementwise(slice(a, la)?, slice(b, lb)?, f64_op)),
        _ => bail!("add_relu: operands must both be f32 or both f64"),
    };
    Ok((out, la.shape().clone()))
}

struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "add-relu"
    }

    fn cpu_fwd(&self, a: &CpuStorage, la: &Layout, b: &CpuStorage, lb: &Layout) -> Result<(CpuStorage, Shape)> {
        apply((a, la), (b, lb), |x, y| (x + y).max(0.0), |x, y| (x + y).max(0.0))
    }

    fn bwd(&self, _a: &Tensor, _b: &Tensor, y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = dy.contiguous()?.apply_op2_no_bwd(y, &PassWherePositive)?;
        Ok((Some(g.clone()), Some(g)))
    }
}

/// (output gradient, output) -> the gradient where the output is positive, else 0.
struct PassWherePositive;

impl CustomOp2 for PassWherePositive {
    fn name(&self) -> &'static str {
        "add-relu-grad"
    }

    fn cpu_fwd(&self, dy: &CpuStorage, ldy: &Layout, y: &CpuStorage, ly: &Layout) -> Result<(CpuStorage, Shape)> {
        apply(
            (dy, ldy),
            (y, ly),
            |g, v| if v > 0.0 { g } else { 0.0 },
            |g, v| if v > 0.0 { g } else { 0.0 },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::{Device, Var};

    /// Output and both input gradients of sum(relu(a + b) * r), fused and as candle's two ops, on
    /// sizes around the task chunk; values rounded to a grid so that exact zeros of a + b occur.
    #[test]
    fn matches_candle_add_then_relu() {
        let mut rng = Rng::new(5);
        for n in [1, 7, CHUNK - 1, CHUNK, 3 * CHUNK + 5] {
            let v = |rng: &mut Rng| -> Vec<f32> { (0..n).map(|_| (rng.normal() * 4.0).round() / 4.0).collect() };
            let (a, b, r) = (v(&mut rng), v(&mut rng), v(&mut rng));
            let t = |x: &[f32]| Var::from_tensor(&Tensor::from_slice(x, (n, 1), &Device::Cpu).unwrap()).unwrap();
            let run = |fused: bool| {
                let (a, b) = (t(&a), t(&b));
                let y = if fused {
                    add_relu(a.as_tensor(), b.as_tensor()).unwrap()
                } else {
                    (a.as_tensor() + b.as_tensor()).unwrap().relu().unwrap()
                };
                let r = Tensor::from_slice(&r, (n, 1), &Device::Cpu).unwrap();
                let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
                let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                (
                    v(&y),
                    v(grads.get(a.as_tensor()).unwrap()),
                    v(grads.get(b.as_tensor()).unwrap()),
                    v(a.as_tensor()),
                    v(b.as_tensor()),
                )
            };
            let (fused, composed) = (run(true), run(false));
            assert_eq!(fused.0, composed.0, "n {n}: outputs");
            for i in 0..n {
                // candle passes the gradient where a + b >= 0, PyTorch (and we) where it is > 0.
                if fused.3[i] + fused.4[i] != 0.0 {
                    assert_eq!(fused.1[i], composed.1[i], "n {n}: grad a[{i}]");
                    assert_eq!(fused.2[i], composed.2[i], "n {n}: grad b[{i}]");
                } else {
                    assert_eq!(
                        (fused.1[i], fused.2[i]),
                        (0.0, 0.0),
                        "n {n}: at a + b = 0 no gradient passes"
                    );
                }
            }
        }
    }
}
