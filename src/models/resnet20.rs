//! ResNet-20 for CIFAR-10 as the authors define it: 3 stages of 3 basic blocks (16, 32, 64 channels),
//! option-A shortcuts (stride-2 subsampling plus zero channels), conv init N(0, sqrt(2 / (k*k*out))),
//! BN weight 1 / bias 0, classifier Kaiming-normal with zero bias. About 0.27M parameters.

use super::add_relu::add_relu;
use super::basic_block::{self, Shortcut};
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
    shortcut: Shortcut,
}

impl BasicBlock {
    fn new(b: &Builder, cin: usize, cout: usize, stride: usize) -> Result<Self> {
        Ok(Self {
            conv_a: conv3x3(&b.pp("conv_a"), cin, cout, stride)?,
            bn_a: BatchNorm::new(&b.pp("bn_a"), cout)?,
            conv_b: conv3x3(&b.pp("conv_b"), cout, cout, 1)?,
            bn_b: BatchNorm::new(&b.pp("bn_b"), cout)?,
            shortcut: if stride != 1 || cin != cout {
                Shortcut::Subsample { extra: cout - cin }
            } else {
                Shortcut::Identity
            },
        })
    }

    /// One op each way where `basic_block` fuses the block (CPU training), the layers apart
    /// otherwise.
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if let Some(out) = self.forward_fused(x, train)? {
            return Ok(out);
        }
        self.forward_apart(x, train)
    }

    fn forward_fused(&self, x: &Tensor, train: bool) -> Result<Option<Tensor>> {
        let Some((a, b)) = self.conv_a.half(&self.bn_a).zip(self.conv_b.half(&self.bn_b)) else {
            return Ok(None);
        };
        basic_block::fused(x, a, b, self.shortcut, train)
    }

    fn forward_apart(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.conv_a.forward_bn(x, &self.bn_a, train, true)?;
        let y = self.conv_b.forward_bn(&y, &self.bn_b, train, false)?;
        let shortcut = match self.shortcut {
            Shortcut::Identity => x.clone(),
            Shortcut::Subsample { extra } => {
                let sub = subsample2(x)?;
                let (n, _, h, w) = sub.dims4()?;
                let zeros = Tensor::zeros((n, extra, h, w), sub.dtype(), sub.device())?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::layers::Conv2d;
    use crate::rng::Rng;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    const NAMES: [&str; 6] = [
        "conv_a.weight",
        "bn_a.weight",
        "bn_a.bias",
        "conv_b.weight",
        "bn_b.weight",
        "bn_b.bias",
    ];

    /// Output, dx, every parameter's gradient and both running statistics of loss = sum(out * r)
    /// for a block built afresh from seed 7, fused or apart.
    fn run(x: &Tensor, r: &Tensor, cout: usize, stride: usize, fused: bool) -> Vec<(String, Vec<f64>)> {
        let vm = VarMap::new();
        let block = BasicBlock::new(&Builder::new(&vm, 7, &Device::Cpu), x.dim(1).unwrap(), cout, stride).unwrap();
        let vars = vm.data().lock().unwrap().clone();
        // BatchNorm weights and biases away from 1 and 0, so that their gradients and the scale matter.
        let mut rng = Rng::new(3);
        for name in ["bn_a.weight", "bn_a.bias", "bn_b.weight", "bn_b.bias"] {
            let v: Vec<f32> = (0..cout).map(|_| rng.normal() * 0.5 + 0.3).collect();
            vars[name].set(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap();
        }
        let xv = Var::from_tensor(x).unwrap();
        let out = if fused {
            block
                .forward_fused(xv.as_tensor(), true)
                .unwrap()
                .expect("the block fuses")
        } else {
            block.forward_apart(xv.as_tensor(), true).unwrap()
        };
        let grads = (&out * r).unwrap().sum_all().unwrap().backward().unwrap();
        let flat = crate::models::conv::tests::flat;
        let mut got = vec![
            ("output".to_string(), flat(&out)),
            ("dx".to_string(), flat(grads.get(xv.as_tensor()).expect("dx"))),
        ];
        for name in NAMES {
            got.push((
                format!("d {name}"),
                flat(grads.get(vars[name].as_tensor()).expect(name)),
            ));
        }
        for name in [
            "bn_a.running_mean",
            "bn_a.running_var",
            "bn_b.running_mean",
            "bn_b.running_var",
        ] {
            got.push((name.to_string(), flat(vars[name].as_tensor())));
        }
        got
    }

    /// The fused block runs the passes of the layers apart in their order, and candle's
    /// zero-then-add accumulation between them is exact: equal results, bit for bit (up to the
    /// sign of zeros, which `==` does not see).
    #[test]
    fn fused_block_matches_the_layers_apart() {
        let mut rng = Rng::new(11);
        // (input, output channels, stride): identity shortcuts, option-A ones with extra zero
        // channels, batch 1, odd channel counts, non-square maps.
        let cases = [
            ([2, 3, 6, 6], 3, 1),
            ([1, 5, 4, 6], 5, 1),
            ([3, 2, 8, 6], 5, 2),
            ([2, 16, 4, 4], 17, 2),
        ];
        for (xs, cout, stride) in cases {
            let n: usize = xs.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.normal() * 1.5 + 0.2).collect();
            let x = Tensor::from_vec(v, &xs, &Device::Cpu).unwrap();
            let out = (xs[0], cout, xs[2] / stride, xs[3] / stride);
            let rv: Vec<f32> = (0..out.0 * out.1 * out.2 * out.3).map(|_| rng.normal()).collect();
            let r = Tensor::from_vec(rv, out, &Device::Cpu).unwrap();
            let want = run(&x, &r, cout, stride, false);
            let got = run(&x, &r, cout, stride, true);
            assert_eq!(got.len(), want.len());
            for ((name, g), (_, w)) in got.iter().zip(&want) {
                assert!(g.iter().all(|v| v.is_finite()) && g.iter().any(|&v| v != 0.0), "{name}");
                assert_eq!(g, w, "{xs:?} -> {cout} stride {stride}: {name}");
            }
        }
    }

    #[test]
    fn evaluation_runs_apart_and_a_bad_shortcut_is_an_error() {
        let vm = VarMap::new();
        let b = Builder::new(&vm, 7, &Device::Cpu);
        let block = BasicBlock::new(&b.pp("block"), 3, 4, 1).unwrap();
        let (a, h) = (
            block.conv_a.half(&block.bn_a).unwrap(),
            block.conv_b.half(&block.bn_b).unwrap(),
        );
        let x = Tensor::ones((2, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let eval = basic_block::fused(&x, a, h, Shortcut::Subsample { extra: 1 }, false).unwrap();
        assert!(eval.is_none(), "evaluation runs apart");
        // The block keeps the map size and widens 3 -> 4: no shortcut of the input fits.
        for bad in [Shortcut::Identity, Shortcut::Subsample { extra: 1 }] {
            let e = basic_block::fused(&x, a, h, bad, true).unwrap_err().to_string();
            assert!(e.contains("does not fit") && e.contains("shortcut"), "{e}");
        }
        let biased = Conv2d::new(&b.pp("c"), 3, 4, 3, 1, 1, Init::Const(0.1), Some(Init::Const(0.0))).unwrap();
        assert!(
            biased.half(&block.bn_a).is_none(),
            "a convolution with a bias does not fuse"
        );
    }
}
