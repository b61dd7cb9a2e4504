//! CIFAR training augmentation: 4-pixel zero padding with a random 32x32 crop, a random horizontal
//! flip, then per-channel normalisation.

use super::{MEAN, STD};
use crate::rng::Rng;

const PAD: i64 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Jitter {
    pub dx: i64,
    pub dy: i64,
    pub flip: bool,
}

impl Jitter {
    pub const NONE: Jitter = Jitter {
        dx: 0,
        dy: 0,
        flip: false,
    };

    pub fn draw(rng: &mut Rng) -> Jitter {
        let span = 2 * PAD as u64 + 1;
        Jitter {
            dx: rng.below(span) as i64 - PAD,
            dy: rng.below(span) as i64 - PAD,
            flip: rng.below(2) == 1,
        }
    }
}

/// out[c][y][x] = normalise(img[c][y + dy][x' + dx]) where x' is x mirrored when flipping;
/// pixels that fall into the padding are 0 before normalisation, as torchvision pads.
pub fn crop_flip_normalise(img: &[u8], side: usize, j: Jitter, out: &mut [f32]) {
    debug_assert_eq!(img.len(), 3 * side * side);
    let plane_len = side * side;
    let side = side as i64;
    for c in 0..3 {
        let (m, s) = (MEAN[c], STD[c]);
        let plane = &img[c * plane_len..(c + 1) * plane_len];
        for y in 0..side {
            for x in 0..side {
                let xs = if j.flip { side - 1 - x } else { x };
                let (sy, sx) = (y + j.dy, xs + j.dx);
                let v = if (0..side).contains(&sy) && (0..side).contains(&sx) {
                    plane[(sy * side + sx) as usize] as f32 / 255.0
                } else {
                    0.0
                };
                out[c * plane_len + (y * side + x) as usize] = (v - m) / s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{PIXELS, SIDE};

    fn ramp() -> Vec<u8> {
        (0..PIXELS).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn no_jitter_is_plain_normalisation() {
        let img = ramp();
        let mut out = vec![0.0; PIXELS];
        crop_flip_normalise(&img, SIDE, Jitter::NONE, &mut out);
        for (i, (&p, &o)) in img.iter().zip(&out).enumerate() {
            let c = i / (SIDE * SIDE);
            assert!((o - (p as f32 / 255.0 - MEAN[c]) / STD[c]).abs() < 1e-6);
        }
    }

    #[test]
    fn shift_flip_and_padding() {
        let img = ramp();
        let mut out = vec![0.0; PIXELS];
        crop_flip_normalise(
            &img,
            SIDE,
            Jitter {
                dx: 4,
                dy: -4,
                flip: true,
            },
            &mut out,
        );
        let at = |c: usize, y: usize, x: usize| out[c * 1024 + y * 32 + x];
        let norm = |c: usize, p: u8| (p as f32 / 255.0 - MEAN[c]) / STD[c];
        // Rows above the image are padding.
        assert_eq!(at(0, 0, 0), norm(0, 0));
        // y=4 reads source row 0; x=0 mirrored is 31, shifted by 4 is 35: padding.
        assert_eq!(at(1, 4, 0), norm(1, 0));
        // x=10 mirrored is 21, +4 = 25.
        assert_eq!(at(2, 4, 10), norm(2, img[2 * 1024 + 25]));
    }

    #[test]
    fn draws_cover_the_range() {
        let mut r = Rng::new(5);
        let js: Vec<Jitter> = (0..500).map(|_| Jitter::draw(&mut r)).collect();
        assert!(js.iter().all(|j| j.dx.abs() <= 4 && j.dy.abs() <= 4));
        assert!(js.iter().any(|j| j.dx == -4) && js.iter().any(|j| j.dx == 4));
        assert!(js.iter().any(|j| j.flip) && js.iter().any(|j| !j.flip));
    }
}
