//! A CIFAR-shaped synthetic data set that a network can really learn with no download: each class is
//! a few coloured gratings; every sample is its class pattern, shifted, rescaled in contrast and
//! covered in pixel noise. Everything derives from the seed.

use super::{ImageSet, Splits, CHANNELS, CLASSES};
use crate::rng::Rng;

const WAVES: usize = 3;
const SHIFT: u64 = 3;

struct Wave {
    fx: f32,
    fy: f32,
    phase: f32,
    colour: [f32; 3],
}

fn class_waves(seed: u64, class: usize) -> Vec<Wave> {
    let mut r = Rng::derive(seed, "synthetic-class", class as u64);
    (0..WAVES)
        .map(|_| Wave {
            fx: (r.below(5) as f32 - 2.0) * 0.2,
            fy: (r.below(5) as f32 - 2.0) * 0.2,
            phase: r.uniform() * std::f32::consts::TAU,
            colour: [r.normal(), r.normal(), r.normal()],
        })
        .collect()
}

fn sample(waves: &[Wave], side: usize, noise: f32, r: &mut Rng, out: &mut [u8]) {
    let span = 2 * SHIFT + 1;
    let sx = r.below(span) as f32 - SHIFT as f32;
    let sy = r.below(span) as f32 - SHIFT as f32;
    let contrast = 0.6 + 0.8 * r.uniform();
    let brightness = 128.0 + 30.0 * (r.uniform() - 0.5);
    for c in 0..3 {
        for y in 0..side {
            for x in 0..side {
                let (xf, yf) = (x as f32 + sx, y as f32 + sy);
                let s: f32 = waves
                    .iter()
                    .map(|w| w.colour[c] * (w.fx * xf + w.fy * yf + w.phase).sin())
                    .sum();
                let v = brightness + contrast * 24.0 * s + noise * r.normal();
                out[(c * side + y) * side + x] = v.clamp(0.0, 255.0) as u8;
            }
        }
    }
}

fn generate(seed: u64, split: &str, n: usize, side: usize, noise: f32) -> ImageSet {
    let waves: Vec<Vec<Wave>> = (0..CLASSES).map(|c| class_waves(seed, c)).collect();
    let px = CHANNELS * side * side;
    let mut set = ImageSet {
        images: vec![0; n * px],
        labels: Vec::with_capacity(n),
        side,
    };
    for i in 0..n {
        let mut r = Rng::derive(seed, split, i as u64);
        let label = r.below(CLASSES as u64) as usize;
        sample(
            &waves[label],
            side,
            noise,
            &mut r,
            &mut set.images[i * px..(i + 1) * px],
        );
        set.labels.push(label as u8);
    }
    set
}

/// Images of 3 x side x side (32 is CIFAR's shape; tests use smaller ones) with pixel noise of
/// standard deviation `noise` (in 0..255 units; the class pattern's amplitude is about 24).
pub fn splits(seed: u64, train: usize, test: usize, side: usize, noise: f32) -> Splits {
    Splits {
        train: generate(seed, "synthetic-train", train, side, noise),
        test: generate(seed, "synthetic-test", test, side, noise),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproducible_balanced_and_not_constant() {
        let a = splits(1, 400, 10, 32, 96.0);
        let b = splits(1, 400, 10, 32, 96.0);
        assert_eq!(a.train.images, b.train.images);
        assert_eq!(a.test.labels, b.test.labels);
        assert_ne!(a.train.images, splits(2, 400, 10, 32, 96.0).train.images);
        let mut hist = [0usize; CLASSES];
        for &l in &a.train.labels {
            hist[l as usize] += 1;
        }
        assert!(hist.iter().all(|&h| h > 20), "{hist:?}");
        let img = a.train.image(0);
        assert!(img.iter().max() > img.iter().min());
    }

    /// Nearest class mean must beat chance by far, or no network could learn it quickly.
    #[test]
    fn classes_are_separable_by_a_simple_rule() {
        let s = splits(3, 2000, 500, 32, 96.0);
        let mut means = vec![vec![0f32; s.train.pixels()]; CLASSES];
        let mut counts = [0f32; CLASSES];
        for i in 0..s.train.len() {
            let l = s.train.labels[i] as usize;
            counts[l] += 1.0;
            for (m, &p) in means[l].iter_mut().zip(s.train.image(i)) {
                *m += p as f32;
            }
        }
        for (m, c) in means.iter_mut().zip(counts) {
            m.iter_mut().for_each(|v| *v /= c);
        }
        let correct = (0..s.test.len())
            .filter(|&i| {
                let img = s.test.image(i);
                let best = (0..CLASSES)
                    .min_by(|&a, &b| {
                        let d =
                            |c: usize| -> f32 { means[c].iter().zip(img).map(|(m, &p)| (m - p as f32).powi(2)).sum() };
                        d(a).partial_cmp(&d(b)).unwrap()
                    })
                    .unwrap();
                best == s.test.labels[i] as usize
            })
            .count();
        let acc = correct as f32 / s.test.len() as f32;
        assert!(acc > 0.3, "nearest-mean accuracy {acc}");
    }
}
