//! The flat gradient cut into segments, each selected and merged on its own. `Scope::Model` is one
//! segment (the paper and its code); `Scope::Layer` is one per parameter tensor. A multi-segment
//! sparse set is the concatenation of the per-segment sets, with global indices, so it is still
//! one index-sorted set on the wire.

use super::merge::merge_into;
use super::set::SparseSet;
use super::topk::top_k;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    #[default]
    Model,
    Layer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: usize,
    pub len: usize,
}

impl Segment {
    pub fn end(&self) -> usize {
        self.offset + self.len
    }

    /// k = max(1, floor(density * len)), as the authors' `max(int(numel * ratio), 1)`.
    pub fn k(&self, density: f64) -> usize {
        ((density * self.len as f64).floor() as usize).clamp(1, self.len)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    segments: Vec<Segment>,
    d: usize,
}

impl Layout {
    /// `tensor_sizes` in flat-layout order. Empty tensors hold nothing to select and get no
    /// segment.
    pub fn new(scope: Scope, tensor_sizes: &[usize]) -> Result<Self> {
        let d: usize = tensor_sizes.iter().sum();
        ensure!(d > 0, "layout: no parameters (tensor sizes {tensor_sizes:?})");
        ensure!(
            d <= u32::MAX as usize,
            "layout: {d} parameters do not fit 32-bit sparse indices"
        );
        let segments = match scope {
            Scope::Model => vec![Segment { offset: 0, len: d }],
            Scope::Layer => {
                let mut offset = 0;
                let mut segs = Vec::new();
                for &len in tensor_sizes {
                    if len > 0 {
                        segs.push(Segment { offset, len });
                    }
                    offset += len;
                }
                segs
            }
        };
        Ok(Self { segments, d })
    }

    pub fn d(&self) -> usize {
        self.d
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// k of every segment for a density in (0, 1].
    pub fn ks(&self, density: f64) -> Result<Vec<usize>> {
        if !(density > 0.0 && density <= 1.0) {
            bail!("density {density} must be in (0, 1]");
        }
        Ok(self.segments.iter().map(|s| s.k(density)).collect())
    }

    /// Per-segment top-k of a dense vector of length d, as one global set.
    pub fn select(&self, values: &[f32], ks: &[usize]) -> Result<SparseSet> {
        self.check_len(values.len())?;
        self.check_ks(ks)?;
        let mut out = SparseSet::empty();
        for (s, &k) in self.segments.iter().zip(ks) {
            let part = top_k(&values[s.offset..s.end()], k)
                .with_context(|| format!("segment at offset {} (indices relative to it)", s.offset))?;
            let idx: Vec<u32> = part.idx().iter().map(|&i| i + s.offset as u32).collect();
            out.extend_sorted(&idx, part.val());
        }
        Ok(out)
    }

    /// Per-segment merge: each segment keeps min(k, |union|) of its own pairs.
    pub fn merge(&self, a: &SparseSet, b: &SparseSet, ks: &[usize]) -> Result<(SparseSet, SparseSet)> {
        self.check_ks(ks)?;
        let mut kept = SparseSet::empty();
        let mut dropped = SparseSet::empty();
        for (s, &k) in self.segments.iter().zip(ks) {
            let (lo, hi) = (s.offset as u32, s.end() as u32);
            merge_into(a.range(lo, hi), b.range(lo, hi), k, &mut kept, &mut dropped)?;
        }
        Ok((kept, dropped))
    }

    /// A received set must hold exactly k pairs in every segment: anything else means the peers
    /// disagree on the density or the layout.
    pub fn check_counts(&self, set: &SparseSet, ks: &[usize]) -> Result<()> {
        self.check_ks(ks)?;
        let mut total = 0;
        for (n, (s, &k)) in self.segments.iter().zip(ks).enumerate() {
            let got = set.range(s.offset as u32, s.end() as u32).0.len();
            ensure!(
                got == k,
                "sparse set has {got} pairs in segment {n} (offset {}), expected k = {k}",
                s.offset
            );
            total += got;
        }
        ensure!(
            total == set.len(),
            "sparse set has {} pairs outside the layout of d = {}",
            set.len() - total,
            self.d
        );
        Ok(())
    }

    fn check_len(&self, len: usize) -> Result<()> {
        ensure!(
            len == self.d,
            "vector of length {len} does not match the layout's d = {}",
            self.d
        );
        Ok(())
    }

    fn check_ks(&self, ks: &[usize]) -> Result<()> {
        ensure!(
            ks.len() == self.segments.len(),
            "{} k values for {} segments",
            ks.len(),
            self.segments.len()
        );
        for (s, &k) in self.segments.iter().zip(ks) {
            ensure!(
                k >= 1 && k <= s.len,
                "k = {k} must be in 1..={} for the segment at offset {}",
                s.len,
                s.offset
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::reference::top_k_reference;
    use super::*;

    #[test]
    fn scopes_and_ks() {
        let l = Layout::new(Scope::Layer, &[10, 0, 1000, 5]).unwrap();
        assert_eq!(l.d(), 1015);
        assert_eq!(
            l.segments(),
            &[
                Segment { offset: 0, len: 10 },
                Segment { offset: 10, len: 1000 },
                Segment { offset: 1010, len: 5 }
            ]
        );
        assert_eq!(l.ks(0.01).unwrap(), vec![1, 10, 1]);
        assert_eq!(l.ks(1.0).unwrap(), vec![10, 1000, 5]);
        let m = Layout::new(Scope::Model, &[10, 0, 1000, 5]).unwrap();
        assert_eq!(m.ks(0.01).unwrap(), vec![10]);
        assert!(m.ks(0.0).is_err() && m.ks(1.5).is_err() && m.ks(f64::NAN).is_err());
        assert!(Layout::new(Scope::Model, &[0, 0]).is_err());
        assert!(Layout::new(Scope::Model, &[]).is_err());
    }

    #[test]
    fn select_is_per_segment_with_global_indices() {
        let l = Layout::new(Scope::Layer, &[4, 4]).unwrap();
        let v = [9.0f32, 8.0, 7.0, 6.0, 0.1, -0.3, 0.2, 0.0];
        let s = l.select(&v, &[1, 2]).unwrap();
        assert_eq!(s.idx(), &[0, 5, 6]);
        let whole = Layout::new(Scope::Model, &[4, 4]).unwrap();
        assert_eq!(whole.select(&v, &[3]).unwrap(), top_k_reference(&v, 3));
        assert!(l.select(&v[..7], &[1, 2]).is_err());
        let e = l.select(&v, &[1, 5]).unwrap_err().to_string();
        assert!(e.contains("1..=4"), "{e}");
        l.check_counts(&s, &[1, 2]).unwrap();
        let e = l.check_counts(&s, &[2, 1]).unwrap_err().to_string();
        assert!(e.contains("segment 0"), "{e}");
    }

    #[test]
    fn merge_is_per_segment() {
        let l = Layout::new(Scope::Layer, &[3, 3]).unwrap();
        let a = SparseSet::new(vec![0, 3], vec![1.0, 5.0]).unwrap();
        let b = SparseSet::new(vec![1, 4], vec![2.0, -6.0]).unwrap();
        let (kept, dropped) = l.merge(&a, &b, &[1, 1]).unwrap();
        assert_eq!(kept.idx(), &[1, 4]);
        assert_eq!(dropped.idx(), &[0, 3]);
        l.check_counts(&kept, &[1, 1]).unwrap();
    }
}
