//! A communicator that counts the seconds spent inside its calls, so an aggregation's time splits
//! into communication (waiting for the slowest peer included) and the local work around it. Each
//! call is also an NVTX range (`comm.send`, `comm.all_reduce`, ...) for Nsight Systems.

use super::{Communicator, Traffic};
use anyhow::Result;
use std::time::Instant;

pub struct Timed<'a> {
    inner: &'a mut dyn Communicator,
    /// Seconds inside this wrapper's calls so far.
    pub seconds: f64,
}

impl<'a> Timed<'a> {
    pub fn new(inner: &'a mut dyn Communicator) -> Self {
        Self { inner, seconds: 0.0 }
    }

    fn timed<T>(&mut self, name: &'static str, f: impl FnOnce(&mut dyn Communicator) -> T) -> T {
        let _r = crate::profile::range(name);
        let t = Instant::now();
        let out = f(&mut *self.inner);
        self.seconds += t.elapsed().as_secs_f64();
        out
    }
}

// Every method delegates, collectives included, so a backend's own collective is the one timed.
impl Communicator for Timed<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn send(&mut self, to: usize, msg: &[u8]) -> Result<()> {
        self.timed("comm.send", |c| c.send(to, msg))
    }

    fn recv(&mut self, from: usize) -> Result<Vec<u8>> {
        self.timed("comm.recv", |c| c.recv(from))
    }

    fn traffic(&self) -> Traffic {
        self.inner.traffic()
    }

    fn exchange(&mut self, peer: usize, msg: &[u8]) -> Result<Vec<u8>> {
        self.timed("comm.exchange", |c| c.exchange(peer, msg))
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.timed("comm.all_reduce", |c| c.all_reduce_sum(buf))
    }

    fn all_gather(&mut self, msg: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.timed("comm.all_gather", |c| c.all_gather(msg))
    }

    fn broadcast(&mut self, root: usize, msg: &mut Vec<u8>) -> Result<()> {
        self.timed("comm.broadcast", |c| c.broadcast(root, msg))
    }

    #[cfg(feature = "cuda")]
    fn all_reduce_sum_device(
        &mut self,
        buf: &mut cudarc::driver::CudaSlice<f32>,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> Result<()> {
        self.timed("comm.all_reduce", |c| c.all_reduce_sum_device(buf, stream))
    }

    #[cfg(feature = "cuda")]
    fn send_pairs_device(
        &mut self,
        to: usize,
        pairs: (&cudarc::driver::CudaSlice<u32>, &cudarc::driver::CudaSlice<f32>),
        n: usize,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> Result<()> {
        self.timed("comm.send", |c| c.send_pairs_device(to, pairs, n, stream))
    }

    #[cfg(feature = "cuda")]
    fn recv_pairs_device(
        &mut self,
        from: usize,
        pairs: (&mut cudarc::driver::CudaSlice<u32>, &mut cudarc::driver::CudaSlice<f32>),
        n: usize,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> Result<()> {
        self.timed("comm.recv", |c| c.recv_pairs_device(from, pairs, n, stream))
    }

    #[cfg(feature = "cuda")]
    fn exchange_pairs_device(
        &mut self,
        peer: usize,
        mine: (&cudarc::driver::CudaSlice<u32>, &cudarc::driver::CudaSlice<f32>),
        theirs: (&mut cudarc::driver::CudaSlice<u32>, &mut cudarc::driver::CudaSlice<f32>),
        n: usize,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> Result<()> {
        self.timed("comm.exchange", |c| {
            c.exchange_pairs_device(peer, mine, theirs, n, stream)
        })
    }

    #[cfg(feature = "cuda")]
    fn broadcast_pairs_device(
        &mut self,
        root: usize,
        pairs: (&mut cudarc::driver::CudaSlice<u32>, &mut cudarc::driver::CudaSlice<f32>),
        n: usize,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> Result<()> {
        self.timed("comm.broadcast", |c| c.broadcast_pairs_device(root, pairs, n, stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::local::LocalComm;
    use std::time::Duration;

    #[test]
    fn counts_time_in_calls_and_passes_results_through() {
        let handles: Vec<_> = LocalComm::group(2, Duration::from_secs(10))
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || {
                    let rank = c.rank();
                    if rank == 1 {
                        std::thread::sleep(Duration::from_millis(30));
                    }
                    let mut t = Timed::new(&mut c);
                    let mut buf = vec![rank as f32 + 1.0; 3];
                    t.all_reduce_sum(&mut buf).unwrap();
                    assert_eq!(buf, vec![3.0; 3]);
                    assert_eq!(t.world_size(), 2);
                    (rank, t.seconds, t.traffic().sent)
                })
            })
            .collect();
        for h in handles {
            let (rank, secs, sent) = h.join().unwrap();
            assert!(sent > 0);
            // Rank 0 waited for the late rank 1 inside the collective.
            if rank == 0 {
                assert!(secs >= 0.02, "{secs}");
            }
        }
    }
}
