//! Who talks to whom in each gTop-k round, as pure functions of the world size, so the byte counts
//! and the reference reductions in the tests can be derived from the same schedules the
//! communicating code follows.

/// Binomial-tree reduction to rank 0: per round, `(from, to)` messages. In round r a rank with
/// `rank mod 2^(r+1) == 2^r` sends to `rank - 2^r` and drops out; ranks whose partner would lie
/// outside the world simply wait, so any P works.
pub fn tree_schedule(world: usize) -> Vec<Vec<(usize, usize)>> {
    let mut rounds = Vec::new();
    let mut span = 1;
    while span < world {
        rounds.push(
            (span..world)
                .step_by(2 * span)
                .map(|from| (from, from - span))
                .collect(),
        );
        span *= 2;
    }
    rounds
}

/// Recursive doubling with a fold for world sizes that are not powers of two.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RdSchedule {
    /// The largest power of two <= P: the ranks that take part in the exchange rounds.
    pub core: usize,
    /// `(from, to)`: ranks >= core hand their set to `rank - core`, which merges it.
    pub prefold: Vec<(usize, usize)>,
    /// Per round r, the pairs `(a, a ^ 2^r)` with `a < peer`; both send and both merge.
    pub rounds: Vec<Vec<(usize, usize)>>,
    /// `(from, to)`: the final set goes back out to the folded ranks.
    pub postfold: Vec<(usize, usize)>,
}

pub fn recursive_doubling_schedule(world: usize) -> RdSchedule {
    assert!(world >= 1, "world size 0");
    let core = 1usize << (usize::BITS - 1 - world.leading_zeros());
    let prefold: Vec<(usize, usize)> = (core..world).map(|r| (r, r - core)).collect();
    let mut rounds = Vec::new();
    let mut span = 1;
    while span < core {
        rounds.push((0..core).filter(|a| a & span == 0).map(|a| (a, a | span)).collect());
        span *= 2;
    }
    let postfold = prefold.iter().map(|&(from, to)| (to, from)).collect();
    RdSchedule {
        core,
        prefold,
        rounds,
        postfold,
    }
}

impl RdSchedule {
    /// Number of point-to-point messages of one set in the whole reduction.
    pub fn messages(&self) -> usize {
        self.prefold.len() + 2 * self.rounds.iter().map(Vec::len).sum::<usize>() + self.postfold.len()
    }
}

/// The lowest rank of the group of `2^level` ranks that `rank` belongs to: the one rank that keeps
/// what a group-wide computation drops or rounds away, since every member computes it alike.
pub fn group_leader(rank: usize, level: u32) -> usize {
    rank & !((1usize << level) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_for_eight_matches_the_paper_code() {
        assert_eq!(
            tree_schedule(8),
            vec![vec![(1, 0), (3, 2), (5, 4), (7, 6)], vec![(2, 0), (6, 4)], vec![(4, 0)]]
        );
        assert!(tree_schedule(1).is_empty());
        assert_eq!(
            tree_schedule(6),
            vec![vec![(1, 0), (3, 2), (5, 4)], vec![(2, 0)], vec![(4, 0)]]
        );
    }

    #[test]
    fn tree_reaches_rank_zero_from_everyone_once() {
        for world in 1..=40 {
            let s = tree_schedule(world);
            let want_rounds = (world as f64).log2().ceil() as usize;
            assert_eq!(s.len(), want_rounds, "P = {world}");
            let mut sent = vec![false; world];
            let mut gone = vec![false; world];
            for round in &s {
                for &(from, to) in round {
                    assert!(!gone[from] && !gone[to], "P = {world}: inactive rank used");
                    assert!(!sent[from]);
                    sent[from] = true;
                }
                for &(from, _) in round {
                    gone[from] = true;
                }
            }
            assert!(!sent[0]);
            assert_eq!(sent.iter().filter(|&&s| s).count(), world - 1);
        }
    }

    #[test]
    fn recursive_doubling_pairs_everyone_each_round() {
        for world in 1..=40 {
            let s = recursive_doubling_schedule(world);
            assert!(s.core.is_power_of_two() && s.core <= world && 2 * s.core > world);
            assert_eq!(s.rounds.len(), s.core.trailing_zeros() as usize);
            for (r, round) in s.rounds.iter().enumerate() {
                let mut seen = vec![0; s.core];
                for &(a, b) in round {
                    assert_eq!(a ^ b, 1 << r);
                    assert!(a < b);
                    seen[a] += 1;
                    seen[b] += 1;
                }
                assert!(seen.iter().all(|&n| n == 1), "P = {world} round {r}");
            }
            assert_eq!(s.prefold.len(), world - s.core);
            assert!(s.prefold.iter().all(|&(f, t)| f >= s.core && t == f - s.core));
            assert_eq!(s.messages(), 2 * (world - s.core) + s.core * s.rounds.len());
        }
        let s = recursive_doubling_schedule(6);
        assert_eq!(s.prefold, vec![(4, 0), (5, 1)]);
        assert_eq!(s.postfold, vec![(0, 4), (1, 5)]);
        assert_eq!(s.rounds, vec![vec![(0, 1), (2, 3)], vec![(0, 2), (1, 3)]]);
    }

    #[test]
    fn group_leaders() {
        assert_eq!(group_leader(7, 0), 7);
        assert_eq!(group_leader(7, 1), 6);
        assert_eq!(group_leader(7, 2), 4);
        assert_eq!(group_leader(5, 3), 0);
    }
}
