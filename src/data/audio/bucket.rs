//! The authors' `DistributedBucketingSampler`: the duration-sorted set is cut into bins of
//! `batch_size` consecutive utterances (so a batch holds similar lengths and wastes little padding),
//! and rank r of P takes bins r, r + P, r + 2P, ... in that order every epoch (their `set_epoch` is a
//! no-op, so there is no reshuffling). When P does not divide the number of bins, the list is
//! topped up with the first bins again, so that every rank runs the same number of synchronous steps.
//! The last bin may be short.

use std::ops::Range;

#[derive(Clone, Debug)]
pub struct Bucketing {
    len: usize,
    batch_size: usize,
    workers: usize,
}

impl Bucketing {
    pub fn new(len: usize, batch_size: usize, workers: usize) -> Self {
        assert!(
            batch_size > 0 && workers > 0,
            "Bucketing::new({len}, {batch_size}, {workers})"
        );
        Self {
            len,
            batch_size,
            workers,
        }
    }

    pub fn num_bins(&self) -> usize {
        self.len.div_ceil(self.batch_size)
    }

    /// Bin b: utterances [b * batch_size, min((b + 1) * batch_size, len)).
    pub fn bin(&self, b: usize) -> Range<usize> {
        let start = b * self.batch_size;
        start..(start + self.batch_size).min(self.len)
    }

    /// ceil(bins / workers), the same for every rank; 0 for an empty set.
    pub fn steps_per_epoch(&self) -> usize {
        self.num_bins().div_ceil(self.workers)
    }

    /// Rank `rank`'s utterance indices at `step`.
    pub fn batch(&self, step: usize, rank: usize) -> Range<usize> {
        assert!(
            rank < self.workers && step < self.steps_per_epoch(),
            "step {step} rank {rank}"
        );
        self.bin((step * self.workers + rank) % self.num_bins())
    }

    /// All of rank `rank`'s batches of an epoch, in order.
    pub fn rank_batches(&self, rank: usize) -> Vec<Range<usize>> {
        (0..self.steps_per_epoch()).map(|s| self.batch(s, rank)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranks_take_every_pth_bin() {
        let b = Bucketing::new(23, 4, 3);
        assert_eq!(b.num_bins(), 6);
        assert_eq!(b.bin(5), 20..23);
        assert_eq!(b.rank_batches(1), [4..8, 16..20]);
        assert_eq!(b.rank_batches(2), [8..12, 20..23]);
        // 7 bins on 3 ranks: the list is topped up with bins 0 and 1.
        let b = Bucketing::new(27, 4, 3);
        assert_eq!(b.steps_per_epoch(), 3);
        assert_eq!(b.rank_batches(0), [0..4, 12..16, 24..27]);
        assert_eq!(b.rank_batches(1), [4..8, 16..20, 0..4]);
        assert_eq!(b.rank_batches(2), [8..12, 20..24, 4..8]);
        assert_eq!(Bucketing::new(0, 4, 2).steps_per_epoch(), 0);
    }

    proptest! {
        /// Every utterance is in exactly one rank's share when P divides the bins; otherwise the
        /// top-up gives a bin at most 1 + ceil(P / bins) times. Bins are never empty.
        #[test]
        fn ranks_are_disjoint_and_cover(len in 1usize..300, batch in 1usize..20, workers in 1usize..9) {
            let b = Bucketing::new(len, batch, workers);
            let mut seen = vec![0usize; len];
            for r in 0..workers {
                prop_assert_eq!(b.rank_batches(r).len(), b.steps_per_epoch());
                for range in b.rank_batches(r) {
                    prop_assert!(!range.is_empty() && range.len() <= batch);
                    range.for_each(|i| seen[i] += 1);
                }
            }
            prop_assert!(seen.iter().all(|&c| c >= 1));
            if b.num_bins().is_multiple_of(workers) {
                prop_assert!(seen.iter().all(|&c| c == 1));
            } else {
                prop_assert!(seen.iter().all(|&c| c <= 1 + workers.div_ceil(b.num_bins())));
            }
        }
    }
}
