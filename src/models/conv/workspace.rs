//! The element types the CPU convolution runs on, each with a per-thread im2col buffer that lives
//! across calls: a training step asks for the same sizes every time, so after the first step no
//! column matrix is allocated.

use std::cell::RefCell;
use std::ops::AddAssign;

pub trait Elem: Copy + Default + AddAssign + Send + Sync + 'static {
    const ZERO: Self;
    const ONE: Self;
    /// Runs `f` on this thread's buffer of at least `len` values (contents unspecified).
    fn with_workspace<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;
}

fn with<T: Copy + Default, R>(cell: &RefCell<Vec<T>>, len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    // Busy only when a rayon join inside `f` ran another sample on this thread: give that one
    // its own buffer rather than fail.
    match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, T::default());
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![T::default(); len]),
    }
}

macro_rules! elem {
    ($t:ty, $key:ident) => {
        thread_local! {
            static $key: RefCell<Vec<$t>> = const { RefCell::new(Vec::new()) };
        }
        impl Elem for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn with_workspace<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
                $key.with(|cell| with(cell, len, f))
            }
        }
    };
}

elem!(f32, WORKSPACE_F32);
elem!(f64, WORKSPACE_F64);
