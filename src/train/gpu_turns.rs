//! In-process workers on one GPU take turns: rank 0's forward/backward, then rank 1's, ..., as
//! `scripts/torch_step.py` runs its replicas, and the same for the evaluation shards. They share one
//! candle device, so one stream and one cuBLAS handle: without turns, P threads would queue their
//! matrix products on it in whatever order the scheduler picks (cuBLAS handles are not meant to be
//! driven by several threads at once), and each worker's time split would include the others'.
//!
//! A turn ends with the device synchronised, so a worker's forward/backward time is its own GPU
//! time. Between turns (aggregation, optimizer) the workers' kernels still queue on the one stream
//! from several threads: each touches only its own buffers and no cuBLAS call, and the stream runs
//! them one at a time, so only the order of enqueueing varies, never a value.
//!
//! CPU workers do not take turns: they run concurrently, each with its own threads.

use anyhow::{bail, Result};
use candle_core::Device;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

struct State {
    /// Whose turn it is.
    next: usize,
    /// Ranks whose worker has ended (its `Turn` dropped): a turn of theirs never comes.
    gone: Vec<bool>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    timeout: Duration,
}

/// One worker's place in the rotation. Dropping it (the worker ended, well or not) tells the
/// others, so nobody waits for a turn that will never be passed on.
pub struct Turn {
    rank: usize,
    shared: Arc<Shared>,
    device: Device,
}

/// The turns of `p` workers sharing `device`: None unless it is a GPU shared by several workers.
pub fn for_workers(device: &Device, p: usize, timeout: Duration) -> Vec<Option<Turn>> {
    if !device.is_cuda() || p < 2 {
        return (0..p).map(|_| None).collect();
    }
    rotation(device, p, timeout).into_iter().map(Some).collect()
}

/// The rotation itself, on any device (the tests run it on the CPU).
fn rotation(device: &Device, p: usize, timeout: Duration) -> Vec<Turn> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            next: 0,
            gone: vec![false; p],
        }),
        changed: Condvar::new(),
        timeout,
    });
    (0..p)
        .map(|rank| Turn {
            rank,
            shared: shared.clone(),
            device: device.clone(),
        })
        .collect()
}

impl Turn {
    /// Waits for this rank's turn, runs `f`, waits for the device, passes the turn on (also when
    /// `f` failed: the others are then stopped by the communicator, not by a turn never passed).
    /// Also returns how long this rank was blocked waiting for the others' turns: the step's
    /// `wait`, kept out of its compute time and out of aggregation.
    pub fn run<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<(T, Duration)> {
        let waited = self.wait()?;
        let out = f();
        let synced = self.device.synchronize();
        self.pass();
        let out = out?;
        synced?;
        Ok((out, waited))
    }

    fn wait(&self) -> Result<Duration> {
        let start = Instant::now();
        let deadline = start + self.shared.timeout;
        let mut s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        while s.next != self.rank {
            let whose = s.next;
            if s.gone[whose] {
                // "is gone": the job reports a worker's own failure over this consequence.
                bail!("rank {}: rank {whose} is gone (its GPU turn never came)", self.rank);
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "rank {}: waited {:?} for rank {whose} to finish its turn on the shared GPU",
                    self.rank,
                    self.shared.timeout
                );
            }
            s = self
                .shared
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(start.elapsed())
    }

    fn pass(&self) {
        let mut s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        s.next = (self.rank + 1) % s.gone.len();
        self.shared.changed.notify_all();
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut s = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        s.gone[self.rank] = true;
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_workers_and_a_single_gpu_worker_take_no_turns() {
        let t = for_workers(&Device::Cpu, 4, Duration::from_secs(1));
        assert_eq!(t.len(), 4);
        assert!(t.iter().all(Option::is_none));
    }

    /// Threads that start in any order still run their turns 0, 1, ..., P-1, 0, 1, ...
    #[test]
    fn turns_go_round_in_rank_order() {
        let (p, rounds) = (4, 5);
        let log = Arc::new(Mutex::new(Vec::new()));
        let handles: Vec<_> = rotation(&Device::Cpu, p, Duration::from_secs(10))
            .into_iter()
            .rev()
            .map(|turn| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for r in 0..rounds {
                        turn.run(|| {
                            // Give the others every chance to jump the queue.
                            std::thread::sleep(Duration::from_millis(1));
                            log.lock().unwrap().push((r, turn.rank));
                            Ok(())
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let want: Vec<_> = (0..rounds).flat_map(|r| (0..p).map(move |k| (r, k))).collect();
        assert_eq!(*log.lock().unwrap(), want);
    }

    /// The wait a turn reports is the time blocked on the others' turns, not the turn's own work:
    /// rank 0 (first) waits for nobody although its turn takes 80 ms, and rank 1 waits at least
    /// from its call until rank 0's work ended.
    #[test]
    fn a_turn_reports_the_wait_for_the_others_and_not_its_own_work() {
        let mut turns = rotation(&Device::Cpu, 2, Duration::from_secs(10));
        let t1 = turns.pop().unwrap();
        let t0 = turns.pop().unwrap();
        let second = std::thread::spawn(move || {
            let called = Instant::now();
            let ((), waited) = t1.run(|| Ok(())).unwrap();
            (called, waited)
        });
        let ((), waited0) = t0
            .run(|| {
                std::thread::sleep(Duration::from_millis(80));
                Ok(Instant::now())
            })
            .map(|(ended, w)| {
                let (called, waited1) = second.join().unwrap();
                let blocked = ended.saturating_duration_since(called);
                assert!(waited1 >= blocked, "waited {waited1:?}, blocked at least {blocked:?}");
                ((), w)
            })
            .unwrap();
        assert!(waited0 < Duration::from_millis(40), "{waited0:?}");
    }

    #[test]
    fn a_failed_turn_is_passed_on_and_a_gone_rank_stops_the_wait() {
        let mut turns = rotation(&Device::Cpu, 3, Duration::from_secs(10));
        let t2 = turns.pop().unwrap();
        let t1 = turns.pop().unwrap();
        let t0 = turns.pop().unwrap();
        let e = t0.run(|| -> Result<()> { bail!("boom") }).unwrap_err();
        assert_eq!(e.to_string(), "boom");
        drop(t1);
        let e = t2.run(|| Ok(())).unwrap_err().to_string();
        assert!(e.contains("rank 2: rank 1 is gone"), "{e}");
    }

    #[test]
    fn a_turn_never_passed_times_out() {
        let mut turns = rotation(&Device::Cpu, 2, Duration::from_millis(50));
        let t1 = turns.pop().unwrap();
        let _t0 = turns.pop().unwrap();
        let t = Instant::now();
        let e = t1.run(|| Ok(())).unwrap_err().to_string();
        assert!(e.contains("waited") && e.contains("rank 0"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
