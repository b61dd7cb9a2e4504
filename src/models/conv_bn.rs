//! A convolution (with or without a bias), then a training-mode BatchNorm (then a ReLU), as one
//! CPU custom op each way: every layer of ResNet-20 and of VGG-16.
//!
//! Apart, the two ops meet at the convolution's output: candle's backward adds the BatchNorm's
//! input gradient into a fresh zero tensor before the convolution's backward reads it (a memset
//! and a full add, on one thread), and the BatchNorm reads its input back from memory. Fused, the
//! conv output lives inside the op (kept for its backward), and the gradient passes from the
//! BatchNorm's backward straight into the convolution's. The numbers are those of the two ops
//! apart: the same passes (`conv::cpu_*`, `batch_norm::cpu_*`) run in the same order.

use super::batch_norm::{self, BatchNorm, Dims, Float, Stats};
use super::conv::{self, ConvParams, Elem, Geometry};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor, WithDType};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// conv2d(x, w) (+ `bias` per channel) then `bn` (then ReLU with `relu`) when they run fused
/// (CPU training); `None` otherwise, for the caller to run the two layers apart.
pub fn fused(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: ConvParams,
    bn: &BatchNorm,
    (train, relu): (bool, bool),
) -> Result<Option<Tensor>> {
    let same = |t: &Tensor| t.device().is_cpu() && t.dtype() == x.dtype();
    if !BatchNorm::fuses(x, train) || !same(w) || !bias.is_none_or(same) {
        return Ok(None);
    }
    let (weight, bn_bias) = bn.affine(x.dtype())?;
    let saved = Arc::new(Mutex::new(None));
    let op = Train {
        p,
        relu,
        bias: bias.is_some(),
        saved: saved.clone(),
    };
    let mut parts = vec![&weight, &bn_bias];
    parts.extend(bias);
    let affine = Tensor::cat(&parts, 0)?;
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

/// (input, kernel, [bn weight; bn bias; conv bias if `bias`]) -> output.
struct Train {
    p: ConvParams,
    relu: bool,
    bias: bool,
    saved: Arc<Mutex<Option<Saved>>>,
}

/// The shapes of both halves, checked.
fn shapes(x: &[usize], w: &[usize], p: ConvParams, affine: usize, bias: bool) -> Result<(Geometry, Dims)> {
    let g = Geometry::new(x, w, p)?;
    let d = Dims::of(&[g.n, g.o, g.oh, g.ow])?;
    let want = if bias { 3 } else { 2 } * g.o;
    if affine != want {
        bail!(
            "conv+bn: {affine} batch-norm weight, bias (and conv bias) values, expected {want} for {} channels",
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
    let mut y = conv::cpu_forward(g, x, w);
    let (gamma, rest) = affine.split_at(g.o);
    let (beta, bias) = rest.split_at(g.o);
    if !bias.is_empty() {
        // As the layers apart: the bias added in the tensor's type, then normalised.
        y.par_chunks_mut(g.l()).enumerate().for_each(|(i, block)| {
            let b = bias[i % g.o];
            block.iter_mut().for_each(|v| *v += b);
        });
    }
    let (z, stats) = batch_norm::cpu_forward(d, &y, gamma, beta, batch_norm::EPS, relu);
    (y, z, stats)
}

impl Train {
    fn forward_as<T: Elem + Float + WithDType>(
        &self,
        (x, lx): (&CpuStorage, &Layout),
        (w, lw): (&CpuStorage, &Layout),
        (a, la): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let (g, d) = shapes(lx.dims(), lw.dims(), self.p, la.shape().elem_count(), self.bias)?;
        let (x, w, a) = (
            typed::<T>(x, lx, "input")?,
            typed::<T>(w, lw, "kernel")?,
            typed::<T>(a, la, "affine")?,
        );
        let (y, z, stats) = forward(&g, d, x, w, a, self.relu);
        let y = T::to_cpu_storage_owned(y);
        *self.saved.lock().expect("conv+bn state") = Some(Saved { stats, y });
        Ok((T::to_cpu_storage_owned(z), g.output_dims().into()))
    }
}

/// A contiguous operand's values as `T`: an error for another type.
fn typed<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    crate::models::cpu_buffers::typed(s, l, "conv+bn", what)
}

/// A CPU tensor's storage, or an error naming `what`.
fn cpu<'a>(s: &'a Storage, what: &str) -> Result<&'a CpuStorage> {
    crate::models::cpu_buffers::cpu_storage(s, "conv+bn backward", what)
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
        let (x, w, a) = ((x, lx), (w, lw), (a, la));
        match (x.0.dtype(), w.0.dtype(), a.0.dtype()) {
            (DType::F32, DType::F32, DType::F32) => self.forward_as::<f32>(x, w, a),
            (DType::F64, DType::F64, DType::F64) => self.forward_as::<f64>(x, w, a),
            _ => bail!("conv+bn: input, kernel and affine must all be f32 or all f64"),
        }
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
        let (g, d) = shapes(x.dims(), w.dims(), self.p, a.elem_count(), self.bias)?;
        let gamma: Vec<f64> = a.narrow(0, 0, g.o)?.to_dtype(DType::F64)?.to_vec1()?;
        let dz = dz.contiguous()?;
        let bwd = Backward {
            g: &g,
            d,
            gamma: &gamma,
            stats: &saved.stats,
            relu: self.relu,
            bias: self.bias,
        };
        let (dx, dw, da) = match x.dtype() {
            DType::F32 => bwd.run::<f32>(x, w, &saved.y, z, &dz)?,
            DType::F64 => bwd.run::<f64>(x, w, &saved.y, z, &dz)?,
            t => bail!("conv+bn backward: {t:?} operands, expected f32 or f64"),
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
    bias: bool,
}

impl Backward<'_> {
    /// (dx, dw, [dgamma; dbeta; dbias]) as flat CPU tensors.
    fn run<T: Elem + Float + WithDType>(
        &self,
        x: &Tensor,
        w: &Tensor,
        y: &CpuStorage,
        z: &Tensor,
        dz: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (xs, lx) = x.storage_and_layout();
        let (ws, lw) = w.storage_and_layout();
        let (zs, lz) = z.storage_and_layout();
        let (dzs, ldz) = dz.storage_and_layout();
        let x = typed::<T>(cpu(&xs, "input")?, lx, "input")?;
        let w = typed::<T>(cpu(&ws, "kernel")?, lw, "kernel")?;
        let z = typed::<T>(cpu(&zs, "output")?, lz, "output")?;
        let dz = typed::<T>(cpu(&dzs, "output gradient")?, ldz, "output gradient")?;
        let y = T::cpu_storage_as_slice(y)?;
        let n = self.d.len();
        if y.len() != n || z.len() != n || dz.len() != n {
            bail!("conv+bn backward: output of {} values, expected {n}", z.len());
        }
        // dy ++ dgamma ++ dbeta, as the BatchNorm's own backward lays them out.
        let mut all = batch_norm::cpu_backward(self.d, y, dz, z, self.gamma, self.stats, batch_norm::EPS, self.relu);
        let mut da = all.split_off(n);
        if self.bias {
            // The bias gradient sums dy per channel: in f64, each channel in one fixed order.
            let (o, l) = (self.g.o, self.g.l());
            let sums: Vec<f64> = (0..o)
                .into_par_iter()
                .map(|c| {
                    let block = |i: usize| &all[(i * o + c) * l..][..l];
                    (0..self.g.n)
                        .map(|i| block(i).iter().map(|&v| Float::to_f64(v)).sum::<f64>())
                        .sum()
                })
                .collect();
            da.extend(sums.into_iter().map(<T as Float>::from_f64));
        }
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
        (relu, bias): (bool, bool),
        fused: bool,
    ) -> Vec<Vec<f64>> {
        let vm = VarMap::new();
        let b = Builder::new(&vm, 7, &Device::Cpu);
        let conv = Conv2d::new(
            &b.pp("conv"),
            cin,
            cout,
            3,
            p.0,
            p.1,
            Init::Normal { std: 0.5 },
            bias.then_some(Init::Normal { std: 0.5 }),
        )
        .unwrap();
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
        let flat = crate::models::conv::tests::flat;
        let mut out = vec![flat(&z), flat(grads.get(xv.as_tensor()).expect("dx"))];
        for name in ["conv.weight", "bn.weight", "bn.bias"] {
            out.push(flat(grads.get(vars[name].as_tensor()).expect(name)));
        }
        for name in ["bn.running_mean", "bn.running_var"] {
            out.push(flat(vars[name].as_tensor()));
        }
        if bias {
            out.push(flat(grads.get(vars["conv.bias"].as_tensor()).expect("conv bias")));
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
        // for bit. The one exception is the conv bias's gradient, the sum of dy per channel
        // (candle's f32 reduction apart, an f64 sum fused); BatchNorm makes it zero in exact
        // arithmetic, so both are rounding noise near zero.
        for bias in [false, true] {
            for (xs, cout, p) in cases {
                for relu in [false, true] {
                    let n: usize = xs.iter().product();
                    let v: Vec<f32> = (0..n).map(|_| rng.normal() * 2.0 + 0.5).collect();
                    let x = Tensor::from_vec(v, &xs, &Device::Cpu).unwrap();
                    let zs = output_shape(&x, cout, p);
                    let rv: Vec<f32> = (0..zs.0 * zs.1 * zs.2 * zs.3).map(|_| rng.normal()).collect();
                    let r = Tensor::from_vec(rv, zs, &Device::Cpu).unwrap();
                    let want = run(&x, &r, xs[1], cout, p, (relu, bias), false);
                    let got = run(&x, &r, xs[1], cout, p, (relu, bias), true);
                    assert_eq!(got.len(), want.len());
                    if bias {
                        let (g, w) = (&got[7], &want[7]);
                        assert_eq!(g.len(), cout);
                        for (a, b) in g.iter().zip(w) {
                            assert!(a.abs() < 1e-4 && (a - b).abs() < 1e-4, "conv bias gradient {a} vs {b}");
                        }
                    }
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
            fused(&x, &w, None, p, &bn, (false, true)).unwrap().is_none(),
            "evaluation runs apart"
        );
        let w64 = w.to_dtype(DType::F64).unwrap();
        assert!(
            fused(&x, &w64, None, p, &bn, (true, true)).unwrap().is_none(),
            "mixed types run apart"
        );
        let bad = Tensor::ones((4, 2, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let e = fused(&x, &bad, None, p, &bn, (true, true)).unwrap_err().to_string();
        assert!(e.contains("channels"), "{e}");
        let other = Tensor::ones((5, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let e = fused(&x, &other, None, p, &bn, (true, true)).unwrap_err().to_string();
        assert!(e.contains("expected 10 for 5 channels"), "{e}");
    }
}
