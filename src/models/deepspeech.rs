//! The AN4 acoustic model as the authors ran it (deepspeech.pytorch's DeepSpeech, unidirectional):
//! two Conv2d + BN + Hardtanh(0, 20) over (frequency, time), `layers` LSTMs of `hidden` units with
//! sequence-wise BatchNorm1d on the inputs of every LSTM but the first, a lookahead convolution
//! (context 20) + Hardtanh, and BN + Linear(hidden, 29, no bias). With 161 frequency bins,
//! 5 x 800: about 27.6M parameters. Names follow deepspeech.pytorch's state dict.

use super::batch_norm::BatchNorm;
use super::builder::{Builder, Init};
use super::conv::ConvParams;
use super::layers::{Conv2d, Linear};
use super::lstm::Lstm;
use candle_core::{Module, Result, Tensor};

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
        let bn1 = BatchNorm::new(&seq.pp(1), ch)?;
        let conv2 = Conv2d::with_kernel(&seq.pp(3), ch, ch, (21, 11), p2, conv2_init, Some(conv2_init))?;
        let bn2 = BatchNorm::new(&seq.pp(4), ch)?;
        let f1 = (bins + 2 * 20 - 41) / 2 + 1;
        let f2 = (f1 + 2 * 10 - 21) / 2 + 1;
        let mut rnns = Vec::new();
        for k in 0..layers {
            let r = b.pp("rnns").pp(k);
            let input = if k == 0 { ch * f2 } else { hidden };
            let norm = if k == 0 {
                None
            } else {
                Some(BatchNorm::new(&r.pp("batch_norm").pp("module"), input)?)
            };
            rnns.push((norm, Lstm::new(&r.pp("rnn"), input, hidden, 1, 0.0)?));
        }
        let lookahead = b
            .pp("lookahead")
            .pp("conv")
            .var("weight", (hidden, 1, CONTEXT + 1), uniform(CONTEXT + 1))?;
        let fc = b.pp("fc").pp(0).pp("module");
        let fc_bn = BatchNorm::new(&fc.pp(0), hidden)?;
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

    /// Log-probabilities [T', N, classes] (time-major, for CTC) of spectrograms [N, 1, bins, T],
    /// utterance n holding `frames[n]` frames and zeros after them. An utterance's valid outputs
    /// (its first `output_frames(frames[n])`) do not depend on the padding, hence not on what
    /// else is in its batch: as deepspeech.pytorch's MaskConv, the padded steps are zeroed after
    /// every conv, BN and activation (a BN shift would otherwise turn zero padding into values the
    /// next conv reads), and the LSTM outputs are zeroed there before the lookahead convolution
    /// looks ahead into them. The unidirectional LSTM needs no mask of its own: its valid steps
    /// never see later ones.
    pub fn forward(&self, x: &Tensor, frames: &[usize], train: bool) -> Result<Tensor> {
        let (n, _, _, t_in) = x.dims4()?;
        if frames.len() != n || frames.iter().any(|&f| f == 0 || f > t_in) {
            candle_core::bail!("DeepSpeech: frame counts {frames:?} for a batch of {n} x {t_in} frames");
        }
        let lengths: Vec<usize> = frames.iter().map(|&f| output_frames(f)).collect();
        // Conv 1: padding (20, 5), stride (2, 2); conv 2: padding (10, 5), stride (2, 1), so the
        // time axis keeps conv 1's length.
        let y = self.conv1.forward(x)?;
        let mask = time_mask(&lengths, y.dim(3)?, (n, 1, 1, ()), y.device())?;
        let y = y.broadcast_mul(&mask)?;
        let y = hardtanh(&self.bn1.forward_t(&y, train)?.broadcast_mul(&mask)?)?;
        let y = self.conv2.forward(&y)?.broadcast_mul(&mask)?;
        let y = hardtanh(&self.bn2.forward_t(&y, train)?.broadcast_mul(&mask)?)?;
        let (n, c, f, t) = y.dims4()?;
        let step_mask = time_mask(&lengths, t, (n, t), y.device())?.t()?.reshape((t, n, 1))?;
        // [N, C * F, T] -> [T, N, C * F]
        let mut h = y.reshape((n, c * f, t))?.permute((2, 0, 1))?.contiguous()?;
        for (norm, lstm) in &self.rnns {
            if let Some(norm) = norm {
                let d = h.dim(2)?;
                h = norm.forward_t(&h.reshape((t * n, d))?, train)?.reshape((t, n, d))?;
            }
            let state = lstm.zero_state(n, h.device())?;
            h = lstm.forward(&h, &state, None)?.0.broadcast_mul(&step_mask)?;
        }
        let h = hardtanh(&self.lookahead_conv(&h)?)?;
        let d = h.dim(2)?;
        let z = self.fc_bn.forward_t(&h.reshape((t * n, d))?, train)?;
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

/// 1 at time steps t < lengths[n] of row n, 0 after; [N, T] reshaped to `shape`.
fn time_mask(
    lengths: &[usize],
    t: usize,
    shape: impl candle_core::shape::ShapeWithOneHole,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let m: Vec<f32> = lengths
        .iter()
        .flat_map(|&len| (0..t).map(move |i| if i < len { 1.0 } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (lengths.len(), t), dev)?.reshape(shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ctc::{ctc_loss, greedy_decode, CtcOptions};
    use crate::rng::Rng;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    /// A tiny model whose BatchNorms shift zero away from zero (as trained ones do), so that
    /// unmasked padding would leak into the valid frames.
    fn model() -> DeepSpeech {
        let vm = VarMap::new();
        let net = DeepSpeech::new(&Builder::new(&vm, 9, &Device::Cpu), 161, 2, 6, 2, 29).unwrap();
        let mut rng = Rng::new(4);
        for (name, v) in vm.data().lock().unwrap().iter() {
            let n = v.elem_count();
            let is_bn = ["seq_module.1.", "seq_module.4.", "batch_norm.", "fc.0.module.0."]
                .iter()
                .any(|p| name.contains(p));
            let vals: Vec<f32> = match name.rsplit('.').next() {
                _ if !is_bn => continue,
                Some("running_var") => (0..n).map(|_| 0.5 + rng.uniform()).collect(),
                Some("bias" | "running_mean") => (0..n).map(|_| rng.normal() * 0.5).collect(),
                _ => continue,
            };
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
        net
    }

    /// Log-probs, per-utterance CTC losses and greedy transcripts of utterances `feats`
    /// ([161, frames] each), zero-padded into one batch.
    fn run(net: &DeepSpeech, feats: &[Vec<f32>], targets: &[Vec<u32>]) -> (Vec<f64>, Vec<Vec<u32>>) {
        let frames: Vec<usize> = feats.iter().map(|f| f.len() / 161).collect();
        let max = *frames.iter().max().unwrap();
        let mut x = vec![0f32; feats.len() * 161 * max];
        for (n, f) in feats.iter().enumerate() {
            for bin in 0..161 {
                let row = &f[bin * frames[n]..(bin + 1) * frames[n]];
                x[(n * 161 + bin) * max..][..frames[n]].copy_from_slice(row);
            }
        }
        let x = Tensor::from_vec(x, (feats.len(), 1, 161, max), &Device::Cpu).unwrap();
        let lp = net.forward(&x, &frames, false).unwrap();
        let (t, n, c) = lp.dims3().unwrap();
        let host = lp
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let lengths: Vec<usize> = frames.iter().map(|&f| output_frames(f)).collect();
        let flat: Vec<u32> = targets.concat();
        let tl: Vec<usize> = targets.iter().map(Vec::len).collect();
        let out = ctc_loss(&host, t, n, c, &lengths, &flat, &tl, CtcOptions::default()).unwrap();
        (out.losses, greedy_decode(&host, t, n, c, &lengths, 0).unwrap())
    }

    /// Each utterance alone and inside a padded batch (odd and even lengths, the longest first
    /// or not) gives the same loss and the same transcript.
    #[test]
    fn padding_changes_no_utterance() {
        let net = model();
        let mut rng = Rng::new(8);
        let lens = [17usize, 30, 24, 9];
        let feats: Vec<Vec<f32>> = lens
            .iter()
            .map(|&f| (0..161 * f).map(|_| rng.normal()).collect())
            .collect();
        let targets: Vec<Vec<u32>> = vec![vec![3, 5], vec![1, 2, 7], vec![4], vec![9]];
        let (batch_losses, batch_hyps) = run(&net, &feats, &targets);
        for k in 0..lens.len() {
            let (l, h) = run(&net, &feats[k..k + 1], &targets[k..k + 1]);
            let rel = ((l[0] - batch_losses[k]) / l[0]).abs();
            assert!(
                rel < 1e-5,
                "utterance {k}: alone {} in the batch {}",
                l[0],
                batch_losses[k]
            );
            assert_eq!(h[0], batch_hyps[k], "utterance {k}'s transcript");
        }
        // A batch of two, in the other order, agrees too.
        let (l, _) = run(
            &net,
            &[feats[3].clone(), feats[1].clone()],
            &[targets[3].clone(), targets[1].clone()],
        );
        assert!(((l[0] - batch_losses[3]) / l[0]).abs() < 1e-5 && ((l[1] - batch_losses[1]) / l[1]).abs() < 1e-5);
    }
}
