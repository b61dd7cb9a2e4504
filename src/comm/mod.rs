//! Moving bytes between workers. A backend implements point-to-point `send`/`recv`; the collectives
//! have default implementations written once over those two calls (`collectives.rs`), so every
//! backend produces bit-identical results and byte counts. Backends with native collectives (NCCL)
//! override them.

mod collectives;
pub mod launch;
pub mod local;
pub mod rendezvous;
pub mod tcp;
pub mod timed;

use anyhow::Result;
use serde::{Deserialize, Serialize};

pub use collectives::{broadcast_schedule, ring_chunks};
pub use launch::{LaunchInfo, Overrides};
pub use tcp::{TcpComm, TcpOptions};

/// Bytes this endpoint has put on / taken off the wire since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub sent: u64,
    pub recv: u64,
}

impl std::ops::Sub for Traffic {
    type Output = Traffic;
    fn sub(self, rhs: Traffic) -> Traffic {
        Traffic {
            sent: self.sent - rhs.sent,
            recv: self.recv - rhs.recv,
        }
    }
}

/// One worker's view of the group.
pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;

    /// Buffered send: returns without waiting for the receiver to call `recv`.
    fn send(&mut self, to: usize, msg: &[u8]) -> Result<()>;
    /// The next message from `from`, in the order it was sent. Errors (never hangs past the
    /// backend's timeout) when the peer is gone.
    fn recv(&mut self, from: usize) -> Result<Vec<u8>>;
    fn traffic(&self) -> Traffic;

    /// In-place sum over all ranks; every rank ends with identical bits (ring: reduce-scatter then
    /// all-gather, 2(P-1)/P of the buffer sent per rank).
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        collectives::ring_all_reduce(self, buf)
    }

    /// `all_reduce_sum` of a buffer in device memory. This default goes through the host (one
    /// copy each way); a backend that reads device memory itself (NCCL) overrides it.
    #[cfg(feature = "cuda")]
    fn all_reduce_sum_device(
        &mut self,
        buf: &mut cudarc::driver::CudaSlice<f32>,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> Result<()> {
        let mut host = stream.clone_dtoh(&*buf)?;
        self.all_reduce_sum(&mut host)?;
        stream.memcpy_htod(&host, buf)?;
        Ok(())
    }

    /// Every rank's message, indexed by rank (ring: (P-1) messages forwarded per rank).
    fn all_gather(&mut self, msg: &[u8]) -> Result<Vec<Vec<u8>>> {
        collectives::ring_all_gather(self, msg)
    }

    /// `msg` of `root` replaces `msg` everywhere (binomial tree, P-1 messages in all).
    fn broadcast(&mut self, root: usize, msg: &mut Vec<u8>) -> Result<()> {
        collectives::tree_broadcast(self, root, msg)
    }
}

pub fn f32s_to_bytes(xs: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(xs.len() * 4);
    for x in xs {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

pub fn bytes_to_f32s(bytes: &[u8]) -> Result<Vec<f32>> {
    anyhow::ensure!(
        bytes.len().is_multiple_of(4),
        "message of {} bytes is not a whole number of f32 values",
        bytes.len()
    );
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}
