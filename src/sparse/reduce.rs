//! gTop-k over a communicator: every rank brings its k-set and leaves with the same global k-set
//! (per segment), the sum of the contributions that survived every merge.
//!
//! Error feedback needs to know where mass left the pipeline. Each rank also returns `absorb`: the
//! pairs that it, and only it, must add back into its residual — what its merges dropped and what
//! its sends lost to wire rounding. In recursive doubling a whole group computes the same merge,
//! so only the group's lowest rank absorbs (`group_leader`); otherwise the mass would come back
//! twice.

use super::config::GtopkAlgo;
use super::layout::Layout;
use super::schedule::{group_leader, recursive_doubling_schedule, tree_schedule};
use super::set::SparseSet;
use super::wire::Wire;
use crate::comm::Communicator;
use anyhow::{Context, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct Reduction {
    /// Identical bits on every rank; not yet divided by P.
    pub global: SparseSet,
    /// This rank's share of dropped and rounded-away pairs; indices may repeat.
    pub absorb: Vec<(u32, f32)>,
}

/// `local`: this rank's selected set in `layout` with `ks[s]` pairs in segment s.
pub fn gtopk_reduce(
    comm: &mut dyn Communicator,
    algo: GtopkAlgo,
    local: SparseSet,
    layout: &Layout,
    ks: &[usize],
    wire: Wire,
) -> Result<Reduction> {
    layout.check_counts(&local, ks).context("gtop-k: this rank's own set")?;
    let mut r = Reducer {
        comm,
        layout,
        ks,
        wire,
        absorb: Vec::new(),
    };
    let global = match algo {
        GtopkAlgo::Tree => r.tree(local)?,
        GtopkAlgo::RecursiveDoubling => r.recursive_doubling(local)?,
    };
    Ok(Reduction {
        global,
        absorb: r.absorb,
    })
}

/// Top-k S-SGD's exchange: every rank's set to every rank (ring all-gather), each checked. The
/// sets come in rank order on every rank, so adding them in that order gives identical bits
/// everywhere.
pub fn topk_gather(
    comm: &mut dyn Communicator,
    local: &SparseSet,
    layout: &Layout,
    ks: &[usize],
    wire: Wire,
) -> Result<Vec<SparseSet>> {
    let pieces = comm.all_gather(&wire.encode(local))?;
    pieces
        .iter()
        .enumerate()
        .map(|(r, piece)| {
            wire.decode(piece, layout.d())
                .and_then(|s| layout.check_counts(&s, ks).map(|()| s))
                .with_context(|| format!("top-k all-gather: set of rank {r}"))
        })
        .collect()
}

struct Reducer<'a> {
    comm: &'a mut dyn Communicator,
    layout: &'a Layout,
    ks: &'a [usize],
    wire: Wire,
    absorb: Vec<(u32, f32)>,
}

impl Reducer<'_> {
    fn tree(&mut self, local: SparseSet) -> Result<SparseSet> {
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let mut set = local;
        'rounds: for (r, round) in tree_schedule(world).iter().enumerate() {
            for &(from, to) in round {
                if from == rank {
                    let sent = self.rounded(&set, true);
                    self.send(to, &sent).with_context(|| format!("gtop-k tree round {r}"))?;
                    break 'rounds;
                }
                if to == rank {
                    let other = self.recv(from).with_context(|| format!("gtop-k tree round {r}"))?;
                    set = self.merge(&set, &other, true)?;
                }
            }
        }
        if world == 1 {
            return Ok(set);
        }
        let mut msg = if rank == 0 {
            let g = self.rounded(&set, true);
            self.wire.encode(&g)
        } else {
            Vec::new()
        };
        self.comm
            .broadcast(0, &mut msg)
            .context("gtop-k tree: broadcast of the global set")?;
        self.decode(&msg).context("gtop-k tree: broadcast of the global set")
    }

    fn recursive_doubling(&mut self, local: SparseSet) -> Result<SparseSet> {
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let s = recursive_doubling_schedule(world);
        if rank >= s.core {
            let partner = rank - s.core;
            let sent = self.rounded(&local, true);
            self.send(partner, &sent)
                .context("gtop-k recursive doubling: pre-fold")?;
            return self.recv(partner).context("gtop-k recursive doubling: final set");
        }
        let mut set = local;
        if rank + s.core < world {
            let other = self
                .recv(rank + s.core)
                .context("gtop-k recursive doubling: pre-fold")?;
            set = self.merge(&set, &other, true)?;
        }
        for r in 0..s.rounds.len() as u32 {
            let peer = rank ^ (1 << r);
            // Both peers merge what the other one decodes, so each side merges its own rounded set.
            let mine = self.rounded(&set, group_leader(rank, r) == rank);
            let other = self
                .exchange(peer, &mine)
                .with_context(|| format!("gtop-k recursive doubling round {r}"))?;
            set = self.merge(&mine, &other, group_leader(rank, r + 1) == rank)?;
        }
        if world > s.core {
            // The folded ranks receive the set rounded, so everyone uses the rounded set.
            set = self.rounded(&set, rank == 0);
            if rank + s.core < world {
                self.send(rank + s.core, &set)
                    .context("gtop-k recursive doubling: post-fold")?;
            }
        }
        Ok(set)
    }

    /// The set as the wire delivers it; `keep_loss`: this rank owns what rounding removes.
    fn rounded(&mut self, set: &SparseSet, keep_loss: bool) -> SparseSet {
        if !self.wire.is_lossy() {
            return set.clone();
        }
        let mut out = set.clone();
        for (v, (i, orig)) in out.val_mut().iter_mut().zip(set.iter()) {
            *v = self.wire.round(orig);
            // Equal values (including infinities) lose nothing; inf - inf would be NaN.
            if keep_loss && *v != orig {
                self.absorb.push((i, orig - *v));
            }
        }
        out
    }

    fn merge(&mut self, a: &SparseSet, b: &SparseSet, keep_dropped: bool) -> Result<SparseSet> {
        let (kept, dropped) = self.layout.merge(a, b, self.ks)?;
        if keep_dropped {
            self.absorb.extend(dropped.iter());
        }
        Ok(kept)
    }

    fn send(&mut self, to: usize, set: &SparseSet) -> Result<()> {
        self.comm.send(to, &self.wire.encode(set))
    }

    fn recv(&mut self, from: usize) -> Result<SparseSet> {
        let msg = self.comm.recv(from)?;
        self.decode(&msg)
            .with_context(|| format!("set received from rank {from}"))
    }

    /// Both peers send at once: a backend whose `send` waits for the `recv` needs them paired.
    fn exchange(&mut self, peer: usize, set: &SparseSet) -> Result<SparseSet> {
        let msg = self.comm.exchange(peer, &self.wire.encode(set))?;
        self.decode(&msg)
            .with_context(|| format!("set received from rank {peer}"))
    }

    fn decode(&self, msg: &[u8]) -> Result<SparseSet> {
        let set = self.wire.decode(msg, self.layout.d())?;
        self.layout.check_counts(&set, self.ks)?;
        Ok(set)
    }
}
