//! SGD with momentum, dampening, Nesterov and weight decay, with PyTorch's semantics (torch.optim.SGD),
//! over the flat parameter vector. candle-nn's SGD has none of these.

use crate::par::CHUNK;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sgd {
    pub momentum: f32,
    pub dampening: f32,
    pub nesterov: bool,
    pub weight_decay: f32,
    /// The momentum buffer; `None` until the first step (PyTorch clones the first gradient).
    pub buf: Option<Vec<f32>>,
}

impl Sgd {
    pub fn new(momentum: f32, dampening: f32, nesterov: bool, weight_decay: f32) -> Self {
        Self {
            momentum,
            dampening,
            nesterov,
            weight_decay,
            buf: None,
        }
    }

    pub fn step(&mut self, params: &mut [f32], grad: &[f32], lr: f32) {
        assert_eq!(params.len(), grad.len());
        let (m, wd) = (self.momentum, self.weight_decay);
        // Element by element, so chunks on the worker's threads give the same bits as one pass.
        let params = params.par_chunks_mut(CHUNK).zip(grad.par_chunks(CHUNK));
        if m == 0.0 {
            params.for_each(|(p, g)| {
                for (p, &g) in p.iter_mut().zip(g) {
                    let d = g + wd * *p;
                    *p -= lr * d;
                }
            });
            return;
        }
        let first = self.buf.is_none();
        let buf = self.buf.get_or_insert_with(|| vec![0.0; grad.len()]);
        let (keep, nesterov) = (1.0 - self.dampening, self.nesterov);
        params.zip(buf.par_chunks_mut(CHUNK)).for_each(|((p, g), b)| {
            for ((p, &g), b) in p.iter_mut().zip(g).zip(b.iter_mut()) {
                let d = g + wd * *p;
                *b = if first { d } else { m * *b + keep * d };
                let step = if nesterov { d + m * *b } else { *b };
                *p -= lr * step;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values computed by hand with torch.optim.SGD's update rule, step by step.
    #[test]
    fn matches_pytorch_by_hand() {
        // lr 0.1, momentum 0.9, wd 0.01; p0 = 1.0, grads 0.5 then -0.2.
        let mut o = Sgd::new(0.9, 0.0, false, 0.01);
        let mut p = vec![1.0f32];
        o.step(&mut p, &[0.5], 0.1);
        // d = 0.5 + 0.01 = 0.51; buf = 0.51; p = 1 - 0.051 = 0.949
        assert!((p[0] - 0.949).abs() < 1e-7);
        o.step(&mut p, &[-0.2], 0.1);
        // d = -0.2 + 0.00949 = -0.19051; buf = 0.459 - 0.19051 = 0.26849; p = 0.949 - 0.026849
        assert!((p[0] - 0.922151).abs() < 1e-6, "{}", p[0]);

        // Nesterov: step = d + m * buf.
        let mut o = Sgd::new(0.9, 0.0, true, 0.0);
        let mut p = vec![1.0f32];
        o.step(&mut p, &[0.5], 0.1);
        // buf = 0.5; step = 0.5 + 0.45 = 0.95
        assert!((p[0] - 0.905).abs() < 1e-7);
        o.step(&mut p, &[0.5], 0.1);
        // buf = 0.45 + 0.5 = 0.95; step = 0.5 + 0.855 = 1.355
        assert!((p[0] - (0.905 - 0.1355)).abs() < 1e-6);

        // Dampening applies from the second step on; the first buffer is the plain gradient.
        let mut o = Sgd::new(0.5, 0.5, false, 0.0);
        let mut p = vec![0.0f32];
        o.step(&mut p, &[1.0], 1.0);
        assert_eq!(p[0], -1.0);
        o.step(&mut p, &[1.0], 1.0);
        // buf = 0.5 * 1 + 0.5 * 1 = 1
        assert_eq!(p[0], -2.0);

        // Plain SGD with weight decay.
        let mut o = Sgd::new(0.0, 0.0, false, 0.1);
        let mut p = vec![2.0f32, -1.0];
        o.step(&mut p, &[0.0, 1.0], 0.5);
        assert!((p[0] - 1.9).abs() < 1e-7 && (p[1] - (-1.0 - 0.5 * 0.9)).abs() < 1e-7);
        assert!(o.buf.is_none());
    }

    /// The chunked, parallel update equals the plain loop, bit for bit, across chunk edges.
    #[test]
    fn chunks_on_threads_match_one_pass() {
        let n = 2 * CHUNK + 5;
        let mut r = crate::rng::Rng::new(9);
        let mut v = || (0..n).map(|_| r.normal()).collect::<Vec<f32>>();
        let (p0, g1, g2) = (v(), v(), v());
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for (m, nesterov) in [(0.0, false), (0.9, false), (0.9, true)] {
            let mut o = Sgd::new(m, 0.1, nesterov, 1e-4);
            let mut p = p0.clone();
            pool.install(|| {
                o.step(&mut p, &g1, 0.1);
                o.step(&mut p, &g2, 0.1)
            });
            // The same rule, one element at a time.
            let (mut want, mut buf) = (p0.clone(), vec![0.0f32; n]);
            for (step, g) in [&g1, &g2].into_iter().enumerate() {
                for i in 0..n {
                    let d = g[i] + 1e-4 * want[i];
                    buf[i] = if step == 0 { d } else { m * buf[i] + 0.9 * d };
                    let s = if nesterov { d + m * buf[i] } else { buf[i] };
                    want[i] -= 0.1 * if m == 0.0 { d } else { s };
                }
            }
            assert_eq!(p, want, "momentum {m} nesterov {nesterov}");
        }
    }
}
