//! The buffers of the models' CPU custom ops: an operand's storage and values as a slice, and a
//! fresh output written in parallel.

use candle_core::{bail, CpuStorage, Layout, Result, Storage};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// The values of a contiguous operand (`what`) of custom op `op`; an error for a strided one
/// (callers make their operands contiguous before applying the op).
pub fn contiguous<'a, T>(v: &'a [T], l: &Layout, op: &str, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => bail!("{op}: the {what} is not contiguous"),
    }
}

/// A contiguous CPU operand's values as `T` (an error for another type), for custom op `op`.
pub fn typed<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout, op: &str, what: &str) -> Result<&'a [T]> {
    contiguous(T::cpu_storage_as_slice(s)?, l, op, what)
}

/// A tensor's CPU storage, or an error naming custom op `op` and its operand `what`.
pub fn cpu_storage<'a>(s: &'a Storage, op: &str, what: &str) -> Result<&'a CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => bail!("{op}: the {what} is not on the CPU"),
    }
}

/// A vector of `len` values made by `f(i, chunk)` on its chunks of `chunk` values (the last may be
/// shorter), in parallel on the current rayon pool, with room for `spare` more values.
///
/// Each chunk is zeroed by the task that fills it, just before `f`, instead of the whole vector
/// up front on one thread (`vec![0; len]`): for a training step's activations that serial memset
/// was a few percent of the step, and a chunk zeroed this way is still in cache when `f` writes it.
pub fn filled<T>(len: usize, spare: usize, chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) -> Vec<T>
where
    T: Copy + Default + Send + Sync,
{
    let mut v: Vec<T> = Vec::with_capacity(len + spare);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, c)| {
            for x in c.iter_mut() {
                x.write(T::default());
            }
            // SAFETY: every element of `c` was initialised just above.
            let c = unsafe { &mut *(c as *mut [MaybeUninit<T>] as *mut [T]) };
            f(i, c);
        });
    // SAFETY: the chunks cover the first `len` elements, and each chunk was initialised (a panic in
    // `f` propagates out of `for_each` before this line).
    unsafe { v.set_len(len) };
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_covers_every_chunk_and_keeps_the_spare_room() {
        for (len, chunk) in [(0, 3), (1, 3), (10, 3), (12, 4), (7, 100)] {
            let v: Vec<u32> = filled(len, 5, chunk, |i, c| {
                for (j, x) in c.iter_mut().enumerate() {
                    assert_eq!(*x, 0, "chunks arrive zeroed");
                    *x = (i * chunk + j) as u32 + 1;
                }
            });
            assert_eq!(v, (1..=len as u32).collect::<Vec<_>>(), "len {len} chunk {chunk}");
            assert!(v.capacity() >= len + 5);
        }
    }
}
