//! `gtopk bench comm`: bytes and seconds per aggregation step for dense, Top-k and gTop-k (tree and
//! recursive doubling) over a real communicator, next to the byte counts the schedules predict.
//!
//! A step is timed in two phases. The local work before the exchange (selection) is timed alone;
//! then every worker waits at a barrier, and the communication phase (the exchange with the merges
//! and scatter-adds inside it) is timed from there, so P processes sharing a few cores for their
//! O(d) selection do not count as network time. With a link rate, each row also carries its floor:
//! the bytes on the schedule's critical path over the rate.

use super::harness::median;
use super::simulate::{comm_seconds, Network};
use super::theory::{critical_path, theory_total_bytes};
use crate::comm::Communicator;
use crate::rng::Rng;
use crate::sparse::{gtopk_reduce, topk_gather, GtopkAlgo, Layout, Method, Scope, SparseSet, Wire};
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// The schemes compared, in table order.
pub const SCHEMES: [(&str, Method, GtopkAlgo); 4] = [
    ("dense", Method::Dense, GtopkAlgo::Tree),
    ("topk", Method::Topk, GtopkAlgo::Tree),
    ("gtopk-tree", Method::Gtopk, GtopkAlgo::Tree),
    ("gtopk-rd", Method::Gtopk, GtopkAlgo::RecursiveDoubling),
];

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommRow {
    pub scheme: String,
    pub workers: usize,
    pub d: usize,
    pub k: usize,
    /// Mean over workers of bytes sent per step, measured.
    pub bytes_per_worker: f64,
    /// The same from the schedule's message count and sizes.
    pub theory_bytes_per_worker: f64,
    /// The busiest worker's bytes per step.
    pub max_bytes_worker: u64,
    /// Bytes on the schedule's critical path: what one step must wait for, message after message.
    pub critical_bytes: f64,
    /// Median over steps of the slowest worker's local work around the exchange (the selection
    /// before it, the scatter-add into the dense update after it; none for dense).
    pub local_s: f64,
    /// Median over steps of the slowest worker's communication phase, timed from a barrier.
    pub comm_s: f64,
    /// `critical_bytes` over the link rate, where the rate was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor_s: Option<f64>,
    /// The alpha-beta model's communication seconds (`gtopk simulate`), where a model was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_s: Option<f64>,
}

/// What a bench job knows of its network, for the floor and model columns.
#[derive(Clone, Copy, Debug, Default)]
pub struct Link {
    /// Bytes per second each worker's link carries in each direction.
    pub rate: Option<f64>,
    /// An alpha-beta model to price the same schedules with.
    pub model: Option<Network>,
}

/// One timed step's phases on this worker.
struct Phases {
    local_s: f64,
    comm_s: f64,
}

/// Every worker leaves after all have arrived (a one-byte all-gather).
pub fn barrier(comm: &mut dyn Communicator) -> Result<()> {
    comm.all_gather(&[0]).map(drop)
}

/// One aggregation of `acc` into `sum` (the global sum, not divided by P). The communication
/// phase is the exchange with the merges between its rounds; the selection before it and the
/// scatter-add of the received sets into the dense `sum` after it (O(k) random writes into d
/// values, milliseconds at VGG-16's size) are local work.
fn one_step(
    comm: &mut dyn Communicator,
    method: Method,
    algo: GtopkAlgo,
    layout: &Layout,
    ks: &[usize],
    acc: &[f32],
    sum: &mut [f32],
) -> Result<Phases> {
    let wire = Wire::F32;
    let t = Instant::now();
    let sel = match method {
        Method::Dense => {
            sum.copy_from_slice(acc);
            SparseSet::empty()
        }
        _ => layout.select(acc, ks)?,
    };
    let mut local_s = t.elapsed().as_secs_f64();
    barrier(comm)?;
    let t = Instant::now();
    let received = match method {
        Method::Dense => {
            comm.all_reduce_sum(sum)?;
            Vec::new()
        }
        Method::Topk => topk_gather(comm, &sel, layout, ks, wire)?,
        Method::Gtopk => vec![gtopk_reduce(comm, algo, sel, layout, ks, wire)?.global],
        Method::Randomk => anyhow::bail!("bench comm does not time random-k"),
    };
    let comm_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    if method != Method::Dense {
        sum.fill(0.0);
        for set in &received {
            set.scatter_add(sum);
        }
    }
    local_s += t.elapsed().as_secs_f64();
    Ok(Phases { local_s, comm_s })
}

/// One worker's part: `steps` timed aggregations (after one warm-up) of fresh normal values.
/// Returns the bytes sent per step and each timed step's phases.
fn run_worker(
    comm: &mut dyn Communicator,
    method: Method,
    algo: GtopkAlgo,
    d: usize,
    k: usize,
    steps: usize,
) -> Result<(u64, Vec<Phases>)> {
    let layout = Layout::new(Scope::Model, &[d])?;
    let ks = [k];
    let mut rng = Rng::derive(1, "bench-comm", comm.rank() as u64);
    let mut acc = vec![0f32; d];
    let mut sum = vec![0f32; d];
    let (mut bytes, mut phases) = (0, Vec::new());
    for step in 0..=steps {
        acc.iter_mut().for_each(|g| *g = rng.normal());
        let before = comm.traffic();
        let p = one_step(comm, method, algo, &layout, &ks, &acc, &mut sum)?;
        if step > 0 {
            // The barrier's byte is not the scheme's traffic.
            bytes = (comm.traffic() - before).sent - barrier_bytes(comm.world_size());
            phases.push(p);
        }
    }
    Ok((bytes, phases))
}

/// What one barrier sends per worker: a ring all-gather of one-byte messages.
fn barrier_bytes(world: usize) -> u64 {
    world as u64 - 1
}

/// Every scheme at every size on this group of workers; the rows are complete on every rank.
pub fn run_group(
    comm: &mut dyn Communicator,
    sizes: &[usize],
    density: f64,
    steps: usize,
    link: Link,
) -> Result<Vec<CommRow>> {
    ensure!(steps >= 1, "bench comm: at least one timed step");
    let world = comm.world_size();
    let mut rows = Vec::new();
    for &d in sizes {
        let k = ((density * d as f64).floor() as usize).max(1);
        for (name, method, algo) in SCHEMES {
            let (bytes, phases) = run_worker(comm, method, algo, d, k, steps)?;
            let mut mine: Vec<u8> = bytes.to_le_bytes().to_vec();
            for p in &phases {
                mine.extend(p.local_s.to_le_bytes());
                mine.extend(p.comm_s.to_le_bytes());
            }
            let all = comm.all_gather(&mine)?;
            let parsed: Vec<(u64, Vec<f64>)> = all
                .iter()
                .map(|m| {
                    ensure!(
                        m.len() == 8 * (1 + 2 * steps),
                        "a worker sent {} bytes of results",
                        m.len()
                    );
                    let b = u64::from_le_bytes(m[..8].try_into().expect("8 bytes"));
                    let ts = m[8..]
                        .chunks_exact(8)
                        .map(|c| f64::from_le_bytes(c.try_into().expect("8")))
                        .collect();
                    Ok((b, ts))
                })
                .collect::<Result<_>>()?;
            // Per step, the slowest worker: a step ends when its last worker is done.
            let slowest = |phase: usize| -> f64 {
                let per_step: Vec<f64> = (0..steps)
                    .map(|s| parsed.iter().map(|(_, t)| t[2 * s + phase]).fold(0.0, f64::max))
                    .collect();
                median(&per_step)
            };
            let kk = if method == Method::Dense { d } else { k };
            let path = critical_path(method, algo, world, d, k);
            rows.push(CommRow {
                scheme: name.to_string(),
                workers: world,
                d,
                k: kk,
                bytes_per_worker: parsed.iter().map(|(b, _)| *b as f64).sum::<f64>() / world as f64,
                theory_bytes_per_worker: theory_total_bytes(method, algo, world, d, k) as f64 / world as f64,
                max_bytes_worker: parsed.iter().map(|(b, _)| *b).max().unwrap_or(0),
                critical_bytes: path.bytes,
                local_s: slowest(0),
                comm_s: slowest(1),
                floor_s: link.rate.map(|r| path.bytes / r),
                model_s: link.model.map(|net| comm_seconds(&net, method, algo, world, d, k)),
            });
        }
    }
    Ok(rows)
}

/// A link rate in tc's words (`100mbit`, `1gbit`, `2.5gbit`, `800kbit`; decimal units, as tc reads
/// them) or plain bytes per second, as bytes per second.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let t = s.trim().to_ascii_lowercase();
    let units = [
        ("tbit", 1e12 / 8.0),
        ("gbit", 1e9 / 8.0),
        ("mbit", 1e6 / 8.0),
        ("kbit", 1e3 / 8.0),
        ("bit", 1.0 / 8.0),
    ];
    let (num, mult) = units
        .iter()
        .find_map(|(u, m)| t.strip_suffix(u).map(|n| (n, *m)))
        .unwrap_or((t.as_str(), 1.0));
    match num.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v * mult),
        _ => Err(format!(
            "{s:?} is not a rate like 100mbit, 1gbit or 125000000 (bytes per second)"
        )),
    }
}

/// An nccl-tests-style table; the floor and model columns where the rows have them.
pub fn render(rows: &[CommRow]) -> String {
    let floors = rows.iter().any(|r| r.floor_s.is_some());
    let models = rows.iter().any(|r| r.model_s.is_some());
    let mut s = format!(
        "{:>10} {:>3} {:>10} {:>7} {:>13} {:>6} {:>11} {:>9} {:>9}",
        "scheme", "P", "d", "k", "bytes/worker", "theory", "critical", "local ms", "comm ms"
    );
    if floors {
        s += &format!(" {:>9} {:>7}", "floor ms", "x floor");
    }
    if models {
        s += &format!(" {:>9} {:>8}", "model ms", "x model");
    }
    s.push('\n');
    for r in rows {
        s += &format!(
            "{:>10} {:>3} {:>10} {:>7} {:>13.0} {:>6} {:>11.0} {:>9.3} {:>9.3}",
            r.scheme,
            r.workers,
            r.d,
            r.k,
            r.bytes_per_worker,
            if (r.bytes_per_worker - r.theory_bytes_per_worker).abs() < 0.5 {
                "yes"
            } else {
                "NO"
            },
            r.critical_bytes,
            r.local_s * 1e3,
            r.comm_s * 1e3,
        );
        let ratio = |x: Option<f64>| x.map_or(String::from("-"), |x| format!("{:.2}", r.comm_s / x));
        let ms = |x: Option<f64>| x.map_or(String::from("-"), |x| format!("{:.3}", x * 1e3));
        if floors {
            s += &format!(" {:>9} {:>7}", ms(r.floor_s), ratio(r.floor_s));
        }
        if models {
            s += &format!(" {:>9} {:>8}", ms(r.model_s), ratio(r.model_s));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::local::LocalComm;
    use std::time::Duration;

    #[test]
    fn rates_read_as_tc_writes_them() {
        assert_eq!(parse_rate("100mbit"), Ok(12.5e6));
        assert_eq!(parse_rate("1Gbit"), Ok(125e6));
        assert_eq!(parse_rate("2.5gbit"), Ok(312.5e6));
        assert_eq!(parse_rate("125000"), Ok(125e3));
        for bad in ["", "fast", "0mbit", "-1gbit", "1 gbyte"] {
            assert!(parse_rate(bad).unwrap_err().contains("not a rate"), "{bad}");
        }
    }

    #[test]
    fn floors_and_models_follow_the_critical_path() {
        let link = Link {
            rate: Some(1e6),
            model: Some(Network {
                name: "t",
                alpha: 1e-3,
                beta: 1e-6,
            }),
        };
        let handles: Vec<_> = LocalComm::group(4, Duration::from_secs(20))
            .into_iter()
            .map(|mut c| std::thread::spawn(move || run_group(&mut c, &[4000], 0.01, 1, link).unwrap()))
            .collect();
        let rows: Vec<Vec<CommRow>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let by = |name: &str| rows[0].iter().find(|r| r.scheme == name).unwrap().clone();
        // Dense ring: 2 (P-1)/P of 4d bytes, in 2 (P-1) messages.
        let dense = by("dense");
        assert_eq!(dense.critical_bytes, 1.5 * 16000.0);
        assert_eq!(dense.floor_s, Some(0.024));
        assert!((dense.model_s.unwrap() - (6e-3 + 0.024)).abs() < 1e-12);
        // gTop-k tree: 2 rounds up, 2 down, one 40-pair set each.
        let tree = by("gtopk-tree");
        assert_eq!(tree.critical_bytes, 4.0 * 320.0);
        assert!(render(&rows[0]).contains("x floor"));
    }

    #[test]
    fn measured_bytes_equal_theory_for_every_scheme_and_p() {
        for world in [1, 2, 3, 4, 5, 8] {
            let handles: Vec<_> = LocalComm::group(world, Duration::from_secs(20))
                .into_iter()
                .map(|mut c| {
                    std::thread::spawn(move || run_group(&mut c, &[1000, 777], 0.01, 2, Link::default()).unwrap())
                })
                .collect();
            let results: Vec<Vec<CommRow>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            for r in &results[0] {
                assert_eq!(r.bytes_per_worker, r.theory_bytes_per_worker, "{r:?}");
                assert!(r.comm_s >= 0.0 && r.local_s >= 0.0);
                assert!(r.floor_s.is_none() && r.model_s.is_none());
            }
            assert_eq!(results[0].len(), 8);
            let table = render(&results[0]);
            assert!(!table.contains(" NO "), "{table}");
        }
    }
}
