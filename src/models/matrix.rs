//! A row-major or transposed view of a matrix inside a slice, and the `gemm` crate's product on
//! such views, for the CPU ops that are GEMMs underneath (the convolution, the LSTM's time loop).

use super::conv::Elem;
use gemm::Parallelism;

/// A row-major view of a matrix inside a slice: element (i, j) at `rs * i + cs * j`.
pub(in crate::models) struct Mat<'a, T> {
    data: &'a [T],
    rs: usize,
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    pub(in crate::models) fn rows(data: &'a [T], stride: usize) -> Self {
        Self {
            data,
            rs: stride,
            cs: 1,
        }
    }

    /// The transpose of the row-major matrix with row stride `stride` stored in `data`.
    pub(in crate::models) fn transposed(data: &'a [T], stride: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: stride,
        }
    }

    fn check(&self, rows: usize, cols: usize) {
        assert!(
            rows == 0 || cols == 0 || self.data.len() > (rows - 1) * self.rs + (cols - 1) * self.cs,
            "gemm operand of {} values too small for {rows}x{cols}",
            self.data.len()
        );
    }
}

/// c [m, n] (row-major, contiguous) = (c if `accumulate`) + a [m, k] b [k, n].
#[allow(clippy::too_many_arguments)]
pub(in crate::models) fn gemm_into<T: Elem>(
    (m, n, k): (usize, usize, usize),
    c: &mut [T],
    accumulate: bool,
    a: Mat<T>,
    b: Mat<T>,
    par: Parallelism,
) {
    assert_eq!(c.len(), m * n, "gemm destination");
    a.check(m, k);
    b.check(k, n);
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // SAFETY: the checks above keep every index of a, b and c inside its slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        )
    }
}

/// A GEMM's threading when it runs alone: every thread of the current rayon pool (a worker's own
/// pool in training), none where the pool has one.
pub(in crate::models) fn pool_parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `gemm` crate splits a product over threads by output tiles and sums each tile's depth
    /// in blocks sized by the shape and the caches, never by the thread count, so a product has the
    /// same bits on any pool. Shapes above its threading threshold (48 * 48 * 256 multiply-adds),
    /// ragged against its 16 x 4 / 48 x 6 tiles, with a depth over one cache block, each layout.
    #[test]
    fn a_product_has_the_same_bits_on_any_pool() {
        let (m, n, k) = (203, 157, 1100);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 97.0).collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 104729 % 1000) as f32 - 500.0) / 89.0)
            .collect();
        let product = |threads: usize, transposed: bool, accumulate: bool| {
            let mut c: Vec<f32> = (0..m * n).map(|i| i as f32 / 3.0).collect();
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let (a, b) = if transposed {
                    (Mat::transposed(&a, m), Mat::transposed(&b, k))
                } else {
                    (Mat::rows(&a, k), Mat::rows(&b, n))
                };
                gemm_into((m, n, k), &mut c, accumulate, a, b, pool_parallelism());
            });
            c.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        for transposed in [false, true] {
            for accumulate in [false, true] {
                let one = product(1, transposed, accumulate);
                for threads in 2..=4 {
                    assert!(
                        product(threads, transposed, accumulate) == one,
                        "{threads} threads (transposed {transposed}, accumulate {accumulate})"
                    );
                }
            }
        }
    }
}
