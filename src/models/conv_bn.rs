//! A bias-free convolution, then a training-mode BatchNorm (then a ReLU), as one CPU custom op
//! each way: ResNet-20's every layer.
//!
//! Apart, the two ops meet at the convolution's output: candle's backward adds the BatchNorm's
//! input gradient into a fresh zero tensor before the convolution's backward reads it (a memset
//! and a full add, on one thread), and the BatchNorm reads its input back from memory. Fused, the
//! conv output lives inside the op (kept for its backward), and the gradient passes from the
//! BatchNorm's backward straight into the convolution's. The numbers are those of the two ops
//! apart: the same passes (`conv::cpu_*`, `batch_norm::cpu_*`) run in the same order.

use super::batch_norm::{self, BatchNorm, Dims, Float, Stats};
use super::conv::{self, ConvParams, Elem, Geometry};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor};
use std::sync::{Arc, Mutex};

/// conv2d(x, w) then `bn` (then ReLU with `relu`) when they run fused (CPU training); `None`
/// otherwise, for the caller to run the two layers apart.
pub fn fused(x: &Tensor, w: &Tensor, p: ConvParams, bn: &BatchNorm, train: bool, relu: bool) -> Result<Option<Tensor>> {
    if !BatchNorm::fuses(x, train) || !w.device().is_cpu() || w.dtype() != x.dtype() {
        return Ok(None);
    }
    let (weight, bias) = bn.affine(x.dtype())?;
    let saved = Arc::new(Mutex::new(None));
    let op = Train {
        p,
        relu,
        saved: saved.clone(),
    };
    let affine = Tensor::cat(&[&weight, &bias], 0)?;
    let z = x.contiguous()?.apply_op3(&w.contiguous()?, &affine, op)?;
    let stats = saved
        .lock()
        .expect("conv+bn state")
        .as_ref()
        .map(|s: &Saved| s.stats.clone());
    bn.update_running(stats.as_ref())?;
    Ok(Some(z))
}

/// What the forward keeps for the backward: the batch statistics and the convolution's output.
struct Saved {
    stats: Stats,
    y: CpuStorage,
}

/// (input, kernel, [bn weight; bn bias]) -> output.
struct Train {
    p: ConvParams,
    relu: bool,
    saved: Arc<Mutex<Option<Saved>>>,
}

fn slice<'a, T>(v: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    crate::models::cpu_buffers::contiguous(v, l, "conv+bn", what)
}

/// The shapes of both halves, checked.
fn shapes(x: &[usize], w: &[usize], p: ConvParams, affine: usize) -> Result<(Geometry, Dims)> {
    let g = Geometry::new(x, w, p)?;
    let d = Dims::of(&[g.n, g.o, g.oh, g.ow])?;
    if affine != 2 * g.o {
        bail!(
            "conv+bn: {affine} batch-norm weight and bias values for {} channels",
            g.o
        );
    }
    Ok((g, d))
}

fn forward<T: Elem + Float>(
    g: &Geometry,
    d: Dims,
    x: &[T],
    w: &[T],
    affine: &[T],
    relu: bool,
) -> (Vec<T>, Vec<T>, Stats) {
    let y = conv::cpu_forward(g, x, w);
    let (gamma, beta) = affine.split_at(g.o);
    let (z, stats) = batch_norm::cpu_forward(d, &y, gamma, beta, batch_norm::EPS, relu);
    (y, z, stats)
}

impl CustomOp3 for Train {
    fn name(&self) -> &'static str {
        "conv-bn-train"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        a: &CpuStorage,
        la: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, d) = shapes(lx.dims(), lw.dims(), self.p, la.shape().elem_count())?;
        let (y, z, stats) = match (x, w, a) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(a)) => {
                let (y, z, s) = forward(
                    &g,
                    d,
                    slice(x, lx, "input")?,
                    slice(w, lw, "kernel")?,
                    slice(a, la, "affine")?,
                    self.relu,
                );
                (CpuStorage::F32(y), CpuStorage::F32(z), s)
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(a)) => {
                let (y, z, s) = forward(
                    &g,
                    d,
                    slice(x, lx, "input")?,
                    slice(w, lw, "kernel")?,
                    slice(a, la, "affine")?,
                    self.relu,
                );
                (CpuStorage::F64(y), CpuStorage::F64(z), s)
            }
            _ => bail!("conv+bn: input, kernel and affine must all be f32 or all f64"),
        };
        *self.saved.lock().expect("conv+bn state") = Some(Saved { stats, y });
        Ok((z, g.output_dims().into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        a: &Tensor,
        z: &Tensor,
        dz: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().expect("conv+bn state");
        let Some(saved) = saved.as_ref() else {
            bail!("conv+bn: backward before its forward ran");
        };
        let (g, d) = shapes(x.dims(), w.dims(), self.p, a.elem_count())?;
        let gamma: Vec<f64> = a.narrow(0, 0, g.o)?.to_dtype(DType::F64)?.to_vec1()?;
        let dz = dz.contiguous()?;
        let (xs, lx) = x.storage_and_layout();
        let (ws, lw) = w.storage_and_layout();
        let (zs, lz) = z.storage_and_layout();
        let (dzs, ldz) = dz.storage_and_layout();
        let bwd = Backward {
            g: &g,
            d,
            gamma: &gamma,
            stats: &saved.stats,
            relu: self.relu,
        };
        let (dx, dw, da) = match (&*xs, &*ws, &*zs, &*dzs, &saved.y) {
            (
                Storage::Cpu(CpuStorage::F32(x)),
                Storage::Cpu(CpuStorage::F32(w)),
                Storage::Cpu(CpuStorage::F32(z)),
                Storage::Cpu(CpuStorage::F32(dz)),
                CpuStorage::F32(y),
            ) => bwd.run(
                slice(x, lx, "input")?,
                slice(w, lw, "kernel")?,
                y,
                slice(z, lz, "output")?,
                slice(dz, ldz, "output gradient")?,
            )?,
            (
                Storage::Cpu(CpuStorage::F64(x)),
                Storage::Cpu(CpuStorage::F64(w)),
                Storage::Cpu(CpuStorage::F64(z)),
                Storage::Cpu(CpuStorage::F64(dz)),
                CpuStorage::F64(y),
            ) => bwd.run(
                slice(x, lx, "input")?,
                slice(w, lw, "kernel")?,
                y,
                slice(z, lz, "output")?,
                slice(dz, ldz, "output gradient")?,
            )?,
            _ => bail!("conv+bn backward: the operands must be CPU tensors of one float type"),
        };
        Ok((Some(dx.reshape(x.shape())?), Some(dw.reshape(w.shape())?), Some(da)))
    }
}

/// The backward's fixed inputs.
struct Backward<'a> {
    g: &'a Geometry,
    d: Dims,
    gamma: &'a [f64],
    stats: &'a Stats,
    relu: bool,
}

impl Backward<'_> {
    /// (dx, dw, [dgamma; dbeta]) as flat CPU tensors.
    fn run<T: Elem + Float + candle_core::WithDType>(
        &self,
        x: &[T],
        w: &[T],
        y: &[T],
        z: &[T],
        dz: &[T],
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let n = self.d.len();
        if y.len() != n || z.len() != n || dz.len() != n {
            bail!("conv+bn backward: output of {} values, expected {n}", z.len());
        }
        // dy ++ dgamma ++ dbeta, as the BatchNorm's own backward lays them out.
        let mut all = batch_norm::cpu_backward(self.d, y, dz, z, self.gamma, self.stats, batch_norm::EPS, self.relu);
        let da = all.split_off(n);
        let dx = conv::cpu_input_grad(self.g, &all, w);
        let dw = conv::cpu_weight_grad(self.g, x, &all);
        let cpu = |v: Vec<T>| {
            let len = v.len();
            Tensor::from_vec(v, len, &Device::Cpu)
        };
        Ok((cpu(dx)?, cpu(dw)?, cpu(da)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::builder::{Builder, Init};
    use crate::models::layers::Conv2d;
    use crate::rng::Rng;
    use candle_core::Var;
    use candle_nn::VarMap;

    /// Output, running statistics and every gradient of loss = sum(z * r) for conv then BN (then
    /// ReLU), fused or apart, over the same freshly drawn parameters.
    fn run(
        x: &Tensor,
        r: &Tensor,
        cin: usize,
        cout: usize,
        p: (usize, usize),
        relu: bool,
        fused: bool,
    ) -> Vec<Vec<f64>> {
        let vm = VarMap::new();
        let b = Builder::new(&vm, 7, &Device::Cpu);
        let conv = Conv2d::new(&b.pp("conv"), cin, cout, 3, p.0, p.1, Init::Normal { std: 0.5 }, None).unwrap();
        let bn = BatchNorm::new(&b.pp("bn"), cout).unwrap();
        let vars = vm.data().lock().unwrap().clone();
        // Weight and bias away from 1 and 0, so that their gradients and the scale both matter.
        let mut rng = Rng::new(3);
        for name in ["bn.weight", "bn.bias"] {
            let v: Vec<f32> = (0..cout).map(|_| rng.normal() * 0.5 + 0.7).collect();
            vars[name].set(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap();
        }
        let xv = Var::from_tensor(x).unwrap();
        let z = if fused {
            conv.forward_bn(xv.as_tensor(), &bn, true, relu).unwrap()
        } else {
            use candle_core::Module;
            let y = conv.forward(xv.as_tensor()).unwrap();
            if relu {
                bn.forward_relu(&y, true).unwrap()
            } else {
                bn.forward_t(&y, true).unwrap()
            }
        };
        let grads = (&z * r).unwrap().sum_all().unwrap().backward().unwrap();
        let flat = |t: &Tensor| {
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        let mut out = vec![flat(&z), flat(grads.get(xv.as_tensor()).expect("dx"))];
        for name in ["conv.weight", "bn.weight", "bn.bias"] {
            out.push(flat(grads.get(vars[name].as_tensor()).expect(name)));
        }
        for name in ["bn.running_mean", "bn.running_var"] {
            out.push(flat(vars[name].as_tensor()));
        }
        out
    }

    #[test]
    fn fused_matches_the_layers_apart() {
        let mut rng = Rng::new(21);
        // (input, output channels, (stride, padding)): one group; groups of 6 with a partial last;
        // stride 2; batch 1; odd sizes.
        let cases = [
            ([2, 3, 8, 8], 5, (1, 1)),
            ([7, 2, 10, 10], 3, (1, 1)),
            ([3, 4, 9, 7], 6, (2, 1)),
            ([1, 3, 6, 5], 17, (1, 0)),
        ];
        // The fused op runs the very passes the two layers run apart, in the same order, and
        // candle's zero-then-add accumulation between them is exact: the results are equal bit
        // for bit.
        {
            for (xs, cout, p) in cases {
                for relu in [false, true] {
                    let n: usize = xs.iter().product();
                    let v: Vec<f32> = (0..n).map(|_| rng.normal() * 2.0 + 0.5).collect();
                    let x = Tensor::from_vec(v, &xs, &Device::Cpu).unwrap();
                    let zs = output_shape(&x, cout, p);
                    let rv: Vec<f32> = (0..zs.0 * zs.1 * zs.2 * zs.3).map(|_| rng.normal()).collect();
                    let r = Tensor::from_vec(rv, zs, &Device::Cpu).unwrap();
                    let want = run(&x, &r, xs[1], cout, p, relu, false);
                    let got = run(&x, &r, xs[1], cout, p, relu, true);
                    let names = ["output", "dx", "dw", "dgamma", "dbeta", "running mean", "running var"];
                    for ((g, w), name) in got.iter().zip(&want).zip(names) {
                        assert!(g.iter().all(|v| v.is_finite()) && g.iter().any(|&v| v != 0.0), "{name}");
                        assert_eq!(g, w, "{xs:?} -> {cout} {p:?} relu {relu}: {name}");
                    }
                }
            }
        }
    }

    fn output_shape(x: &Tensor, cout: usize, (s, pad): (usize, usize)) -> (usize, usize, usize, usize) {
        let (n, _, h, w) = x.dims4().unwrap();
        (n, cout, (h + 2 * pad - 3) / s + 1, (w + 2 * pad - 3) / s + 1)
    }

    #[test]
    fn evaluation_and_bad_operands_do_not_fuse_or_panic() {
        let vm = VarMap::new();
        let b = Builder::new(&vm, 7, &Device::Cpu);
        let bn = BatchNorm::new(&b.pp("bn"), 4).unwrap();
        let x = Tensor::ones((2, 3, 5, 5), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::ones((4, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let p = ConvParams::square(1, 1);
        assert!(
            fused(&x, &w, p, &bn, false, true).unwrap().is_none(),
            "evaluation runs apart"
        );
        let w64 = w.to_dtype(DType::F64).unwrap();
        assert!(
            fused(&x, &w64, p, &bn, true, true).unwrap().is_none(),
            "mixed types run apart"
        );
        let bad = Tensor::ones((4, 2, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let e = fused(&x, &bad, p, &bn, true, true).unwrap_err().to_string();
        assert!(e.contains("channels"), "{e}");
        let other = Tensor::ones((5, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let e = fused(&x, &other, p, &bn, true, true).unwrap_err().to_string();
        assert!(e.contains("batch-norm weight and bias"), "{e}");
    }
}
