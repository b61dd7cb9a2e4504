//! Brute-force references for the tests: full sorts and maps, written for obviousness, not speed.

use super::config::GtopkAlgo;
use super::layout::Layout;
use super::schedule::{recursive_doubling_schedule, tree_schedule};
use super::set::SparseSet;
use super::wire::Wire;
use proptest::prelude::*;
use std::collections::BTreeMap;

/// Sort everything by (|v| desc, index asc), keep k, return in index order.
pub fn top_k_reference(values: &[f32], k: usize) -> SparseSet {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()).then(a.cmp(&b)));
    let mut keep: Vec<usize> = order[..k].to_vec();
    keep.sort_unstable();
    SparseSet::new(
        keep.iter().map(|&i| i as u32).collect(),
        keep.iter().map(|&i| values[i]).collect(),
    )
    .unwrap()
}

pub fn merge_reference(a: &SparseSet, b: &SparseSet, k: usize) -> (SparseSet, SparseSet) {
    let mut union: BTreeMap<u32, f32> = a.iter().collect();
    for (i, v) in b.iter() {
        union.entry(i).and_modify(|x| *x += v).or_insert(v);
    }
    let (idx, val): (Vec<u32>, Vec<f32>) = union.into_iter().unzip();
    let k = k.min(idx.len());
    let kept_pos = if k == 0 {
        SparseSet::empty()
    } else {
        top_k_reference(&val, k)
    };
    let keep: Vec<bool> = {
        let mut m = vec![false; idx.len()];
        for &p in kept_pos.idx() {
            m[p as usize] = true;
        }
        m
    };
    let pick = |want: bool| {
        let (i, v): (Vec<u32>, Vec<f32>) = idx
            .iter()
            .zip(&val)
            .zip(&keep)
            .filter(|(_, &k)| k == want)
            .map(|((&i, &v), _)| (i, v))
            .unzip();
        SparseSet::new(i, v).unwrap()
    };
    (pick(true), pick(false))
}

pub fn layout_merge_reference(layout: &Layout, a: &SparseSet, b: &SparseSet, ks: &[usize]) -> SparseSet {
    let mut idx = Vec::new();
    let mut val = Vec::new();
    for (s, &k) in layout.segments().iter().zip(ks) {
        let part = |x: &SparseSet| {
            let (i, v) = x.range(s.offset as u32, s.end() as u32);
            SparseSet::new(i.to_vec(), v.to_vec()).unwrap()
        };
        let (kept, _) = merge_reference(&part(a), &part(b), k);
        idx.extend_from_slice(kept.idx());
        val.extend_from_slice(kept.val());
    }
    SparseSet::new(idx, val).unwrap()
}

fn rounded(set: &SparseSet, wire: Wire) -> SparseSet {
    SparseSet::new(set.idx().to_vec(), set.val().iter().map(|&v| wire.round(v)).collect()).unwrap()
}

/// The global set by merging the ranks' sets in the schedule's order, in one thread.
pub fn reduce_reference(algo: GtopkAlgo, locals: &[SparseSet], layout: &Layout, ks: &[usize], wire: Wire) -> SparseSet {
    let world = locals.len();
    let mut sets = locals.to_vec();
    let merge = |a: &SparseSet, b: &SparseSet| layout_merge_reference(layout, a, b, ks);
    match algo {
        GtopkAlgo::Tree => {
            for round in tree_schedule(world) {
                for (from, to) in round {
                    sets[to] = merge(&sets[to], &rounded(&sets[from], wire));
                }
            }
            if world > 1 {
                rounded(&sets[0], wire)
            } else {
                sets.swap_remove(0)
            }
        }
        GtopkAlgo::RecursiveDoubling => {
            let s = recursive_doubling_schedule(world);
            for &(from, to) in &s.prefold {
                sets[to] = merge(&sets[to], &rounded(&sets[from], wire));
            }
            for round in &s.rounds {
                for &(a, b) in round {
                    let m = merge(&rounded(&sets[a], wire), &rounded(&sets[b], wire));
                    sets[a] = m.clone();
                    sets[b] = m;
                }
            }
            if world > s.core {
                rounded(&sets[0], wire)
            } else {
                sets.swap_remove(0)
            }
        }
    }
}

/// Values with many ties, zeros of both signs and occasional infinities.
pub fn tie_heavy_value() -> impl Strategy<Value = f32> {
    prop_oneof![
        6 => (-8i32..=8).prop_map(|x| x as f32 * 0.5),
        3 => -100.0f32..100.0,
        1 => prop::sample::select(vec![-0.0f32, f32::INFINITY, f32::NEG_INFINITY]),
    ]
}

/// Index-sorted sets over 0..max_index with tie-heavy values.
pub fn sparse_sets(max_index: u32) -> impl Strategy<Value = SparseSet> {
    prop::collection::btree_map(0..max_index, tie_heavy_value(), 0..60).prop_map(|m| {
        let (i, v): (Vec<u32>, Vec<f32>) = m.into_iter().unzip();
        SparseSet::new(i, v).unwrap()
    })
}

/// Per-segment brute-force top-k with global indices.
pub fn select_reference(layout: &Layout, values: &[f32], ks: &[usize]) -> SparseSet {
    let mut idx = Vec::new();
    let mut val = Vec::new();
    for (s, &k) in layout.segments().iter().zip(ks) {
        let part = top_k_reference(&values[s.offset..s.end()], k);
        idx.extend(part.idx().iter().map(|&i| i + s.offset as u32));
        val.extend_from_slice(part.val());
    }
    SparseSet::new(idx, val).unwrap()
}
