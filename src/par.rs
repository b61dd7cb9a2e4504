//! Element-wise passes over a model-sized f32 vector on the current rayon pool (a worker's own
//! pool in training): the error-feedback accumulation, the checks for NaN and infinity, the copies
//! in and out of the model, the SGD step.
//!
//! Each pass splits its slices into `CHUNK`-value chunks, one task each, and treats every element
//! on its own, so the bits are those of one serial pass whatever the thread count. Serial, each of
//! these passes took 4-8 ms on VGG-16's 15M parameters; a step made a dozen of them.

use rayon::prelude::*;

/// Values per task: large enough to amortise a task, small enough that VGG-16's 15M parameters
/// spread over every thread.
pub const CHUNK: usize = 1 << 16;

/// The index of the first NaN in `v`.
pub fn first_nan(v: &[f32]) -> Option<usize> {
    v.par_chunks(CHUNK).enumerate().find_map_first(|(c, s)| {
        // A fold without an early exit vectorises; the position is looked for only where it is.
        let any = s.iter().fold(false, |a, x| a | x.is_nan());
        any.then(|| s.iter().position(|x| x.is_nan()).map(|i| c * CHUNK + i))
            .flatten()
    })
}

/// Whether every value of `v` is finite.
pub fn all_finite(v: &[f32]) -> bool {
    v.par_chunks(CHUNK)
        .all(|s| s.iter().fold(true, |a, x| a & x.is_finite()))
}

/// `dst = src`.
pub fn copy(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "par::copy: lengths");
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// `f(chunk of v)` on every chunk of `v`.
pub fn each_mut(v: &mut [f32], f: impl Fn(&mut [f32]) + Sync) {
    v.par_chunks_mut(CHUNK).for_each(&f);
}

/// `f(i, chunk of v)` where chunk i holds the values `i * CHUNK..`, for passes that read other
/// slices at the same positions (`range(i, len)`).
pub fn each_indexed_mut(v: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| f(i, c));
}

/// The positions of chunk `i` of `len` values, for `each_indexed_mut`'s other slices.
pub fn range(i: usize, len: usize) -> std::ops::Range<usize> {
    i * CHUNK..i * CHUNK + len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_threads<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap()
            .install(f)
    }

    #[test]
    fn first_nan_is_the_first_across_chunks() {
        let n = 3 * CHUNK + 11;
        let mut v: Vec<f32> = (0..n).map(|i| i as f32).collect();
        assert_eq!(on_threads(|| first_nan(&v)), None);
        for at in [n - 1, 2 * CHUNK, CHUNK - 1, 5] {
            v[at] = f32::NAN;
            assert_eq!(on_threads(|| first_nan(&v)), Some(at), "NaN at {at} (and later ones)");
        }
        assert_eq!(first_nan(&[]), None);
    }

    #[test]
    fn all_finite_finds_an_infinity_or_a_nan_anywhere() {
        let n = 2 * CHUNK + 3;
        for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            for at in [0, CHUNK, n - 1] {
                let mut v = vec![1.0f32; n];
                assert!(on_threads(|| all_finite(&v)));
                v[at] = bad;
                assert!(!on_threads(|| all_finite(&v)), "{bad} at {at}");
            }
        }
    }

    #[test]
    fn copy_and_indexed_passes_cover_every_value_once() {
        let n = 2 * CHUNK + 7;
        let src: Vec<f32> = (0..n).map(|i| (i as f32).sin()).collect();
        let mut dst = vec![0.0f32; n];
        on_threads(|| copy(&mut dst, &src));
        assert_eq!(dst, src);
        on_threads(|| {
            each_indexed_mut(&mut dst, |i, c| {
                let r = range(i, c.len());
                c.iter_mut().zip(&src[r]).for_each(|(d, s)| *d += s);
            })
        });
        on_threads(|| each_mut(&mut dst, |c| c.iter_mut().for_each(|d| *d /= 2.0)));
        assert!(dst.iter().zip(&src).all(|(d, s)| d.to_bits() == s.to_bits()));
    }
}
