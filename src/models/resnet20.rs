//! ResNet-20 for CIFAR-10 as the authors define it: 3 stages of 3 basic blocks (16, 32, 64 channels),
//! option-A shortcuts (stride-2 subsampling plus zero channels), conv init N(0, sqrt(2 / (k*k*out))),
//! BN weight 1 / bias 0, classifier Kaiming-normal with zero bias. About 0.27M parameters.

use super::add_relu::add_relu;
use super::batch_norm::BatchNorm;
use super::builder::{Builder, Init};
use super::layers::{Conv2d, Linear};
use candle_core::{Module, Result, Tensor};

const BLOCKS: usize = 3;
const WIDTHS: [usize; 3] = [16, 32, 64];

fn conv3x3(b: &Builder, cin: usize, cout: usize, stride: usize) -> Result<Conv2d> {
    let std = (2.0 / (9.0 * cout as f32)).sqrt();
    Conv2d::new(b, cin, cout, 3, stride, 1, Init::Normal { std }, None)
}

struct BasicBlock {
    conv_a: Conv2d,
    bn_a: BatchNorm,
    conv_b: Conv2d,
    bn_b: BatchNorm,
    /// Option-A shortcut: the input subsampled by 2 and padded with zero channels.
    downsample: Option<usize>,
}

impl BasicBlock {
    fn new(b: &Builder, cin: usize, cout: usize, stride: usize) -> Result<Self> {
        Ok(Self {
            conv_a: conv3x3(&b.pp("conv_a"), cin, cout, stride)?,
            bn_a: BatchNorm::new(&b.pp("bn_a"), cout)?,
            conv_b: conv3x3(&b.pp("conv_b"), cout, cout, 1)?,
            bn_b: BatchNorm::new(&b.pp("bn_b"), cout)?,
            downsample: (stride != 1 || cin != cout).then_some(cout - cin),
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.conv_a.forward_bn(x, &self.bn_a, train, true)?;
        let y = self.conv_b.forward_bn(&y, &self.bn_b, train, false)?;
        let shortcut = match self.downsample {
            None => x.clone(),
            Some(extra) => {
                let sub = subsample2(x)?;
                let zeros = sub.narrow(1, 0, extra)?.zeros_like()?;
                Tensor::cat(&[&sub, &zeros], 1)?
            }
        };
        add_relu(&shortcut, &y)
    }
}

/// x[:, :, ::2, ::2] (PyTorch's AvgPool2d(1, stride=2)); candle's avg-pool has no backward for
/// a kernel smaller than its stride, so pick the even rows and columns through a reshape.
fn subsample2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        candle_core::bail!("ResNet-20 shortcut needs even feature maps, got {h}x{w}");
    }
    x.reshape((n, c, h / 2, 2, w / 2, 2))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((n, c, h / 2, w / 2))
}

pub struct ResNet20 {
    conv: Conv2d,
    bn: BatchNorm,
    blocks: Vec<BasicBlock>,
    classifier: Linear,
}

impl ResNet20 {
    pub fn new(b: &Builder, classes: usize) -> Result<Self> {
        let conv = conv3x3(&b.pp("conv_1_3x3"), 3, WIDTHS[0], 1)?;
        let bn = BatchNorm::new(&b.pp("bn_1"), WIDTHS[0])?;
        let mut blocks = Vec::new();
        let mut cin = WIDTHS[0];
        for (s, &w) in WIDTHS.iter().enumerate() {
            for i in 0..BLOCKS {
                let stride = if s > 0 && i == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::new(&b.pp(format!("stage_{}.{i}", s + 1)), cin, w, stride)?);
                cin = w;
            }
        }
        let fan_in = WIDTHS[2] as f32;
        let classifier = Linear::new(
            &b.pp("classifier"),
            WIDTHS[2],
            classes,
            true,
            Init::Normal {
                std: (2.0 / fan_in).sqrt(),
            },
            Init::Const(0.0),
        )?;
        Ok(Self {
            conv,
            bn,
            blocks,
            classifier,
        })
    }

    /// Logits [N, classes] for images [N, 3, H, W].
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = self.conv.forward_bn(x, &self.bn, train, true)?;
        for block in &self.blocks {
            y = block.forward(&y, train)?;
        }
        let pooled = y.mean(3)?.mean(2)?;
        self.classifier.forward(&pooled)
    }
}
