//! The one helper every CPU custom op of the models needs: an operand's values as a slice.

use candle_core::{bail, Layout, Result};

/// The values of a contiguous operand (`what`) of custom op `op`; an error for a strided one
/// (callers make their operands contiguous before applying the op).
pub fn contiguous<'a, T>(v: &'a [T], l: &Layout, op: &str, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => bail!("{op}: the {what} is not contiguous"),
    }
}
