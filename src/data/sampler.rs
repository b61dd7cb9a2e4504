//! The distributed sampler: every epoch a fresh permutation of the training set drawn from the seed;
//! in step s, worker p takes the p-th slice of the s-th global batch, so shards are disjoint and the
//! whole order is a pure function of (seed, epoch) — which is what makes resuming exact.

use crate::rng::Rng;

#[derive(Clone, Debug)]
pub struct Sampler {
    seed: u64,
    len: usize,
    global_batch: usize,
    workers: usize,
}

impl Sampler {
    pub fn new(seed: u64, len: usize, global_batch: usize, workers: usize) -> Self {
        assert!(global_batch.is_multiple_of(workers) && global_batch > 0);
        Self {
            seed,
            len,
            global_batch,
            workers,
        }
    }

    /// Incomplete batches are skipped, as in the authors' trainer.
    pub fn steps_per_epoch(&self) -> usize {
        self.len / self.global_batch
    }

    pub fn order(&self, epoch: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.len).collect();
        Rng::derive(self.seed, "sampler", epoch as u64).shuffle(&mut idx);
        idx
    }

    /// Worker `rank`'s sample indices for `step` (0-based within the epoch) of an epoch's `order`.
    pub fn batch<'a>(&self, order: &'a [usize], step: usize, rank: usize) -> &'a [usize] {
        let b = self.global_batch / self.workers;
        let start = step * self.global_batch + rank * b;
        &order[start..start + b]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_disjoint_and_reshuffled() {
        let s = Sampler::new(9, 103, 12, 3);
        assert_eq!(s.steps_per_epoch(), 8);
        let o = s.order(0);
        let mut seen = std::collections::HashSet::new();
        for step in 0..s.steps_per_epoch() {
            for r in 0..3 {
                for &i in s.batch(&o, step, r) {
                    assert!(seen.insert(i), "sample {i} given twice");
                }
            }
        }
        assert_eq!(seen.len(), 96);
        assert_ne!(s.order(0), s.order(1));
        assert_eq!(s.order(1), Sampler::new(9, 103, 12, 3).order(1));
    }
}
