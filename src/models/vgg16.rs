//! VGG-16 for CIFAR-10 as the authors define it: 13 conv3x3 (with bias) + BN + ReLU in an
//! `nn.Sequential` named `features` (conv at index 0, BN at 1, ReLU at 2, ..., max-pools in
//! between), then a 512 -> 10 linear layer `fc`. About 14.7M parameters. PyTorch's default init
//! (uniform in +-1/sqrt(fan_in) for weights and biases), as the authors' definition leaves it.

use super::batch_norm::BatchNorm;
use super::builder::{Builder, Init};
use super::layers::{Conv2d, Linear};
use candle_core::{Module, Result, Tensor};

/// Output channels per conv; 0 is a 2x2 max-pool.
const PLAN: [usize; 18] = [
    64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0,
];

enum Layer {
    Conv(Conv2d, BatchNorm),
    Pool,
}

pub struct Vgg16 {
    features: Vec<Layer>,
    fc: Linear,
}

fn default_init(fan_in: usize) -> Init {
    let b = 1.0 / (fan_in as f32).sqrt();
    Init::Uniform { lo: -b, hi: b }
}

impl Vgg16 {
    pub fn new(b: &Builder, classes: usize) -> Result<Self> {
        let f = b.pp("features");
        let (mut features, mut index, mut cin) = (Vec::new(), 0, 3);
        for &cout in &PLAN {
            if cout == 0 {
                features.push(Layer::Pool);
                index += 1;
                continue;
            }
            // PyTorch's Conv2d draws its bias from the same bound as its weight.
            let init = default_init(cin * 9);
            let conv = Conv2d::new(&f.pp(index), cin, cout, 3, 1, 1, init, Some(init))?;
            let norm = BatchNorm::new(&f.pp(index + 1), cout)?;
            features.push(Layer::Conv(conv, norm));
            index += 3;
            cin = cout;
        }
        let fc = Linear::new(&b.pp("fc"), 512, classes, true, default_init(512), default_init(512))?;
        Ok(Self { features, fc })
    }

    /// Logits [N, classes] for images [N, 3, 32, 32].
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = x.clone();
        for layer in &self.features {
            y = match layer {
                Layer::Conv(conv, norm) => conv.forward_bn(&y, norm, train, true)?,
                Layer::Pool => y.max_pool2d(2)?,
            };
        }
        self.fc.forward(&y.flatten_from(1)?)
    }
}
