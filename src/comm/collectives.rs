//! Collectives over point-to-point messages. Deterministic: the order of every floating-point
//! addition depends only on (rank, world size, length), never on timing.

use super::{f32s_as_le_bytes, Communicator, Traffic};
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

/// Values per message of the ring: chunks are cut into segments this long, so that a segment can
/// travel on while the rest of its chunk is still arriving (1 MiB of f32).
const SEGMENT: usize = 1 << 18;

/// `range` cut into consecutive pieces of at most `SEGMENT` values (one piece if it is empty).
fn segments(range: &Range<usize>) -> impl Iterator<Item = Range<usize>> + '_ {
    let n = range.len().div_ceil(SEGMENT).max(1);
    (0..n).map(move |j| range.start + j * SEGMENT..(range.start + (j + 1) * SEGMENT).min(range.end))
}

/// Ring all-reduce: P-1 reduce-scatter steps, then P-1 all-gather steps, each moving one chunk to
/// the right neighbour. Pipelined by segment: segment j of step s goes out as soon as segment j
/// of step s-1 (the same chunk) has come in and been added, so the link stays busy while the
/// adds run, instead of idling between whole chunks. The order of additions is the unpipelined
/// ring's, so every rank ends with the same bits as before.
pub(super) fn ring_all_reduce<C: Communicator + ?Sized>(c: &mut C, buf: &mut [f32]) -> Result<()> {
    let (rank, world) = (c.rank(), c.world_size());
    if world == 1 {
        return Ok(());
    }
    let chunks = ring_chunks(buf.len(), world);
    let (right, left) = ((rank + 1) % world, (rank + world - 1) % world);
    let steps = 2 * (world - 1);
    // Reduce-scatter step s sends chunk rank - s; all-gather step t = s - (P-1) sends rank + 1 - t.
    // What step s receives is what step s + 1 sends.
    let send_chunk = |s: usize| {
        if s < world - 1 {
            (rank + world - s) % world
        } else {
            (rank + 1 + world - (s - (world - 1))) % world
        }
    };
    for s in 0..steps {
        for seg in segments(&chunks[send_chunk(s)]) {
            if s > 0 {
                take_segment(c, left, s - 1 < world - 1, &mut buf[seg.clone()])?;
            }
            c.send(right, &f32s_as_le_bytes(&buf[seg]))?;
        }
    }
    let last = (send_chunk(steps - 1) + world - 1) % world;
    for seg in segments(&chunks[last]) {
        take_segment(c, left, false, &mut buf[seg])?;
    }
    Ok(())
}

/// One segment from the left neighbour into `dst`: added in the reduce-scatter, copied in the
/// all-gather (so all ranks end equal). Read from the message's bytes in place: a segment is
/// touched once on its way in.
fn take_segment<C: Communicator + ?Sized>(c: &mut C, left: usize, add: bool, dst: &mut [f32]) -> Result<()> {
    let got = c.recv(left)?;
    ensure!(
        got.len() == 4 * dst.len(),
        "all-reduce: rank {left} sent {} bytes, expected {} values",
        got.len(),
        dst.len()
    );
    let values = got
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if add {
        dst.iter_mut().zip(values).for_each(|(d, g)| *d += g);
    } else {
        dst.iter_mut().zip(values).for_each(|(d, g)| *d = g);
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::local::LocalComm;
    use crate::rng::Rng;
    use std::time::Duration;

    fn values(rank: usize, len: usize) -> Vec<f32> {
        let mut rng = Rng::derive(7, "ring", rank as u64);
        (0..len).map(|_| rng.normal() * 1e3).collect()
    }

    /// The ring's order of additions, element by element: chunk c starts at rank c and each next
    /// rank adds its own value to what came in.
    fn ring_order_sum(world: usize, len: usize) -> Vec<f32> {
        let all: Vec<Vec<f32>> = (0..world).map(|r| values(r, len)).collect();
        let mut out = vec![0f32; len];
        for (c, range) in ring_chunks(len, world).into_iter().enumerate() {
            for i in range {
                let mut acc = all[c][i];
                for q in 1..world {
                    acc += all[(c + q) % world][i];
                }
                out[i] = acc;
            }
        }
        out
    }

    #[test]
    fn the_pipelined_ring_adds_in_the_ring_order_on_every_rank() {
        // Lengths with one segment per chunk, several (the last one short), and empty chunks.
        for (world, len) in [
            (2, 5),
            (3, 2),
            (3, 3 * SEGMENT + 7),
            (4, 2 * 4 * SEGMENT + 4 * 3 + 1),
            (5, SEGMENT + 1),
        ] {
            let handles: Vec<_> = LocalComm::group(world, Duration::from_secs(30))
                .into_iter()
                .map(|mut c| {
                    std::thread::spawn(move || {
                        let mut buf = values(c.rank(), len);
                        c.all_reduce_sum(&mut buf).unwrap();
                        buf
                    })
                })
                .collect();
            let want = ring_order_sum(world, len);
            for (rank, h) in handles.into_iter().enumerate() {
                let got = h.join().unwrap();
                assert!(
                    got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "P = {world}, len = {len}: rank {rank} differs from the ring's order of additions"
                );
            }
        }
    }

    #[test]
    fn segments_cover_a_range_in_order() {
        for range in [0..0, 3..3, 5..6, 0..SEGMENT, 7..7 + 2 * SEGMENT + 1] {
            let segs: Vec<_> = segments(&range).collect();
            assert_eq!(segs.first().unwrap().start, range.start);
            assert_eq!(segs.last().unwrap().end, range.end);
            assert!(segs.windows(2).all(|w| w[0].end == w[1].start));
            assert!(segs.iter().all(|s| s.len() <= SEGMENT));
        }
    }
}
