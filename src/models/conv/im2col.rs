//! im2col and its adjoint col2im for one sample: the column matrix [C*KH*KW, OH*OW] whose row
//! (c, a, b) holds x[c, u*sh + a - ph, v*sw + b - pw] at column (u, v), zero where that falls in
//! the padding. col2im adds such a matrix back onto the input positions it was read from.
//!
//! A matrix may sit inside a wider one (`ld`, its row stride, at least OH*OW): the CPU convolution
//! lays the column matrices of a group of samples side by side, so that one GEMM serves them all.

use super::geometry::Geometry;
use std::ops::AddAssign;

/// The output columns v whose input column v*s + b - p lies inside [0, len): a contiguous range.
fn valid(out: usize, len: usize, s: usize, b: usize, p: usize) -> (usize, usize) {
    let lo = if p > b { (p - b).div_ceil(s) } else { 0 };
    let hi = if len + p > b {
        (len + p - b).div_ceil(s).min(out)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// Fills the column matrix at the start of `col` (row stride `ld`) from one sample `x` (len c * h * w).
pub fn im2col<T: Copy + Default>(g: &Geometry, x: &[T], col: &mut [T], ld: usize) {
    let (l, ow) = (g.l(), g.ow);
    for c in 0..g.c {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for a in 0..g.kh {
            let (u_lo, u_hi) = valid(g.oh, g.h, g.sh, a, g.ph);
            for b in 0..g.kw {
                let (v_lo, v_hi) = valid(ow, g.w, g.sw, b, g.pw);
                let row = &mut col[((c * g.kh + a) * g.kw + b) * ld..][..l];
                row[..u_lo * ow].fill(T::default());
                row[u_hi * ow..].fill(T::default());
                for u in u_lo..u_hi {
                    let src = &plane[(u * g.sh + a - g.ph) * g.w..][..g.w];
                    let dst = &mut row[u * ow..(u + 1) * ow];
                    dst[..v_lo].fill(T::default());
                    dst[v_hi..].fill(T::default());
                    if g.sw == 1 {
                        let x0 = v_lo + b - g.pw;
                        dst[v_lo..v_hi].copy_from_slice(&src[x0..x0 + (v_hi - v_lo)]);
                    } else {
                        for v in v_lo..v_hi {
                            dst[v] = src[v * g.sw + b - g.pw];
                        }
                    }
                }
            }
        }
    }
}

/// Adds the column matrix at the start of `col` (row stride `ld`) onto one sample's input gradient
/// `dx` (len c * h * w).
pub fn col2im<T: Copy + AddAssign>(g: &Geometry, col: &[T], dx: &mut [T], ld: usize) {
    let (l, ow) = (g.l(), g.ow);
    for c in 0..g.c {
        let plane = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for a in 0..g.kh {
            let (u_lo, u_hi) = valid(g.oh, g.h, g.sh, a, g.ph);
            for b in 0..g.kw {
                let (v_lo, v_hi) = valid(ow, g.w, g.sw, b, g.pw);
                let row = &col[((c * g.kh + a) * g.kw + b) * ld..][..l];
                for u in u_lo..u_hi {
                    let dst = &mut plane[(u * g.sh + a - g.ph) * g.w..][..g.w];
                    let src = &row[u * ow..(u + 1) * ow];
                    if g.sw == 1 {
                        let x0 = v_lo + b - g.pw;
                        for (d, &s) in dst[x0..x0 + (v_hi - v_lo)].iter_mut().zip(&src[v_lo..v_hi]) {
                            *d += s;
                        }
                    } else {
                        for v in v_lo..v_hi {
                            dst[v * g.sw + b - g.pw] += src[v];
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::conv::ConvParams;

    /// col2im is the adjoint of im2col: <im2col(x), y> == <x, col2im(y)> for any x, y.
    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        let mut r = crate::rng::Rng::new(5);
        for (h, w, k, s, p) in [
            (5, 7, (3, 2), (2, 1), (1, 0)),
            (4, 4, (1, 1), (1, 1), (0, 0)),
            (6, 3, (3, 3), (2, 2), (2, 1)),
        ] {
            let p = ConvParams { stride: s, padding: p };
            let g = Geometry::new(&[1, 2, h, w], &[3, 2, k.0, k.1], p).unwrap();
            let x: Vec<f64> = (0..g.input_len()).map(|_| r.normal() as f64).collect();
            let y: Vec<f64> = (0..g.ck() * g.l()).map(|_| r.normal() as f64).collect();
            let mut col = vec![f64::NAN; y.len()];
            im2col(&g, &x, &mut col, g.l());
            let mut back = vec![0.0; x.len()];
            col2im(&g, &y, &mut back, g.l());
            let lhs: f64 = col.iter().zip(&y).map(|(a, b)| a * b).sum();
            let rhs: f64 = x.iter().zip(&back).map(|(a, b)| a * b).sum();
            assert!((lhs - rhs).abs() < 1e-9 * (1.0 + lhs.abs()), "{lhs} vs {rhs} for {g:?}");

            // Inside a wider matrix (row stride l + 3, at column 2) the same values land, and
            // nothing outside the sample's columns is touched.
            let (l, ld) = (g.l(), g.l() + 3);
            let mut wide = vec![f64::NAN; g.ck() * ld];
            im2col(&g, &x, &mut wide[2..], ld);
            for r in 0..g.ck() {
                assert_eq!(&wide[r * ld + 2..][..l], &col[r * l..][..l], "row {r} of {g:?}");
                assert!(wide[r * ld..r * ld + 2].iter().all(|v| v.is_nan()));
            }
            let mut wide_y = vec![0.0; g.ck() * ld + 2];
            for r in 0..g.ck() {
                wide_y[r * ld + 2..][..l].copy_from_slice(&y[r * l..][..l]);
            }
            let mut back_wide = vec![0.0; x.len()];
            col2im(&g, &wide_y[2..], &mut back_wide, ld);
            assert_eq!(back_wide, back, "col2im from a wider matrix, {g:?}");
        }
    }
}
