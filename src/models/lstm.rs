//! A multi-layer LSTM with PyTorch's gate order (i, f, g, o), names (`weight_ih_l{k}`,
//! `weight_hh_l{k}`, `bias_ih_l{k}`, `bias_hh_l{k}`) and default init (uniform in +-1/sqrt(H)).
//! Time-major [T, B, F]: the input projection of all time steps is one matmul, and only the
//! recurrent product runs per step. Dropout between layers, drawn from the run's seeded RNG.

use super::builder::{Builder, Init};
use super::dropout::dropout;
use crate::rng::Rng;
use candle_core::{Result, Tensor, D};

pub struct Lstm {
    layers: Vec<Layer>,
    hidden: usize,
    dropout: f32,
}

struct Layer {
    w_ih: Tensor,
    w_hh: Tensor,
    bias: Tensor,
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
                Ok(Layer {
                    w_ih,
                    w_hh,
                    bias: (b_ih + b_hh)?,
                })
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
            // One matmul for every time step's input projection (and both biases).
            let xw = input
                .reshape((t_len * batch, fan))?
                .matmul(&layer.w_ih.t()?)?
                .broadcast_add(&layer.bias)?
                .reshape((t_len, batch, 4 * self.hidden))?;
            let w_hh_t = layer.w_hh.t()?;
            let mut h = state.h.get(k)?;
            let mut c = state.c.get(k)?;
            let mut outs = Vec::with_capacity(t_len);
            for t in 0..t_len {
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
            input = Tensor::stack(&outs, 0)?;
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
}
