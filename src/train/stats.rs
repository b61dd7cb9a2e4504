//! Per-worker sums over a logging window, gathered to every rank at log time (one small all-gather
//! per logged step rather than one per step).

use super::task::Stats;
use crate::comm::{Communicator, Traffic};
use anyhow::{ensure, Result};
use serde_json::{json, Value};
use std::time::Instant;

pub struct Window {
    start: Instant,
    loss_sum: f64,
    correct: f64,
    /// What the loss averages over: images, or predicted tokens.
    items: f64,
    /// Training samples (images, or token windows), for throughput.
    samples: f64,
    steps: f64,
    t_compute: f64,
    t_aggregate: f64,
    /// The part of `t_aggregate` inside communication calls.
    t_comm: f64,
    t_optimizer: f64,
    /// Blocked on the other ranks outside aggregation: a turn on a shared GPU, and the agreement
    /// before each aggregation (where a rank waits for the slowest forward/backward).
    t_wait: f64,
    last: Traffic,
    total: Traffic,
}

impl Default for Window {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            loss_sum: 0.0,
            correct: 0.0,
            items: 0.0,
            samples: 0.0,
            steps: 0.0,
            t_compute: 0.0,
            t_aggregate: 0.0,
            t_comm: 0.0,
            t_optimizer: 0.0,
            t_wait: 0.0,
            last: Traffic::default(),
            total: Traffic::default(),
        }
    }
}

impl Window {
    pub fn add_step(&mut self, s: &Stats, samples: f64, t_compute: f64) {
        self.loss_sum += s.loss_sum;
        self.correct += s.correct;
        self.items += s.items;
        self.samples += samples;
        self.steps += 1.0;
        self.t_compute += t_compute;
    }

    /// `comm_seconds`: the part of `seconds` spent communicating.
    pub fn add_aggregation(&mut self, seconds: f64, comm_seconds: f64, traffic: Traffic) {
        self.t_aggregate += seconds;
        self.t_comm += comm_seconds;
        self.last = traffic;
        self.total.sent += traffic.sent;
        self.total.recv += traffic.recv;
    }

    pub fn add_optimizer(&mut self, seconds: f64) {
        self.t_optimizer += seconds;
    }

    pub fn add_wait(&mut self, seconds: f64) {
        self.t_wait += seconds;
    }

    /// The sums that metrics depend on (not the timings), for checkpoints: a resumed run's
    /// first log line then covers the same steps as the uninterrupted run's.
    pub fn snapshot(&self) -> [f64; 9] {
        [
            self.loss_sum,
            self.correct,
            self.items,
            self.samples,
            self.steps,
            self.last.sent as f64,
            self.last.recv as f64,
            self.total.sent as f64,
            self.total.recv as f64,
        ]
    }

    pub fn restore(s: [f64; 9]) -> Self {
        Self {
            loss_sum: s[0],
            correct: s[1],
            items: s[2],
            samples: s[3],
            steps: s[4],
            last: Traffic {
                sent: s[5] as u64,
                recv: s[6] as u64,
            },
            total: Traffic {
                sent: s[7] as u64,
                recv: s[8] as u64,
            },
            ..Self::default()
        }
    }

    pub fn wall_s(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn to_vec(&self) -> Vec<f64> {
        let mut v = self.snapshot().to_vec();
        v.extend([
            self.t_compute,
            self.t_aggregate,
            self.t_optimizer,
            self.t_comm,
            self.t_wait,
        ]);
        v
    }

    /// Every rank's window, on every rank.
    pub fn gather(&self, comm: &mut dyn Communicator) -> Result<Gathered> {
        let rows = gather_f64(comm, &self.to_vec())?;
        let col = |i: usize| rows.iter().map(|r| r[i]).collect::<Vec<f64>>();
        let ints = |i: usize| rows.iter().map(|r| r[i] as u64).collect::<Vec<u64>>();
        let sum = |i: usize| col(i).iter().sum::<f64>();
        Ok(Gathered {
            loss_sum: sum(0),
            correct: sum(1),
            items: sum(2),
            samples: sum(3),
            per_step: [9, 10, 11, 12, 13]
                .map(|i| col(i).iter().zip(col(4)).map(|(t, s)| t / s.max(1.0)).sum::<f64>() / rows.len() as f64),
            last_sent: ints(5),
            last_recv: ints(6),
            total_sent: ints(7),
            total_recv: ints(8),
        })
    }
}

pub struct Gathered {
    loss_sum: f64,
    correct: f64,
    items: f64,
    pub samples: f64,
    /// Mean over ranks of seconds per step: compute, aggregation, optimizer, the communication
    /// part of aggregation, and the wait for other ranks outside aggregation.
    per_step: [f64; 5],
    pub last_sent: Vec<u64>,
    pub last_recv: Vec<u64>,
    pub total_sent: Vec<u64>,
    pub total_recv: Vec<u64>,
}

impl Gathered {
    pub fn loss(&self) -> f64 {
        self.loss_sum / self.items.max(1.0)
    }

    /// What the loss averages over, summed over ranks: images, predicted tokens, or utterances.
    pub fn items(&self) -> f64 {
        self.items
    }

    pub fn accuracy(&self) -> f64 {
        self.correct / self.items.max(1.0)
    }

    pub fn time_split(&self) -> Value {
        json!({"compute": self.per_step[0], "aggregation": self.per_step[1], "optimizer": self.per_step[2],
            "communication": self.per_step[3], "wait": self.per_step[4]})
    }
}

/// All-gather of a few f64 values per rank.
pub fn gather_f64(comm: &mut dyn Communicator, values: &[f64]) -> Result<Vec<Vec<f64>>> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    comm.all_gather(&bytes)?
        .into_iter()
        .enumerate()
        .map(|(r, b)| {
            ensure!(
                b.len() == bytes.len(),
                "rank {r} sent {} bytes of statistics, expected {}",
                b.len(),
                bytes.len()
            );
            Ok(b.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::local::LocalComm;
    use std::time::Duration;

    /// The wait is its own field: a rank blocked 0.3 s over two steps (waiting for the others'
    /// turns) shows in `wait`, and aggregation and communication stay what the aggregation took.
    #[test]
    fn the_wait_for_other_ranks_is_its_own_field_not_aggregation() {
        let handles: Vec<_> = LocalComm::group(2, Duration::from_secs(10))
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || {
                    let mut w = Window::default();
                    for _ in 0..2 {
                        w.add_step(&Stats::default(), 8.0, 0.1);
                        w.add_aggregation(0.02, 0.01, Traffic::default());
                        w.add_optimizer(0.005);
                    }
                    if c.rank() == 0 {
                        w.add_wait(0.3);
                    }
                    w.gather(&mut c).unwrap().time_split()
                })
            })
            .collect();
        for h in handles {
            let t = h.join().unwrap();
            let close = |key: &str, want: f64| {
                let got = t[key].as_f64().unwrap();
                assert!((got - want).abs() < 1e-12, "{key}: {got}, expected {want}: {t}");
            };
            // Means over the two ranks of seconds per step.
            close("wait", 0.3 / 2.0 / 2.0);
            close("aggregation", 0.02);
            close("communication", 0.01);
            close("compute", 0.1);
            close("optimizer", 0.005);
        }
    }
}
