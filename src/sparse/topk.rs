//! Exact top-k by magnitude over a dense vector: larger |v| first, ties to the smaller index.

use super::radix::{digit1, digit1_floor, magnitude_key, refine, top_digit};
use super::set::SparseSet;
use anyhow::{bail, Result};

const SPLIT_BLOCK: usize = 16;

/// The k entries of largest magnitude, as an index-sorted set. O(d), no sort: two passes over the
/// values and the radix refinement over one bin's candidates. `1 <= k <= values.len()`; NaN is
/// an error naming its index.
///
/// Pass 1 (`top_digit`) finds the top-digit bin B of the k-th largest key. Pass 2 reads every
/// value once more and splits off, in index order, the keys with a top digit above B (all in the
/// top k) and the candidates in B (index and key). The exact threshold comes from the candidates
/// alone, and the output is the ordered merge of the first list with the candidates that pass
/// the threshold: every key above T, then the first `ties` keys equal to T, so ties go to the
/// smallest indices.
pub fn top_k(values: &[f32], k: usize) -> Result<SparseSet> {
    let d = values.len();
    if k == 0 || k > d {
        bail!("top-k: k = {k} must be in 1..={d} (the vector's length)");
    }
    if d > u32::MAX as usize {
        bail!("top-k: vector of {d} values does not fit 32-bit indices");
    }
    let top = top_digit(values, k)
        .map_err(|p| anyhow::anyhow!("top-k: value at index {p} is NaN (gradient or residual is not finite)"))?;

    let mut above = Vec::with_capacity(top.above);
    let mut cand_idx = Vec::new();
    let mut cand_key = Vec::new();
    // Keys at or above `floor` have a top digit >= B. Most blocks hold none, and a block's max
    // key vectorizes, so such blocks cost one streaming read (a warp's ballot on the GPU).
    let floor = digit1_floor(top.bin);
    for (b, block) in values.chunks(SPLIT_BLOCK).enumerate() {
        let max = block.iter().fold(0, |m, &v| m.max(magnitude_key(v)));
        if max < floor {
            continue;
        }
        for (j, &v) in block.iter().enumerate() {
            let i = (b * SPLIT_BLOCK + j) as u32;
            let key = magnitude_key(v);
            let dig = digit1(key);
            if dig > top.bin {
                above.push(i);
            } else if dig == top.bin {
                cand_idx.push(i);
                cand_key.push(key);
            }
        }
    }
    let t = refine(top, k, &cand_key);

    let mut cut = t.cutoff();
    let mut passing = cand_idx
        .iter()
        .zip(&cand_key)
        .filter(|&(_, &key)| cut.keep(key))
        .map(|(&i, _)| i)
        .peekable();
    let mut idx = Vec::with_capacity(k);
    let mut sure = above.iter().copied().peekable();
    loop {
        let next = match (sure.peek(), passing.peek()) {
            (Some(&a), Some(&c)) if a < c => sure.next(),
            (Some(_), Some(_)) | (None, Some(_)) => passing.next(),
            (Some(_), None) => sure.next(),
            (None, None) => break,
        };
        idx.extend(next);
    }
    debug_assert_eq!(idx.len(), k);
    let val = idx.iter().map(|&i| values[i as usize]).collect();
    Ok(SparseSet::from_sorted(idx, val))
}

#[cfg(test)]
mod tests {
    use super::super::reference::top_k_reference;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ties_go_to_the_smaller_index() {
        let v = [1.0f32, -1.0, 1.0, -1.0, 1.0];
        let s = top_k(&v, 3).unwrap();
        assert_eq!(s.idx(), &[0, 1, 2]);
        assert_eq!(s.val(), &[1.0, -1.0, 1.0]);
        let v = [-2.0f32, 0.5, 2.0];
        assert_eq!(top_k(&v, 1).unwrap().idx(), &[0]);
        let v = [0.0f32, -0.0, 0.0];
        assert_eq!(top_k(&v, 2).unwrap().idx(), &[0, 1]);
    }

    #[test]
    fn infinities_are_values() {
        let v = [1.0f32, f32::NEG_INFINITY, 3.0, f32::INFINITY];
        let s = top_k(&v, 2).unwrap();
        assert_eq!(s.idx(), &[1, 3]);
    }

    #[test]
    fn k_out_of_range_and_nan_are_errors() {
        let v = [1.0f32, 2.0];
        assert!(top_k(&v, 0).unwrap_err().to_string().contains("k = 0"));
        assert!(top_k(&v, 3).unwrap_err().to_string().contains("1..=2"));
        assert!(top_k(&[], 1).is_err());
        let e = top_k(&[1.0, 2.0, 3.0, f32::NAN, f32::NAN], 1).unwrap_err().to_string();
        assert!(e.contains("index 3 is NaN"), "{e}");
    }

    #[test]
    fn large_vector_with_clustered_exponents() {
        // Most values share one top digit, so the candidate passes do the real work.
        let d = 100_000;
        let v: Vec<f32> = (0..d)
            .map(|i| {
                let x = 1.0 + ((i * 7919) % 1000) as f32 * 1e-4;
                if i % 3 == 0 {
                    -x
                } else {
                    x
                }
            })
            .collect();
        for k in [1, 17, 1000, 50_000, d] {
            assert_eq!(top_k(&v, k).unwrap(), top_k_reference(&v, k), "k = {k}");
        }
    }

    fn values(max_len: usize) -> impl Strategy<Value = Vec<f32>> {
        let pick = prop_oneof![
            4 => -1000.0f32..1000.0,
            2 => prop::sample::select(vec![0.0f32, -0.0, 1.0, -1.0, 2.5, -2.5, 1e-30]),
            1 => prop::sample::select(vec![f32::INFINITY, f32::NEG_INFINITY, f32::MIN_POSITIVE]),
            1 => any::<u32>().prop_map(|b| {
                let x = f32::from_bits(b);
                if x.is_nan() { 0.0 } else { x }
            }),
        ];
        prop::collection::vec(pick, 1..max_len)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn matches_brute_force(v in values(2000), kf in 0.0f64..1.0) {
            let k = 1 + ((v.len() - 1) as f64 * kf) as usize;
            prop_assert_eq!(top_k(&v, k).unwrap(), top_k_reference(&v, k));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8))]
        #[test]
        fn matches_brute_force_large(d in 50_000usize..100_000, kf in 0.0f64..1.0, seed in any::<u64>()) {
            let mut r = crate::rng::Rng::new(seed);
            // Few distinct values: many ties at the threshold.
            let v: Vec<f32> = (0..d).map(|_| (r.below(200) as f32 - 100.0) * 0.25).collect();
            let k = 1 + ((d - 1) as f64 * kf * kf) as usize;
            prop_assert_eq!(top_k(&v, k).unwrap(), top_k_reference(&v, k));
        }
    }
}
