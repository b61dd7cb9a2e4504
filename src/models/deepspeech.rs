//! The AN4 acoustic model as the authors ran it (deepspeech.pytorch's DeepSpeech, unidirectional):
//! two Conv2d + BN + Hardtanh(0, 20) over (frequency, time), `layers` LSTMs of `hidden` units with
//! sequence-wise BatchNorm1d on the inputs of every LSTM but the first, a lookahead convolution
//! (context 20) + Hardtanh, and BN + Linear(hidden, 29, no bias). With 161 frequency bins,
//! 5 x 800: about 27.6M parameters. Names follow deepspeech.pytorch's state dict.

use super::builder::{Builder, Init};
use super::conv::ConvParams;
use super::layers::{batch_norm, bn, Conv2d, Linear};
use super::lstm::Lstm;
use candle_core::{Module, Result, Tensor};
use candle_nn::BatchNorm;

const CONTEXT: usize = 20;

pub struct DeepSpeech {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    rnns: Vec<(Option<BatchNorm>, Lstm)>,
    lookahead: Tensor,
    fc_bn: BatchNorm,
    fc: Linear,
}

fn uniform(fan_in: usize) -> Init {
    let b = 1.0 / (fan_in as f32).sqrt();
    Init::Uniform { lo: -b, hi: b }
}

fn hardtanh(x: &Tensor) -> Result<Tensor> {
    x.clamp(0f32, 20f32)
}

/// Frames after the two convolutions (time stride 2, then 1).
pub fn output_frames(frames: usize) -> usize {
    (frames + 2 * 5 - 11) / 2 + 1
}

impl DeepSpeech {
    pub fn new(b: &Builder, bins: usize, ch: usize, hidden: usize, layers: usize, classes: usize) -> Result<Self> {
        let seq = b.pp("conv").pp("seq_module");
        let conv1_init = uniform(41 * 11);
        let conv2_init = uniform(ch * 21 * 11);
        // Kernels (41, 11) and (21, 11) over (frequency, time), as deepspeech.pytorch.
        let p1 = ConvParams {
            stride: (2, 2),
            padding: (20, 5),
        };
        let p2 = ConvParams {
            stride: (2, 1),
            padding: (10, 5),
        };
        let conv1 = Conv2d::with_kernel(&seq.pp(0), 1, ch, (41, 11), p1, conv1_init, Some(conv1_init))?;
        let bn1 = batch_norm(&seq.pp(1), ch)?;
        let conv2 = Conv2d::with_kernel(&seq.pp(3), ch, ch, (21, 11), p2, conv2_init, Some(conv2_init))?;
        let bn2 = batch_norm(&seq.pp(4), ch)?;
        let f1 = (bins + 2 * 20 - 41) / 2 + 1;
        let f2 = (f1 + 2 * 10 - 21) / 2 + 1;
        let mut rnns = Vec::new();
        for k in 0..layers {
            let r = b.pp("rnns").pp(k);
            let input = if k == 0 { ch * f2 } else { hidden };
            let norm = if k == 0 {
                None
            } else {
                Some(batch_norm(&r.pp("batch_norm").pp("module"), input)?)
            };
            rnns.push((norm, Lstm::new(&r.pp("rnn"), input, hidden, 1, 0.0)?));
        }
        let lookahead = b
            .pp("lookahead")
            .pp("conv")
            .var("weight", (hidden, 1, CONTEXT + 1), uniform(CONTEXT + 1))?;
        let fc = b.pp("fc").pp(0).pp("module");
        let fc_bn = batch_norm(&fc.pp(0), hidden)?;
        let fc = Linear::new(&fc.pp(1), hidden, classes, false, uniform(hidden), Init::Const(0.0))?;
        Ok(Self {
            conv1,
            bn1,
            conv2,
            bn2,
            rnns,
            lookahead,
            fc_bn,
            fc,
        })
    }

    /// Log-probabilities [T', N, classes] (time-major, for CTC) of spectrograms [N, 1, bins, T].
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = hardtanh(&bn(&self.bn1, &self.conv1.forward(x)?, train)?)?;
        let y = hardtanh(&bn(&self.bn2, &self.conv2.forward(&y)?, train)?)?;
        let (n, c, f, t) = y.dims4()?;
        // [N, C * F, T] -> [T, N, C * F]
        let mut h = y.reshape((n, c * f, t))?.permute((2, 0, 1))?.contiguous()?;
        for (norm, lstm) in &self.rnns {
            if let Some(norm) = norm {
                let d = h.dim(2)?;
                h = bn(norm, &h.reshape((t * n, d))?, train)?.reshape((t, n, d))?;
            }
            let state = lstm.zero_state(n, h.device())?;
            h = lstm.forward(&h, &state, None)?.0;
        }
        let h = hardtanh(&self.lookahead_conv(&h)?)?;
        let d = h.dim(2)?;
        let z = bn(&self.fc_bn, &h.reshape((t * n, d))?, train)?;
        let logits = self.fc.forward(&z)?.reshape((t, n, ()))?;
        candle_nn::ops::log_softmax(&logits, 2)
    }

    /// Depthwise convolution over the next CONTEXT frames (zero-padded at the end): out[t] =
    /// sum_j w[:, j] * x[t + j].
    fn lookahead_conv(&self, x: &Tensor) -> Result<Tensor> {
        let (t, n, d) = x.dims3()?;
        let padded = x.pad_with_zeros(0, 0, CONTEXT)?;
        let w = self.lookahead.reshape((d, CONTEXT + 1))?;
        let mut out = Tensor::zeros((t, n, d), x.dtype(), x.device())?;
        for j in 0..=CONTEXT {
            let wj = w.narrow(1, j, 1)?.reshape((1, 1, d))?;
            out = (out + padded.narrow(0, j, t)?.broadcast_mul(&wj)?)?;
        }
        Ok(out)
    }
}
