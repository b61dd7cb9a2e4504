//! The sparse set every scheme exchanges: exactly k `(index, value)` pairs, sorted by index, indices
//! unique. Two parallel vectors rather than a vector of pairs, because the wire format and the GPU
//! kernels both want the indices and the values as separate contiguous arrays.

use anyhow::{ensure, Result};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct SparseSet {
    idx: Vec<u32>,
    val: Vec<f32>,
}

impl SparseSet {
    /// Checks the invariants (same length, indices strictly increasing), so a set built from
    /// outside data can be trusted by the merge and the scatter.
    pub fn new(idx: Vec<u32>, val: Vec<f32>) -> Result<Self> {
        ensure!(
            idx.len() == val.len(),
            "sparse set: {} indices but {} values",
            idx.len(),
            val.len()
        );
        if let Some(p) = idx.windows(2).position(|w| w[0] >= w[1]) {
            anyhow::bail!(
                "sparse set: indices not strictly increasing at position {} ({} then {})",
                p + 1,
                idx[p],
                idx[p + 1]
            );
        }
        Ok(Self { idx, val })
    }

    /// For producers that build in index order by construction (selection, merge, decode after
    /// its own checks); debug builds still verify.
    pub(crate) fn from_sorted(idx: Vec<u32>, val: Vec<f32>) -> Self {
        debug_assert_eq!(idx.len(), val.len());
        debug_assert!(idx.windows(2).all(|w| w[0] < w[1]), "indices not sorted");
        Self { idx, val }
    }

    pub fn empty() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.idx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.idx.is_empty()
    }

    pub fn idx(&self) -> &[u32] {
        &self.idx
    }

    pub fn val(&self) -> &[f32] {
        &self.val
    }

    pub(crate) fn val_mut(&mut self) -> &mut [f32] {
        &mut self.val
    }

    pub fn into_parts(self) -> (Vec<u32>, Vec<f32>) {
        (self.idx, self.val)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, f32)> + '_ {
        self.idx.iter().copied().zip(self.val.iter().copied())
    }

    /// The pairs whose index lies in `lo..hi`; a contiguous run because the set is sorted.
    pub fn range(&self, lo: u32, hi: u32) -> (&[u32], &[f32]) {
        let a = self.idx.partition_point(|&i| i < lo);
        let b = self.idx.partition_point(|&i| i < hi);
        (&self.idx[a..b], &self.val[a..b])
    }

    pub fn contains(&self, index: u32) -> bool {
        self.idx.binary_search(&index).is_ok()
    }

    /// Appends pairs that all come after the current last index (how per-segment results are
    /// concatenated into one global set).
    pub(crate) fn extend_sorted(&mut self, idx: &[u32], val: &[f32]) {
        debug_assert!(match (self.idx.last(), idx.first()) {
            (Some(a), Some(b)) => a < b,
            _ => true,
        });
        self.idx.extend_from_slice(idx);
        self.val.extend_from_slice(val);
    }

    /// The union of `sets`, each index's value the sum of its values in list order starting from
    /// +0.0: exactly what scattering the sets one after another into a zeroed dense vector leaves
    /// at the touched indices, in O(total pairs) memory instead of O(d). Zero sums are kept, so the
    /// result says which indices were touched.
    pub fn sum_in_order(sets: &[SparseSet]) -> SparseSet {
        let mut pairs: Vec<(u32, f32)> = sets.iter().flat_map(|s| s.iter()).collect();
        // Stable: each index's values keep their list order.
        pairs.sort_by_key(|&(i, _)| i);
        let mut out = SparseSet::empty();
        for (i, v) in pairs {
            if out.idx.last() == Some(&i) {
                *out.val.last_mut().expect("a value per index") += v;
            } else {
                out.idx.push(i);
                out.val.push(0.0 + v);
            }
        }
        out
    }

    /// `dense[i] += v` for every pair. Callers rely on the index order for a fixed summation order.
    pub fn scatter_add(&self, dense: &mut [f32]) {
        for (i, v) in self.iter() {
            dense[i as usize] += v;
        }
    }

    /// `dense[i] += v / divisor`: the twin of the `gtopk_scatter_add` kernel. A division rather than
    /// a product with 1/P, so one set scattered into zeros equals the CPU path's sum-then-divide.
    pub fn scatter_add_div(&self, dense: &mut [f32], divisor: f32) {
        for (i, v) in self.iter() {
            dense[i as usize] += v / divisor;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set_strategy(d: u32) -> impl Strategy<Value = SparseSet> {
        proptest::collection::btree_map(0..d, -4i8..4, 0..12).prop_map(|m| {
            let (idx, val): (Vec<u32>, Vec<f32>) = m.into_iter().map(|(i, v)| (i, v as f32 * 0.37)).unzip();
            SparseSet::new(idx, val).unwrap()
        })
    }

    proptest! {
        /// Against the dense reference: scatter every set into zeros, in order.
        #[test]
        fn sum_in_order_equals_scattering_in_order(sets in proptest::collection::vec(set_strategy(24), 0..5)) {
            let sum = SparseSet::sum_in_order(&sets);
            let mut dense = vec![0.0f32; 24];
            let mut touched = [false; 24];
            for s in &sets {
                s.scatter_add(&mut dense);
                s.idx().iter().for_each(|&i| touched[i as usize] = true);
            }
            let want: Vec<u32> = (0..24).filter(|&i| touched[i as usize]).collect();
            prop_assert_eq!(sum.idx(), &want[..]);
            for (i, v) in sum.iter() {
                prop_assert_eq!(v.to_bits(), dense[i as usize].to_bits(), "index {}", i);
            }
        }
    }

    #[test]
    fn new_rejects_unsorted_duplicate_and_ragged() {
        assert!(SparseSet::new(vec![1, 3], vec![1.0, 2.0]).is_ok());
        let e = SparseSet::new(vec![3, 1], vec![1.0, 2.0]).unwrap_err().to_string();
        assert!(e.contains("not strictly increasing at position 1"), "{e}");
        assert!(SparseSet::new(vec![2, 2], vec![1.0, 2.0]).is_err());
        let e = SparseSet::new(vec![1], vec![]).unwrap_err().to_string();
        assert!(e.contains("1 indices but 0 values"), "{e}");
    }

    #[test]
    fn range_and_scatter() {
        let s = SparseSet::new(vec![0, 4, 5, 9], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(s.range(4, 9), (&[4u32, 5][..], &[2.0f32, 3.0][..]));
        assert_eq!(s.range(10, 20).0.len(), 0);
        assert!(s.contains(9) && !s.contains(8));
        let mut d = vec![1.0f32; 10];
        s.scatter_add(&mut d);
        assert_eq!(d, vec![2.0, 1.0, 1.0, 1.0, 3.0, 4.0, 1.0, 1.0, 1.0, 5.0]);
        // The twin of the scatter kernel divides each value; into zeros that equals sum-then-divide.
        let mut z = vec![0.0f32; 10];
        s.scatter_add_div(&mut z, 3.0);
        let mut want = vec![0.0f32; 10];
        s.scatter_add(&mut want);
        want.iter_mut().for_each(|v| *v /= 3.0);
        assert_eq!(z, want);
    }
}
