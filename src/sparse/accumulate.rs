//! Error feedback's first step, the CPU twin of the `gtopk_accumulate` kernel:
//! `acc = residual + g`, where g is the gradient or, with DGC momentum correction m, the corrected
//! velocity `u = m * u + grad` (stored back). Without a residual (dense S-SGD) `acc = g`. The kernel
//! works in place (its accumulator holds the residual on entry); here the two are separate buffers,
//! so one pass reads both and writes the accumulator.

use crate::par::{self, CHUNK};
use rayon::prelude::*;

pub fn accumulate(grad: &[f32], residual: Option<&[f32]>, acc: &mut [f32], momentum: Option<(&mut [f32], f32)>) {
    assert_eq!(grad.len(), acc.len(), "accumulate: gradient and accumulator");
    // Element by element, so chunks on the worker's threads give the same bits as one pass.
    let part = par::range;
    let res = |r: std::ops::Range<usize>| residual.map(|v| &v[r]);
    match momentum {
        Some((u, m)) => {
            assert_eq!(u.len(), acc.len(), "accumulate: velocity and accumulator");
            acc.par_chunks_mut(CHUNK)
                .zip(u.par_chunks_mut(CHUNK))
                .enumerate()
                .for_each(|(c, (a, u))| {
                    let r = part(c, a.len());
                    run(&grad[r.clone()], res(r), a, Some((u, m)))
                })
        }
        None => par::each_indexed_mut(acc, |c, a| {
            let r = part(c, a.len());
            run(&grad[r.clone()], res(r), a, None)
        }),
    }
}

fn run(grad: &[f32], residual: Option<&[f32]>, acc: &mut [f32], mut momentum: Option<(&mut [f32], f32)>) {
    for (i, a) in acc.iter_mut().enumerate() {
        let g = match &mut momentum {
            Some((u, m)) => {
                u[i] = *m * u[i] + grad[i];
                u[i]
            }
            None => grad[i],
        };
        *a = match residual {
            Some(r) => r[i] + g,
            None => g,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_the_gradient_or_the_corrected_velocity() {
        let mut acc = vec![0.0f32; 2];
        accumulate(&[0.5, 0.25], Some(&[1.0, -1.0]), &mut acc, None);
        assert_eq!(acc, [1.5, -0.75]);
        let residual = acc.clone();
        let mut u = vec![2.0f32, 0.0];
        accumulate(&[1.0, 1.0], Some(&residual), &mut acc, Some((&mut u, 0.5)));
        assert_eq!(u, [2.0, 1.0]);
        assert_eq!(acc, [3.5, 0.25]);
        accumulate(&[1.0, 1.0], None, &mut acc, None);
        assert_eq!(acc, [1.0, 1.0]);
    }

    /// The chunked, parallel pass equals one serial pass, bit for bit, across chunk edges.
    #[test]
    fn chunks_on_threads_match_one_pass() {
        let n = 2 * CHUNK + 7;
        let mut r = crate::rng::Rng::new(4);
        let mut v = || (0..n).map(|_| r.normal()).collect::<Vec<f32>>();
        let (grad, residual, u0) = (v(), v(), v());
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for (with_residual, with_momentum) in [(false, false), (true, false), (true, true)] {
            let res = with_residual.then_some(&residual[..]);
            let (mut acc, mut u) = (vec![0.0; n], u0.clone());
            pool.install(|| accumulate(&grad, res, &mut acc, with_momentum.then_some((&mut u[..], 0.9))));
            let (mut want, mut want_u) = (vec![0.0; n], u0.clone());
            run(&grad, res, &mut want, with_momentum.then_some((&mut want_u[..], 0.9)));
            assert_eq!(acc, want);
            assert_eq!(u, want_u);
        }
    }
}
