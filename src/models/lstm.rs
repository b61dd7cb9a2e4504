//! A multi-layer LSTM with PyTorch's gate order (i, f, g, o), names (`weight_ih_l{k}`,
//! `weight_hh_l{k}`, `bias_ih_l{k}`, `bias_hh_l{k}`) and default init (uniform in +-1/sqrt(H)).
//! Time-major [T, B, F]: the input projection of all time steps is one matmul, and only the
//! recurrent product runs per step. Dropout between layers, drawn from the run's seeded RNG.

use super::builder::{Builder, Init};
use super::dropout::dropout;
use super::lstm_fused;
use crate::rng::Rng;
use candle_core::{Result, Tensor, D};

pub struct Lstm {
    layers: Vec<Layer>,
    hidden: usize,
    dropout: f32,
}

/// The parameters themselves, never a tensor computed from them at construction: loading a
/// checkpoint or an optimizer step writes into these, and the forward must see it.
struct Layer {
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor,
    b_hh: Tensor,
}

/// Hidden and cell state, each [layers, B, H] (PyTorch's layout).
#[derive(Clone)]
pub struct State {
    pub h: Tensor,
    pub c: Tensor,
}

impl Lstm {
    pub fn new(b: &Builder, input: usize, hidden: usize, layers: usize, dropout: f32) -> Result<Self> {
        let bound = 1.0 / (hidden as f32).sqrt();
        let init = Init::Uniform { lo: -bound, hi: bound };
        let layers = (0..layers)
            .map(|k| {
                let fan = if k == 0 { input } else { hidden };
                let w_ih = b.var(&format!("weight_ih_l{k}"), (4 * hidden, fan), init)?;
                let w_hh = b.var(&format!("weight_hh_l{k}"), (4 * hidden, hidden), init)?;
                let b_ih = b.var(&format!("bias_ih_l{k}"), 4 * hidden, init)?;
                let b_hh = b.var(&format!("bias_hh_l{k}"), 4 * hidden, init)?;
                Ok(Layer { w_ih, w_hh, b_ih, b_hh })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            hidden,
            dropout,
        })
    }

    pub fn zero_state(&self, batch: usize, device: &candle_core::Device) -> Result<State> {
        let z = Tensor::zeros((self.layers.len(), batch, self.hidden), candle_core::DType::F32, device)?;
        Ok(State { h: z.clone(), c: z })
    }

    /// Outputs [T, B, H] of the last layer and the final state. `rng` draws the dropout masks
    /// between layers in training; `None` is evaluation.
    pub fn forward(&self, x: &Tensor, state: &State, mut rng: Option<&mut Rng>) -> Result<(Tensor, State)> {
        let (t_len, batch, _) = x.dims3()?;
        let mut input = x.clone();
        let (mut hs, mut cs) = (Vec::new(), Vec::new());
        for (k, layer) in self.layers.iter().enumerate() {
            if k > 0 {
                if let Some(r) = rng.as_deref_mut() {
                    input = dropout(&input, self.dropout, r)?;
                }
            }
            let fan = input.dim(2)?;
            // One matmul for every time step's input projection (and both biases, summed here,
            // in every forward, from the current parameter values).
            let bias = (&layer.b_ih + &layer.b_hh)?;
            let xw = input
                .reshape((t_len * batch, fan))?
                .matmul(&layer.w_ih.t()?)?
                .broadcast_add(&bias)?
                .reshape((t_len, batch, 4 * self.hidden))?;
            let (h0, c0) = (state.h.get(k)?, state.c.get(k)?);
            let (out, h, c) = match lstm_fused::layer(&xw, &layer.w_hh, &h0, &c0)? {
                Some(fused) => fused,
                None => time_loop(&xw, &layer.w_hh, h0, c0)?,
            };
            input = out;
            hs.push(h);
            cs.push(c);
        }
        Ok((
            input,
            State {
                h: Tensor::stack(&hs, 0)?,
                c: Tensor::stack(&cs, 0)?,
            },
        ))
    }
}

/// The time loop of candle ops, where the fused op does not run (off the CPU): `xw` [T, B, 4H],
/// `w_hh` [4H, H], the state [B, H]; the outputs [T, B, H] and the final (h, c).
fn time_loop(xw: &Tensor, w_hh: &Tensor, mut h: Tensor, mut c: Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let w_hh_t = w_hh.t()?;
    let mut outs = Vec::with_capacity(xw.dim(0)?);
    for t in 0..xw.dim(0)? {
        let gates = (xw.get(t)? + h.matmul(&w_hh_t)?)?;
        let chunks = gates.chunk(4, D::Minus1)?;
        let i = candle_nn::ops::sigmoid(&chunks[0])?;
        let f = candle_nn::ops::sigmoid(&chunks[1])?;
        let g = chunks[2].tanh()?;
        let o = candle_nn::ops::sigmoid(&chunks[3])?;
        c = ((f * &c)? + (i * g)?)?;
        h = (o * c.tanh()?)?;
        outs.push(h.clone());
    }
    Ok((Tensor::stack(&outs, 0)?, h, c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::rnn::{LSTMConfig, RNN};
    use candle_nn::VarMap;

    fn tiny(seed: u64) -> (VarMap, Lstm) {
        let vm = VarMap::new();
        let b = Builder::new(&vm, seed, &Device::Cpu);
        let l = Lstm::new(&b.pp("lstm"), 3, 4, 1, 0.0).unwrap();
        (vm, l)
    }

    /// Step for step the same as candle-nn's LSTM with the same weights.
    #[test]
    fn matches_candle_nn_step_by_step() {
        let (vm, ours) = tiny(3);
        let tensors: std::collections::HashMap<String, Tensor> = vm
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.trim_start_matches("lstm.").to_string(), v.as_tensor().clone()))
            .collect();
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let theirs = candle_nn::rnn::lstm(3, 4, LSTMConfig::default(), vb).unwrap();
        let (t_len, batch) = (5, 2);
        let x = Tensor::randn(0f32, 1.0, (t_len, batch, 3), &Device::Cpu).unwrap();
        let (out, state) = ours
            .forward(&x, &ours.zero_state(batch, &Device::Cpu).unwrap(), None)
            .unwrap();
        let mut s = theirs.zero_state(batch).unwrap();
        for t in 0..t_len {
            s = theirs.step(&x.get(t).unwrap(), &s).unwrap();
            let diff = (out.get(t).unwrap() - s.h()).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        }
        let diff = (state.c.get(0).unwrap() - s.c())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }

    /// Autograd's gradient w.r.t. the input equals central finite differences.
    #[test]
    fn gradient_matches_finite_differences() {
        let vm = VarMap::new();
        let b = Builder::new(&vm, 5, &Device::Cpu);
        let l = Lstm::new(&b, 2, 3, 2, 0.0).unwrap();
        let x0: Vec<f32> = (0..4 * 2 * 2).map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.4).collect();
        let loss_of = |x: &Tensor| -> Tensor {
            let (out, st) = l.forward(x, &l.zero_state(2, &Device::Cpu).unwrap(), None).unwrap();
            (out.sqr().unwrap().sum_all().unwrap() + st.c.sum_all().unwrap()).unwrap()
        };
        let xv = Var::from_vec(x0.clone(), (4, 2, 2), &Device::Cpu).unwrap();
        let g = loss_of(xv.as_tensor()).backward().unwrap();
        let g = g
            .get(xv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let eps = 1e-2f32;
        for i in 0..x0.len() {
            let at = |d: f32| {
                let mut x = x0.clone();
                x[i] += d;
                let t = Tensor::from_vec(x, (4, 2, 2), &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap();
                loss_of(&t.to_dtype(DType::F32).unwrap()).to_scalar::<f32>().unwrap()
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            assert!(
                (fd - g[i]).abs() < 2e-3 * (1.0 + fd.abs()),
                "x[{i}]: autograd {} vs fd {fd}",
                g[i]
            );
        }
    }

    /// The fused op and the loop of candle ops on random shapes (T = 1 included, B and H not
    /// multiples of a vector): outputs and final state to the bit, the gradients of the projection,
    /// the recurrent weight and both initial states to rounding.
    #[test]
    fn fused_time_loop_matches_the_candle_ops() {
        let mut rng = crate::rng::Rng::new(11);
        for (t_len, batch, hidden) in [(1, 1, 1), (5, 3, 7), (9, 2, 17), (4, 20, 33)] {
            let mut var = |dims: &[usize], scale: f32| {
                let n = dims.iter().product::<usize>();
                let v: Vec<f32> = (0..n).map(|_| rng.normal() * scale).collect();
                Var::from_vec(v, dims, &Device::Cpu).unwrap()
            };
            let xw = var(&[t_len, batch, 4 * hidden], 1.0);
            let w = var(&[4 * hidden, hidden], 0.5);
            let (h0, c0) = (var(&[batch, hidden], 1.0), var(&[batch, hidden], 1.0));
            let r = var(&[t_len, batch, hidden], 1.0);
            let (rh, rc) = (var(&[batch, hidden], 1.0), var(&[batch, hidden], 1.0));
            let run = |fused: bool| {
                let (xt, wt, ht, ct) = (xw.as_tensor(), w.as_tensor(), h0.as_tensor(), c0.as_tensor());
                let (out, h, c) = if fused {
                    lstm_fused::layer(xt, wt, ht, ct)
                        .unwrap()
                        .expect("the fused op applies")
                } else {
                    time_loop(xt, wt, ht.clone(), ct.clone()).unwrap()
                };
                let loss = [(&out, r.as_tensor()), (&h, rh.as_tensor()), (&c, rc.as_tensor())]
                    .into_iter()
                    .map(|(a, b)| (a * b).unwrap().sum_all().unwrap())
                    .reduce(|a, b| (a + b).unwrap())
                    .unwrap();
                let g = loss.backward().unwrap();
                let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let grads: Vec<Vec<f32>> = [&xw, &w, &h0, &c0]
                    .iter()
                    .map(|v| flat(g.get(v.as_tensor()).unwrap()))
                    .collect();
                ([flat(&out), flat(&h), flat(&c)], grads)
            };
            let ((fo, fg), (co, cg)) = (run(true), run(false));
            assert_eq!(fo, co, "outputs, T {t_len} B {batch} H {hidden}");
            for (k, (a, b)) in fg.iter().zip(&cg).enumerate() {
                for (x, y) in a.iter().zip(b) {
                    assert!(
                        (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                        "gradient {k}: {x} vs {y}, T {t_len} B {batch} H {hidden}"
                    );
                }
            }
        }
    }

    fn var(vm: &VarMap, name: &str) -> Var {
        vm.data().lock().unwrap()[name].clone()
    }

    /// The forward reads the biases as they are now: a value written into `bias_ih_l0` after
    /// construction (a checkpoint load, an optimizer step) changes the output.
    #[test]
    fn biases_written_after_construction_reach_the_forward() {
        let (vm, l) = tiny(4);
        let x = Tensor::randn(0f32, 1.0, (3, 2, 3), &Device::Cpu).unwrap();
        let run = || {
            let (out, _) = l.forward(&x, &l.zero_state(2, &Device::Cpu).unwrap(), None).unwrap();
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let before = run();
        for name in ["lstm.bias_ih_l0", "lstm.bias_hh_l0"] {
            let v = var(&vm, name);
            let old = v.as_tensor().copy().unwrap();
            v.set(&(&old + 0.5).unwrap()).unwrap();
            assert_ne!(run(), before, "{name} was not read by the forward");
            v.set(&old).unwrap();
            assert_eq!(run(), before);
        }
    }

    /// Autograd's gradients w.r.t. both biases equal central finite differences (the sum
    /// b_ih + b_hh gives each the same gradient).
    #[test]
    fn bias_gradients_match_finite_differences() {
        let vm = VarMap::new();
        let b = Builder::new(&vm, 6, &Device::Cpu);
        let l = Lstm::new(&b, 2, 3, 2, 0.0).unwrap();
        let x = Tensor::randn(0f32, 1.0, (4, 2, 2), &Device::Cpu).unwrap();
        let loss = || -> Tensor {
            let (out, st) = l.forward(&x, &l.zero_state(2, &Device::Cpu).unwrap(), None).unwrap();
            (out.sqr().unwrap().sum_all().unwrap() + st.c.sum_all().unwrap()).unwrap()
        };
        let grads = loss().backward().unwrap();
        for name in ["bias_ih_l0", "bias_hh_l0", "bias_ih_l1", "bias_hh_l1"] {
            let v = var(&vm, name);
            let g = grads.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            let v0 = v.as_tensor().to_vec1::<f32>().unwrap();
            let eps = 1e-2f32;
            for i in 0..v0.len() {
                let at = |d: f32| {
                    let mut w = v0.clone();
                    w[i] += d;
                    v.set(&Tensor::from_vec(w, v0.len(), &Device::Cpu).unwrap()).unwrap();
                    loss().to_scalar::<f32>().unwrap()
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                v.set(&Tensor::from_vec(v0.clone(), v0.len(), &Device::Cpu).unwrap())
                    .unwrap();
                assert!(
                    (fd - g[i]).abs() < 2e-3 * (1.0 + fd.abs()),
                    "{name}[{i}]: autograd {} vs fd {fd}",
                    g[i]
                );
            }
        }
    }

    /// PyTorch's nn.LSTM (2 layers, random weights, b_ih != b_hh, a random initial state):
    /// outputs, final state and the gradients of every weight, both biases and the input agree.
    /// The fixture is written by scripts/torch-fixtures.sh.
    #[test]
    fn matches_pytorch_outputs_and_gradients() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lstm_torch.safetensors");
        let f = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let vm = VarMap::new();
        let l = Lstm::new(&Builder::new(&vm, 0, &Device::Cpu), 3, 4, 2, 0.0).unwrap();
        let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
        assert_eq!(names.len(), 8);
        for n in &names {
            var(&vm, n).set(&f[n.as_str()]).unwrap();
        }
        let x = Var::from_tensor(&f["x"]).unwrap();
        let state = State {
            h: f["h0"].clone(),
            c: f["c0"].clone(),
        };
        let (out, last) = l.forward(x.as_tensor(), &state, None).unwrap();
        let loss =
            (out.sqr().unwrap().sum_all().unwrap() + last.c.sum_all().unwrap() + last.h.sum_all().unwrap()).unwrap();
        let max_diff = |a: &Tensor, b: &Tensor| -> f32 {
            assert_eq!(a.dims(), b.dims());
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(max_diff(&out, &f["out"]) < 1e-5);
        assert!(max_diff(&last.h, &f["h_n"]) < 1e-5);
        assert!(max_diff(&last.c, &f["c_n"]) < 1e-5);
        assert!(max_diff(&loss.reshape(1).unwrap(), &f["loss"]) < 1e-4);
        let grads = loss.backward().unwrap();
        for n in names.iter().chain(std::iter::once(&"x".to_string())) {
            let v = if n == "x" { x.clone() } else { var(&vm, n) };
            let g = grads.get(v.as_tensor()).unwrap();
            let d = max_diff(g, &f[format!("grad.{n}").as_str()]);
            assert!(d < 1e-4, "gradient of {n} differs from PyTorch's by {d}");
        }
    }
}
