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
