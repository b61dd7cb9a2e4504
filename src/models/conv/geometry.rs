//! Shapes of one convolution: what the input, kernel and parameters imply for the output, checked.

use candle_core::{bail, Result};

/// Stride and zero padding per axis, (height, width).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvParams {
    pub stride: (usize, usize),
    pub padding: (usize, usize),
}

impl ConvParams {
    /// The same stride and padding on both axes.
    pub fn square(stride: usize, padding: usize) -> Self {
        Self {
            stride: (stride, stride),
            padding: (padding, padding),
        }
    }
}

/// Every size of one convolution: input [n, c, h, w], kernel [o, c, kh, kw], output [n, o, oh, ow].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub ph: usize,
    pub pw: usize,
    pub oh: usize,
    pub ow: usize,
}

impl Geometry {
    pub fn new(x: &[usize], k: &[usize], p: ConvParams) -> Result<Self> {
        let (&[n, c, h, w], &[o, kc, kh, kw]) = (x, k) else {
            bail!("conv2d: input {x:?} and kernel {k:?} must both have 4 dimensions");
        };
        let ((sh, sw), (ph, pw)) = (p.stride, p.padding);
        if kc != c {
            bail!("conv2d: input {x:?} has {c} channels, kernel {k:?} expects {kc}");
        }
        if sh == 0 || sw == 0 || kh == 0 || kw == 0 {
            bail!("conv2d: zero stride {:?} or kernel {k:?}", p.stride);
        }
        if h + 2 * ph < kh || w + 2 * pw < kw {
            bail!(
                "conv2d: kernel {kh}x{kw} larger than the padded input {}x{}",
                h + 2 * ph,
                w + 2 * pw
            );
        }
        Ok(Self {
            n,
            c,
            h,
            w,
            o,
            kh,
            kw,
            sh,
            sw,
            ph,
            pw,
            oh: (h + 2 * ph - kh) / sh + 1,
            ow: (w + 2 * pw - kw) / sw + 1,
        })
    }

    /// Rows of an im2col matrix: one per (channel, kernel row, kernel column).
    pub fn ck(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Output positions per sample: the columns of an im2col matrix.
    pub fn l(&self) -> usize {
        self.oh * self.ow
    }

    pub fn input_len(&self) -> usize {
        self.c * self.h * self.w
    }

    pub fn output_dims(&self) -> (usize, usize, usize, usize) {
        (self.n, self.o, self.oh, self.ow)
    }
}
