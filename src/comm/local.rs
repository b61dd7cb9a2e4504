//! Workers as threads of one process: one unbounded channel per ordered pair of ranks.

use super::{Communicator, Traffic};
use anyhow::{anyhow, bail, Result};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

pub struct LocalComm {
    rank: usize,
    to: Vec<Option<Sender<Vec<u8>>>>,
    from: Vec<Option<Receiver<Vec<u8>>>>,
    timeout: Duration,
    traffic: Traffic,
}

impl LocalComm {
    /// The `world` endpoints of one group; hand endpoint r to worker r.
    pub fn group(world: usize, timeout: Duration) -> Vec<LocalComm> {
        let mut comms: Vec<LocalComm> = (0..world)
            .map(|rank| LocalComm {
                rank,
                to: (0..world).map(|_| None).collect(),
                from: (0..world).map(|_| None).collect(),
                timeout,
                traffic: Traffic::default(),
            })
            .collect();
        for src in 0..world {
            for dst in 0..world {
                if src != dst {
                    let (tx, rx) = channel();
                    comms[src].to[dst] = Some(tx);
                    comms[dst].from[src] = Some(rx);
                }
            }
        }
        comms
    }

    fn peer_check(&self, peer: usize) -> Result<()> {
        if peer >= self.to.len() || peer == self.rank {
            bail!(
                "rank {}: invalid peer rank {peer} (world size {})",
                self.rank,
                self.to.len()
            );
        }
        Ok(())
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.to.len()
    }

    fn send(&mut self, to: usize, msg: &[u8]) -> Result<()> {
        self.peer_check(to)?;
        let tx = self.to[to].as_ref().expect("channel exists for every peer");
        tx.send(msg.to_vec())
            .map_err(|_| anyhow!("rank {}: rank {to} is gone (its worker stopped)", self.rank))?;
        self.traffic.sent += msg.len() as u64;
        Ok(())
    }

    fn recv(&mut self, from: usize) -> Result<Vec<u8>> {
        self.peer_check(from)?;
        let rx = self.from[from].as_ref().expect("channel exists for every peer");
        let msg = rx.recv_timeout(self.timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => anyhow!(
                "rank {}: no message from rank {from} within {:?} (dist.timeout)",
                self.rank,
                self.timeout
            ),
            RecvTimeoutError::Disconnected => {
                anyhow!("rank {}: rank {from} is gone (its worker stopped)", self.rank)
            }
        })?;
        self.traffic.recv += msg.len() as u64;
        Ok(msg)
    }

    fn traffic(&self) -> Traffic {
        self.traffic
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::ring_chunks;
    use std::thread;

    fn run<T: Send + 'static>(world: usize, f: impl Fn(LocalComm) -> T + Send + Sync + Copy + 'static) -> Vec<T> {
        let handles: Vec<_> = LocalComm::group(world, Duration::from_secs(10))
            .into_iter()
            .map(|c| thread::spawn(move || f(c)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn data(rank: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((rank * 31 + i * 7) % 13) as f32 * 0.25 - 1.5)
            .collect()
    }

    #[test]
    fn all_reduce_is_the_sum_everywhere_with_ring_byte_counts() {
        for world in 1..=5 {
            for len in [0usize, 1, 3, 10, 17] {
                let out = run(world, move |mut c| {
                    let mut buf = data(c.rank(), len);
                    c.all_reduce_sum(&mut buf).unwrap();
                    (buf, c.traffic())
                });
                let want: Vec<f32> = (0..len).map(|i| (0..world).map(|r| data(r, len)[i]).sum()).collect();
                let chunks = ring_chunks(len, world);
                for (rank, (buf, t)) in out.iter().enumerate() {
                    assert_eq!(buf, &out[0].0, "ranks disagree bitwise");
                    for (a, b) in buf.iter().zip(&want) {
                        assert!((a - b).abs() < 1e-5);
                    }
                    // Reduce-scatter sends chunks r, r-1, ..; all-gather sends r+1, r, ..: P-1 each.
                    let expect: usize = (0..world.saturating_sub(1))
                        .map(|s| {
                            chunks[(rank + world - s) % world].len() + chunks[(rank + 1 + world - s) % world].len()
                        })
                        .sum();
                    assert_eq!(t.sent as usize, 4 * expect);
                }
                let sent: u64 = out.iter().map(|o| o.1.sent).sum();
                let recv: u64 = out.iter().map(|o| o.1.recv).sum();
                assert_eq!(sent, recv);
            }
        }
    }

    #[test]
    fn all_gather_and_broadcast_deliver_every_piece() {
        for world in 1..=6 {
            let out = run(world, |mut c| {
                let mine = vec![c.rank() as u8; c.rank() + 1];
                let all = c.all_gather(&mine).unwrap();
                let mut b = if c.rank() == world_root(c.world_size()) {
                    vec![9, 9, 9]
                } else {
                    vec![]
                };
                c.broadcast(world_root(c.world_size()), &mut b).unwrap();
                (all, b, c.traffic())
            });
            for (all, b, _) in &out {
                for (r, piece) in all.iter().enumerate() {
                    assert_eq!(piece, &vec![r as u8; r + 1]);
                }
                assert_eq!(b, &vec![9, 9, 9]);
            }
            let bcast_msgs = world as u64 - 1;
            let gather: u64 = (0..world as u64).map(|r| (r + 1) * (world as u64 - 1)).sum();
            assert_eq!(out.iter().map(|o| o.2.sent).sum::<u64>(), gather + 3 * bcast_msgs);
        }
    }

    fn world_root(world: usize) -> usize {
        world / 2
    }

    /// The NCCL backend reports these formulas instead of counting; they must be what the default
    /// collectives really count.
    #[test]
    fn traffic_formulas_match_the_default_collectives() {
        use crate::comm::{ring_all_gather_traffic, ring_all_reduce_traffic, tree_broadcast_traffic};
        for world in 1..=6 {
            for len in [0usize, 1, 5, 13] {
                let out = run(world, move |mut c| {
                    let rank = c.rank();
                    let t0 = c.traffic();
                    c.all_reduce_sum(&mut data(rank, len)).unwrap();
                    let t1 = c.traffic();
                    let lens: Vec<usize> = (0..world).map(|r| (r * 7 + len) % 11).collect();
                    c.all_gather(&vec![1u8; lens[rank]]).unwrap();
                    let t2 = c.traffic();
                    let root = len % world;
                    let mut msg = if rank == root { vec![2u8; len] } else { Vec::new() };
                    c.broadcast(root, &mut msg).unwrap();
                    let t3 = c.traffic();
                    (rank, t1 - t0, t2 - t1, t3 - t2, lens, root)
                });
                for (rank, reduce, gather, bcast, lens, root) in out {
                    assert_eq!(
                        reduce,
                        ring_all_reduce_traffic(len, world, rank),
                        "P {world} len {len} r {rank}"
                    );
                    assert_eq!(gather, ring_all_gather_traffic(&lens, rank), "P {world} r {rank}");
                    assert_eq!(
                        bcast,
                        tree_broadcast_traffic(world, root, rank, len),
                        "P {world} r {rank}"
                    );
                }
            }
        }
    }

    #[test]
    fn exchange_is_send_then_recv() {
        let out = run(2, |mut c| {
            let peer = 1 - c.rank();
            let got = c.exchange(peer, &vec![c.rank() as u8; 3 + c.rank()]).unwrap();
            (got, c.traffic())
        });
        assert_eq!(out[0].0, vec![1u8; 4]);
        assert_eq!(out[1].0, vec![0u8; 3]);
        assert_eq!(out[0].1, Traffic { sent: 3, recv: 4 });
        assert_eq!(out[1].1, Traffic { sent: 4, recv: 3 });
    }

    #[test]
    fn a_dead_peer_is_an_error_not_a_hang() {
        let mut comms = LocalComm::group(2, Duration::from_millis(200));
        let c1 = comms.pop().unwrap();
        let mut c0 = comms.pop().unwrap();
        drop(c1);
        let err = c0.recv(1).unwrap_err().to_string();
        assert!(err.contains("rank 1 is gone"), "{err}");
        let err = c0.send(1, &[1]).unwrap_err().to_string();
        assert!(err.contains("rank 1 is gone"), "{err}");
        let mut comms = LocalComm::group(2, Duration::from_millis(50));
        let err = comms[0].recv(1).unwrap_err().to_string();
        assert!(err.contains("within"), "{err}");
        assert!(comms[0].send(0, &[]).is_err());
    }
}
