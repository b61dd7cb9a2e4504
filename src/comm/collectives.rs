//! Collectives over point-to-point messages. Deterministic: the order of every floating-point
//! addition depends only on (rank, world size, length), never on timing.

use super::{bytes_to_f32s, f32s_to_bytes, Communicator, Traffic};
use anyhow::{ensure, Context, Result};
use std::ops::Range;

/// The P contiguous chunks a ring all-reduce splits `len` values into (sizes differ by at most one).
pub fn ring_chunks(len: usize, world: usize) -> Vec<Range<usize>> {
    let base = len / world;
    let extra = len % world;
    let mut start = 0;
    (0..world)
        .map(|c| {
            let n = base + usize::from(c < extra);
            let r = start..start + n;
            start += n;
            r
        })
        .collect()
}

pub(super) fn ring_all_reduce<C: Communicator + ?Sized>(c: &mut C, buf: &mut [f32]) -> Result<()> {
    let (rank, world) = (c.rank(), c.world_size());
    if world == 1 {
        return Ok(());
    }
    let chunks = ring_chunks(buf.len(), world);
    // Reduce-scatter: after P-1 steps rank r holds the full sum of chunk (r + 1) mod P.
    for step in 0..world - 1 {
        let send_c = (rank + world - step) % world;
        let recv_c = (rank + world - step - 1) % world;
        let got = shift_chunk(c, buf, &chunks[send_c], &chunks[recv_c])?;
        for (d, g) in buf[chunks[recv_c].clone()].iter_mut().zip(got) {
            *d += g;
        }
    }
    // All-gather of the reduced chunks: copies, so every rank ends with the same bits.
    for step in 0..world - 1 {
        let send_c = (rank + 1 + world - step) % world;
        let recv_c = (rank + world - step) % world;
        let got = shift_chunk(c, buf, &chunks[send_c], &chunks[recv_c])?;
        buf[chunks[recv_c].clone()].copy_from_slice(&got);
    }
    Ok(())
}

/// One ring step: chunk `send` of `buf` goes right, the left neighbour's chunk `recv` comes back.
fn shift_chunk<C: Communicator + ?Sized>(
    c: &mut C,
    buf: &[f32],
    send: &Range<usize>,
    recv: &Range<usize>,
) -> Result<Vec<f32>> {
    let world = c.world_size();
    let (right, left) = ((c.rank() + 1) % world, (c.rank() + world - 1) % world);
    c.send(right, &f32s_to_bytes(&buf[send.clone()]))?;
    let got = bytes_to_f32s(&c.recv(left)?)?;
    ensure!(
        got.len() == recv.len(),
        "all-reduce: rank {left} sent {} values, expected {}",
        got.len(),
        recv.len()
    );
    Ok(got)
}

/// What `ring_all_reduce` of `len` f32 values counts on `rank`: chunks r, r-1, .. go out in the
/// reduce-scatter and r+1, r, .. in the all-gather, and as many come in from the left.
pub fn ring_all_reduce_traffic(len: usize, world: usize, rank: usize) -> Traffic {
    let chunks = ring_chunks(len, world);
    let sent: usize = (0..world.saturating_sub(1))
        .map(|s| chunks[(rank + world - s) % world].len() + chunks[(rank + 1 + world - s) % world].len())
        .sum();
    let left = (rank + world - 1) % world;
    let recv: usize = (0..world.saturating_sub(1))
        .map(|s| chunks[(left + world - s) % world].len() + chunks[(left + 1 + world - s) % world].len())
        .sum();
    Traffic {
        sent: 4 * sent as u64,
        recv: 4 * recv as u64,
    }
}

/// What `ring_all_gather` counts on `rank` when rank q brings `lens[q]` bytes: every piece but the
/// right neighbour's goes out, every piece but its own comes in.
pub fn ring_all_gather_traffic(lens: &[usize], rank: usize) -> Traffic {
    let world = lens.len();
    if world <= 1 {
        return Traffic::default();
    }
    let total: usize = lens.iter().sum();
    Traffic {
        sent: (total - lens[(rank + 1) % world]) as u64,
        recv: (total - lens[rank]) as u64,
    }
}

/// What `tree_broadcast` of a `len`-byte message counts on `rank`.
pub fn tree_broadcast_traffic(world: usize, root: usize, rank: usize, len: usize) -> Traffic {
    let mut t = Traffic::default();
    for &(from, to) in broadcast_schedule(world, root).iter().flatten() {
        if from == rank {
            t.sent += len as u64;
        }
        if to == rank {
            t.recv += len as u64;
        }
    }
    t
}

pub(super) fn ring_all_gather<C: Communicator + ?Sized>(c: &mut C, msg: &[u8]) -> Result<Vec<Vec<u8>>> {
    let (rank, world) = (c.rank(), c.world_size());
    let mut out: Vec<Vec<u8>> = vec![Vec::new(); world];
    out[rank] = msg.to_vec();
    let right = (rank + 1) % world;
    let left = (rank + world - 1) % world;
    for step in 0..world.saturating_sub(1) {
        let send_from = (rank + world - step) % world;
        let recv_from = (rank + world - step - 1) % world;
        let m = std::mem::take(&mut out[send_from]);
        c.send(right, &m)?;
        out[send_from] = m;
        out[recv_from] = c
            .recv(left)
            .with_context(|| format!("all-gather: piece of rank {recv_from}"))?;
    }
    Ok(out)
}

/// Binomial-tree broadcast schedule: `(from, to)` pairs per round, ranks relative to `root`.
pub fn broadcast_schedule(world: usize, root: usize) -> Vec<Vec<(usize, usize)>> {
    let mut rounds = Vec::new();
    let mut span = 1;
    while span < world {
        let round = (0..span)
            .filter(|v| v + span < world)
            .map(|v| ((v + root) % world, (v + span + root) % world))
            .collect();
        rounds.push(round);
        span *= 2;
    }
    rounds
}

pub(super) fn tree_broadcast<C: Communicator + ?Sized>(c: &mut C, root: usize, msg: &mut Vec<u8>) -> Result<()> {
    let rank = c.rank();
    ensure!(
        root < c.world_size(),
        "broadcast root {root} outside world of {}",
        c.world_size()
    );
    for round in broadcast_schedule(c.world_size(), root) {
        for (from, to) in round {
            if from == rank {
                c.send(to, msg)?;
            } else if to == rank {
                *msg = c.recv(from).with_context(|| format!("broadcast from root {root}"))?;
            }
        }
    }
    Ok(())
}
