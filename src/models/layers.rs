//! The few layers our models share, built on `Builder` so their parameters get seeded init and
//! PyTorch names.

use super::batch_norm::BatchNorm;
use super::builder::{Builder, Init};
use super::conv::{self, ConvParams};
use candle_core::{Module, Result, Tensor};

/// 2-D convolution, weight [out, in, kh, kw], and a bias when `bias` says how to initialise one.
/// Runs on our own convolution (`conv`), whose three passes are GEMMs on every device.
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    params: ConvParams,
}

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: &Builder,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        init: Init,
        bias: Option<Init>,
    ) -> Result<Self> {
        Self::with_kernel(b, cin, cout, (k, k), ConvParams::square(stride, padding), init, bias)
    }

    /// A rectangular (height, width) kernel with per-axis stride and padding.
    pub fn with_kernel(
        b: &Builder,
        cin: usize,
        cout: usize,
        kernel: (usize, usize),
        params: ConvParams,
        init: Init,
        bias: Option<Init>,
    ) -> Result<Self> {
        let weight = b.var("weight", (cout, cin, kernel.0, kernel.1), init)?;
        let bias = match bias {
            Some(i) => Some(b.var("bias", cout, i)?),
            None => None,
        };
        Ok(Self { weight, bias, params })
    }
}

impl Conv2d {
    /// This convolution and `bn`, as one half of a fused ResNet block; `None` with a bias, which
    /// the block op does not take.
    pub(in crate::models) fn half<'a>(&'a self, bn: &'a BatchNorm) -> Option<super::basic_block::Half<'a>> {
        self.bias.is_none().then_some(super::basic_block::Half {
            kernel: &self.weight,
            params: self.params,
            bn,
        })
    }

    /// This convolution, then `bn`, then a ReLU if `relu`: one op each way where `conv_bn` fuses
    /// them (CPU training), the layers one by one otherwise.
    pub fn forward_bn(&self, x: &Tensor, bn: &BatchNorm, train: bool, relu: bool) -> Result<Tensor> {
        let fused = super::conv_bn::fused(x, &self.weight, self.bias.as_ref(), self.params, bn, (train, relu))?;
        if let Some(z) = fused {
            return Ok(z);
        }
        let y = self.forward(x)?;
        if relu {
            bn.forward_relu(&y, train)
        } else {
            bn.forward_t(&y, train)
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = conv::conv2d(x, &self.weight, self.params)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(b: &Builder, cin: usize, cout: usize, bias: bool, w_init: Init, b_init: Init) -> Result<Self> {
        let weight = b.var("weight", (cout, cin), w_init)?;
        let bias = if bias { Some(b.var("bias", cout, b_init)?) } else { None };
        Ok(Self { weight, bias })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
