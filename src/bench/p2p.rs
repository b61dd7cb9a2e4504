//! `gtopk bench p2p-rank`: a ping-pong between ranks 0 and 1 at sizes from a few bytes to
//! megabytes, and the alpha-beta model fitted to it (a message of n bytes costs alpha + n beta),
//! so that `simulate` can be held to a network it was fitted on.

use super::harness::median;
use super::simulate::Network;
use crate::comm::Communicator;
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct P2pRow {
    pub bytes: usize,
    /// Half the median round trip of a message of `bytes` each way.
    pub one_way_s: f64,
}

/// Ranks 0 and 1 bounce a message of each size `reps` times (after one warm-up); the other ranks
/// wait. The rows are returned on rank 0 (empty elsewhere).
pub fn ping_pong(comm: &mut dyn Communicator, sizes: &[usize], reps: usize) -> Result<Vec<P2pRow>> {
    ensure!(comm.world_size() >= 2, "bench p2p: needs at least 2 ranks");
    ensure!(reps >= 1, "bench p2p: at least one repetition");
    let mut rows = Vec::new();
    for &n in sizes {
        let msg = vec![0x5au8; n];
        let mut rtts = Vec::with_capacity(reps);
        for rep in 0..=reps {
            match comm.rank() {
                0 => {
                    let t = Instant::now();
                    comm.send(1, &msg)?;
                    let back = comm.recv(1)?;
                    ensure!(
                        back.len() == n,
                        "bench p2p: rank 1 returned {} bytes of {n}",
                        back.len()
                    );
                    if rep > 0 {
                        rtts.push(t.elapsed().as_secs_f64());
                    }
                }
                1 => {
                    let got = comm.recv(0)?;
                    comm.send(0, &got)?;
                }
                _ => {}
            }
        }
        if comm.rank() == 0 {
            rows.push(P2pRow {
                bytes: n,
                one_way_s: median(&rtts) / 2.0,
            });
        }
    }
    super::comm::barrier(comm)?;
    Ok(rows)
}

/// The alpha-beta model of `rows`: beta from the two largest messages (the slope of the line
/// through them: bandwidth, with any fixed cost cancelled), alpha from the smallest (its time
/// less its bytes at that bandwidth). A least-squares line over every size would bend to the
/// middle sizes, which a shaper's bucket lets through faster than the line rate. Both are clamped
/// at zero.
pub fn fit(rows: &[P2pRow]) -> Result<Network> {
    let mut by_size = rows.to_vec();
    by_size.sort_by_key(|r| r.bytes);
    by_size.dedup_by_key(|r| r.bytes);
    ensure!(
        by_size.len() >= 2,
        "bench p2p: fitting needs at least two different sizes"
    );
    let (small, a, b) = (by_size[0], by_size[by_size.len() - 2], by_size[by_size.len() - 1]);
    let beta = ((b.one_way_s - a.one_way_s) / (b.bytes - a.bytes) as f64).max(0.0);
    let alpha = (small.one_way_s - small.bytes as f64 * beta).max(0.0);
    Ok(Network {
        name: "fit",
        alpha,
        beta,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::local::LocalComm;
    use std::time::Duration;

    #[test]
    fn the_fit_recovers_a_line() {
        let (alpha, beta) = (50e-6, 1.0 / 117e6);
        let rows: Vec<P2pRow> = [8usize, 1 << 10, 1 << 16, 1 << 20, 1 << 24]
            .iter()
            .map(|&n| P2pRow {
                bytes: n,
                one_way_s: alpha + n as f64 * beta,
            })
            .collect();
        let net = fit(&rows).unwrap();
        assert!((net.alpha - alpha).abs() < 1e-12, "{net:?}");
        assert!((net.beta - beta).abs() < 1e-9 * beta, "{net:?}");
        assert!(fit(&rows[..1]).is_err());
        // A bucket that lets the middle sizes through at once does not bend the line.
        let mut bucketed = rows.clone();
        bucketed[2].one_way_s = alpha;
        assert_eq!(fit(&bucketed).unwrap(), net);
    }

    #[test]
    fn ping_pong_reports_every_size_on_rank_0_only() {
        let handles: Vec<_> = LocalComm::group(3, Duration::from_secs(20))
            .into_iter()
            .map(|mut c| std::thread::spawn(move || ping_pong(&mut c, &[1, 1000, 100_000], 3).unwrap()))
            .collect();
        let rows: Vec<Vec<P2pRow>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(rows[0].iter().map(|r| r.bytes).collect::<Vec<_>>(), [1, 1000, 100_000]);
        assert!(rows[0].iter().all(|r| r.one_way_s > 0.0));
        assert!(rows[1].is_empty() && rows[2].is_empty());
    }
}
