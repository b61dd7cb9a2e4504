//! Every trained tensor of every architecture reaches the loss: perturbing any one changes it, and
//! after one SGD step every tensor with a gradient has moved and is what the forward reads. A layer
//! that caches a tensor computed from its parameters at construction (the LSTM's summed biases
//! once did) fails here, because writes into the parameter no longer reach the forward.

use super::deepspeech::output_frames;
use super::{Model, Net};
use crate::config::{Arch, ModelConfig};
use crate::models::ctc::{CtcLoss, CtcOptions, CtcReduction};
use crate::models::lstm::State;
use crate::rng::Rng;
use candle_core::{DType, Device, Tensor};

fn tiny(arch: Arch) -> (Model, usize) {
    let cfg = ModelConfig {
        arch,
        hidden: Some(6),
        layers: Some(2),
        conv_channels: Some(2),
        dropout: Some(0.0),
        ..ModelConfig::default()
    };
    let outputs = match arch {
        Arch::Resnet20 | Arch::Vgg16 => 10,
        Arch::LstmPtb => 12,
        Arch::LstmAn4 => 29,
    };
    (Model::build(&cfg, outputs, 3, &Device::Cpu).unwrap(), outputs)
}

fn randn(rng: &mut Rng, shape: &[usize], scale: f32) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() * scale).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// One fixed batch per architecture, and its loss (BN in training or evaluation mode).
struct Batch {
    x: Tensor,
    y: Vec<u32>,
}

fn batch(arch: Arch, outputs: usize) -> Batch {
    let mut rng = Rng::new(11);
    let x = match arch {
        Arch::Resnet20 => randn(&mut rng, &[2, 3, 8, 8], 1.0),
        Arch::Vgg16 => randn(&mut rng, &[2, 3, 32, 32], 1.0),
        Arch::LstmPtb => {
            let ids: Vec<u32> = (0..5 * 2).map(|i| (i * 7 % outputs) as u32).collect();
            Tensor::from_vec(ids, (5, 2), &Device::Cpu).unwrap()
        }
        Arch::LstmAn4 => randn(&mut rng, &[2, 1, 161, 24], 1.0),
    };
    let y = match arch {
        Arch::LstmPtb => (0..5 * 2).map(|i| ((i * 3 + 1) % outputs) as u32).collect(),
        // Two utterances' targets, concatenated (lengths 3 and 2).
        Arch::LstmAn4 => vec![3, 5, 7, 2, 9],
        _ => vec![1, 4],
    };
    Batch { x, y }
}

fn loss(model: &Model, b: &Batch, train: bool) -> Tensor {
    let dev = &Device::Cpu;
    match model.net() {
        Net::Resnet20(_) | Net::Vgg16(_) => {
            let logits = model.forward(&b.x, train).unwrap();
            candle_nn::loss::cross_entropy(&logits, &Tensor::new(b.y.as_slice(), dev).unwrap()).unwrap()
        }
        Net::PtbLm(lm) => {
            let state: State = lm.zero_state(2, dev).unwrap();
            let (logits, _) = lm.forward(&b.x, &state, None).unwrap();
            candle_nn::loss::cross_entropy(&logits, &Tensor::new(b.y.as_slice(), dev).unwrap()).unwrap()
        }
        Net::An4(net) => {
            let frames = b.x.dim(3).unwrap();
            let lp = net.forward(&b.x, &[frames, frames - 6], train).unwrap();
            CtcLoss::new(
                vec![output_frames(frames), output_frames(frames - 6)],
                b.y.clone(),
                vec![3, 2],
                CtcOptions::default(),
                CtcReduction::Sum,
            )
            .apply(&lp)
            .unwrap()
        }
    }
}

fn scalar(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap()
}

/// Each parameter, replaced by a perturbed copy, changes the evaluation loss; restored, the loss
/// is back bit for bit.
fn perturbing_each_tensor_changes_the_loss(model: &Model, b: &Batch) {
    let base = scalar(&loss(model, b, false));
    assert!(base.is_finite(), "{:?}: loss {base}", model.arch);
    let mut rng = Rng::new(5);
    for (name, v) in model.params() {
        let old = v.as_tensor().copy().unwrap();
        let scale = old.sqr().unwrap().mean_all().unwrap().sqrt().unwrap();
        let scale = scalar(&scale) + 0.1;
        v.set(&(&old + randn(&mut rng, old.dims(), 0.5 * scale)).unwrap())
            .unwrap();
        let moved = scalar(&loss(model, b, false));
        v.set(&old).unwrap();
        assert_ne!(
            moved, base,
            "{:?}: perturbing {name} leaves the loss at {base}",
            model.arch
        );
    }
    assert_eq!(scalar(&loss(model, b, false)), base, "{:?}: restoring", model.arch);
}

/// One plain SGD step on the flat vector: every tensor whose gradient is non-zero changes, and
/// only those.
fn one_sgd_step_moves_every_tensor_with_a_gradient(model: &Model, b: &Batch) {
    let grads = loss(model, b, true).backward().unwrap();
    let mut g = vec![0f32; model.num_params()];
    model.flat_grad(&grads, &mut g).unwrap();
    let before = model.flat_params().unwrap();
    let lr = 0.05f32;
    let after: Vec<f32> = before.iter().zip(&g).map(|(p, g)| p - lr * g).collect();
    model.set_flat_params(&after).unwrap();
    let now = model.flat_params().unwrap();
    let mut off = 0;
    for ((name, _), n) in model.params().iter().zip(model.param_sizes()) {
        let r = off..off + n;
        off += n;
        let has_grad = g[r.clone()].iter().any(|&x| x != 0.0);
        let moved = now[r.clone()] != before[r.clone()];
        // A gradient too small to move any value of its tensor in f32 counts as none.
        let movable = g[r.clone()].iter().zip(&before[r]).any(|(g, p)| p - lr * g != *p);
        assert_eq!(
            moved, movable,
            "{:?}: {name} (gradient non-zero: {has_grad})",
            model.arch
        );
        // In training mode a bias right before a BatchNorm is cancelled by the batch mean: its
        // gradient is zero up to rounding. Every other tensor must have moved.
        assert!(
            movable || before_batch_norm(model, name),
            "{:?}: {name} did not move (gradient non-zero: {has_grad})",
            model.arch
        );
    }
}

/// Whether `name` is the bias of a layer `prefix.i` that a BatchNorm `prefix.(i + 1)` follows
/// (VGG-16's convolutions, AN4's two).
fn before_batch_norm(model: &Model, name: &str) -> bool {
    let Some(layer) = name.strip_suffix(".bias") else {
        return false;
    };
    let Some((prefix, index)) = layer.rsplit_once('.') else {
        return false;
    };
    let Ok(i) = index.parse::<usize>() else {
        return false;
    };
    let next = format!("{prefix}.{}.running_mean", i + 1);
    model.buffers.iter().any(|(b, _)| *b == next)
}

/// Running statistics as a trained model has them: from (mean 0, var 1), one training-mode
/// forward updates each BatchNorm's running stats with momentum 0.1; undoing that momentum leaves
/// the batch's own statistics. With the initial (0, 1) an untrained deep net in evaluation mode
/// explodes or vanishes, and a perturbation drowns in f32 rounding.
fn calibrate_batch_norm(model: &Model, b: &Batch) {
    for (name, v) in &model.buffers {
        let init = if name.ends_with("running_var") { 1.0 } else { 0.0 };
        v.set(&v.as_tensor().ones_like().unwrap().affine(init, 0.0).unwrap())
            .unwrap();
    }
    loss(model, b, true);
    for (name, v) in &model.buffers {
        let t = v.as_tensor();
        let batch_stat = if name.ends_with("running_var") {
            ((t - 0.9).unwrap() * 10.0).unwrap().clamp(1e-3f32, f32::MAX).unwrap()
        } else {
            (t * 10.0).unwrap()
        };
        v.set(&batch_stat).unwrap();
    }
}

fn check(arch: Arch) {
    let (model, outputs) = tiny(arch);
    let b = batch(arch, outputs);
    calibrate_batch_norm(&model, &b);
    perturbing_each_tensor_changes_the_loss(&model, &b);
    one_sgd_step_moves_every_tensor_with_a_gradient(&model, &b);
    calibrate_batch_norm(&model, &b);
    // The forward reads the stepped values: perturbing still works from the new point, and the
    // stepped model's loss differs from the initial one.
    perturbing_each_tensor_changes_the_loss(&model, &b);
    let (fresh, _) = tiny(arch);
    assert_ne!(
        scalar(&loss(&model, &b, false)),
        scalar(&loss(&fresh, &b, false)),
        "{arch:?}: the step did not reach the forward"
    );
}

#[test]
fn resnet20_every_tensor_counts() {
    check(Arch::Resnet20);
}

#[test]
fn vgg16_every_tensor_counts() {
    check(Arch::Vgg16);
}

#[test]
fn lstm_ptb_every_tensor_counts() {
    check(Arch::LstmPtb);
}

#[test]
fn lstm_an4_every_tensor_counts() {
    check(Arch::LstmAn4);
}
