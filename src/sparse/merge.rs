//! The paper's merge operator (eq. 6): the union of two index-sorted sets, values summed where the
//! indices agree, then exactly min(k, |union|) pairs kept by the top-k order. What it drops is
//! returned too, so error feedback can keep it.
//!
//! Both peers of a pairwise exchange must end with identical bits: the union is built in index
//! order whichever operand comes first, and IEEE addition is commutative, so `merge(a, b)` and
//! `merge(b, a)` see the same union and make the same selection.

use super::radix::{magnitude_key, threshold};
use super::set::SparseSet;
use anyhow::{anyhow, bail, Result};

/// Returns `(kept, dropped)`, both index-sorted. `k >= 1`.
pub fn merge(a: &SparseSet, b: &SparseSet, k: usize) -> Result<(SparseSet, SparseSet)> {
    let mut kept = SparseSet::empty();
    let mut dropped = SparseSet::empty();
    merge_into((a.idx(), a.val()), (b.idx(), b.val()), k, &mut kept, &mut dropped)?;
    Ok((kept, dropped))
}

/// Appends the merge of two index-sorted runs to `kept` and `dropped` (the per-segment form: the
/// runs of one segment come after everything already in the outputs).
pub(crate) fn merge_into(
    a: (&[u32], &[f32]),
    b: (&[u32], &[f32]),
    k: usize,
    kept: &mut SparseSet,
    dropped: &mut SparseSet,
) -> Result<()> {
    if k == 0 {
        bail!("merge: k must be at least 1");
    }
    let (ui, uv) = union(a, b);
    if let Some(p) = uv.iter().position(|v| v.is_nan()) {
        let i = ui[p];
        let (x, y) = (value_at(a, i), value_at(b, i));
        bail!("merge: the sum at index {i} is NaN ({x} + {y})");
    }
    if ui.len() <= k {
        kept.extend_sorted(&ui, &uv);
        return Ok(());
    }
    let t = threshold(&uv, k).map_err(|p| anyhow!("merge: NaN at index {}", ui[p]))?;
    let mut cut = t.cutoff();
    let (mut ki, mut kv) = (Vec::with_capacity(k), Vec::with_capacity(k));
    let (mut di, mut dv) = (Vec::with_capacity(ui.len() - k), Vec::with_capacity(ui.len() - k));
    for (&i, &v) in ui.iter().zip(&uv) {
        if cut.keep(magnitude_key(v)) {
            ki.push(i);
            kv.push(v);
        } else {
            di.push(i);
            dv.push(v);
        }
    }
    kept.extend_sorted(&ki, &kv);
    dropped.extend_sorted(&di, &dv);
    Ok(())
}

fn value_at(run: (&[u32], &[f32]), i: u32) -> f32 {
    run.0.binary_search(&i).map_or(0.0, |p| run.1[p])
}

/// Two-pointer union of index-sorted runs; equal indices summed (a + b, commutative).
fn union(a: (&[u32], &[f32]), b: (&[u32], &[f32])) -> (Vec<u32>, Vec<f32>) {
    let (ai, av) = a;
    let (bi, bv) = b;
    let mut ui = Vec::with_capacity(ai.len() + bi.len());
    let mut uv = Vec::with_capacity(ai.len() + bi.len());
    let (mut p, mut q) = (0, 0);
    while p < ai.len() && q < bi.len() {
        match ai[p].cmp(&bi[q]) {
            std::cmp::Ordering::Less => {
                ui.push(ai[p]);
                uv.push(av[p]);
                p += 1;
            }
            std::cmp::Ordering::Greater => {
                ui.push(bi[q]);
                uv.push(bv[q]);
                q += 1;
            }
            std::cmp::Ordering::Equal => {
                ui.push(ai[p]);
                uv.push(av[p] + bv[q]);
                p += 1;
                q += 1;
            }
        }
    }
    ui.extend_from_slice(&ai[p..]);
    uv.extend_from_slice(&av[p..]);
    ui.extend_from_slice(&bi[q..]);
    uv.extend_from_slice(&bv[q..]);
    (ui, uv)
}

#[cfg(test)]
mod tests {
    use super::super::reference::{merge_reference, sparse_sets};
    use super::*;
    use proptest::prelude::*;

    fn set(pairs: &[(u32, f32)]) -> SparseSet {
        SparseSet::new(pairs.iter().map(|p| p.0).collect(), pairs.iter().map(|p| p.1).collect()).unwrap()
    }

    #[test]
    fn sums_equal_indices_and_drops_the_rest() {
        let a = set(&[(1, 1.0), (3, -2.0), (5, 0.5)]);
        let b = set(&[(3, -1.5), (4, 2.0), (5, -0.5)]);
        let (kept, dropped) = merge(&a, &b, 3).unwrap();
        assert_eq!(kept, set(&[(1, 1.0), (3, -3.5), (4, 2.0)]));
        // 5 sums to 0.0 and is the smallest.
        assert_eq!(dropped, set(&[(5, 0.0)]));
    }

    #[test]
    fn small_union_keeps_everything() {
        let a = set(&[(2, 1.0)]);
        let b = set(&[(2, 1.0)]);
        let (kept, dropped) = merge(&a, &b, 4).unwrap();
        assert_eq!(kept, set(&[(2, 2.0)]));
        assert!(dropped.is_empty());
        assert!(merge(&a, &b, 0).is_err());
    }

    #[test]
    fn opposite_infinities_are_an_error_naming_the_index() {
        let a = set(&[(7, f32::INFINITY)]);
        let b = set(&[(7, f32::NEG_INFINITY)]);
        let e = merge(&a, &b, 1).unwrap_err().to_string();
        assert!(e.contains("index 7 is NaN"), "{e}");
    }

    #[test]
    fn equal_magnitudes_of_opposite_sign_tie_by_index() {
        let a = set(&[(4, -1.0), (9, 1.0)]);
        let b = set(&[(2, 1.0), (6, -1.0)]);
        let (kept, dropped) = merge(&a, &b, 2).unwrap();
        assert_eq!(kept, set(&[(2, 1.0), (4, -1.0)]));
        assert_eq!(dropped, set(&[(6, -1.0), (9, 1.0)]));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn matches_brute_force_and_is_symmetric_bitwise(
            (a, b) in (sparse_sets(300), sparse_sets(300)),
            k in 1usize..80,
        ) {
            let opposite_infinities = a.iter().any(|(i, x)| {
                x.is_infinite() && b.iter().any(|(j, y)| i == j && y == -x)
            });
            if opposite_infinities {
                prop_assert!(merge(&a, &b, k).is_err() && merge(&b, &a, k).is_err());
                return Ok(());
            }
            let ab = merge(&a, &b, k).unwrap();
            let ba = merge(&b, &a, k).unwrap();
            let bits = |s: &SparseSet| s.val().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(ab.0.idx(), ba.0.idx());
            prop_assert_eq!(bits(&ab.0), bits(&ba.0));
            prop_assert_eq!(bits(&ab.1), bits(&ba.1));
            let want = merge_reference(&a, &b, k);
            prop_assert_eq!(&ab, &want);
            prop_assert_eq!(ab.0.len(), k.min(ab.0.len() + ab.1.len()));
        }
    }
}
