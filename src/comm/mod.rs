//! Moving bytes between workers. A backend implements point-to-point `send`/`recv`; the collectives
//! have default implementations written once over those two calls (`collectives.rs`), so the local
//! and TCP backends produce bit-identical results and byte counts. NCCL (`nccl.rs`, feature `cuda`)
//! overrides `exchange` and the collectives with its own: every rank still ends with identical bits,
//! but its all-reduce adds in NCCL's order, not our ring's, and it counts the bytes the default
//! collective would have counted, so traffic metrics compare across backends.
//!
//! A backend's `send` may wait until the peer calls the matching `recv` (NCCL's does). Code that
//! sends to a peer and receives from that same peer at the same time therefore calls `exchange`,
//! never `send` then `recv`. The default collectives assume buffered sends (every rank of a ring
//! step sends before it receives), so a backend whose sends rendezvous overrides all of them.

mod collectives;
pub mod launch;
pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod nccl;
pub mod rendezvous;
pub mod tcp;
pub mod timed;

#[cfg(feature = "cuda")]
use anyhow::Context;
use anyhow::Result;
use serde::{Deserialize, Serialize};

pub use collectives::{
    broadcast_schedule, ring_all_gather_traffic, ring_all_reduce_traffic, ring_chunks, tree_broadcast_traffic,
};
pub use launch::{LaunchInfo, Overrides};
pub use tcp::{TcpComm, TcpOptions};

/// Bytes this endpoint has put on / taken off the wire since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub sent: u64,
    pub recv: u64,
}

impl std::ops::AddAssign for Traffic {
    fn add_assign(&mut self, rhs: Traffic) {
        self.sent += rhs.sent;
        self.recv += rhs.recv;
    }
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

    /// Sends `msg` to `to`. The local and TCP backends buffer it and return at once; NCCL's returns
    /// when `to` has received it. Use `exchange` when `to` sends to this rank at the same time.
    fn send(&mut self, to: usize, msg: &[u8]) -> Result<()>;
    /// The next message from `from`, in the order it was sent. Errors (never hangs past the
    /// backend's timeout) when the peer is gone.
    fn recv(&mut self, from: usize) -> Result<Vec<u8>>;
    /// Bytes of the messages themselves: no framing, no padding (see `nccl.rs` for collectives).
    fn traffic(&self) -> Traffic;

    /// Sends `msg` to `peer` and returns `peer`'s message to this rank, the two travelling at the
    /// same time, so it cannot deadlock when `peer` calls `exchange` with this rank too. Same
    /// bytes and counts as `send` followed by `recv`.
    fn exchange(&mut self, peer: usize, msg: &[u8]) -> Result<Vec<u8>> {
        self.send(peer, msg)?;
        self.recv(peer)
    }

    /// In-place sum over all ranks; every rank ends with identical bits (ring: reduce-scatter then
    /// all-gather, 2(P-1)/P of the buffer sent per rank).
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        collectives::ring_all_reduce(self, buf)
    }

    /// Every rank's message, indexed by rank (ring: (P-1) messages forwarded per rank).
    fn all_gather(&mut self, msg: &[u8]) -> Result<Vec<Vec<u8>>> {
        collectives::ring_all_gather(self, msg)
    }

    /// `msg` of `root` replaces `msg` everywhere (binomial tree, P-1 messages in all).
    fn broadcast(&mut self, root: usize, msg: &mut Vec<u8>) -> Result<()> {
        collectives::tree_broadcast(self, root, msg)
    }

    /// `all_reduce_sum` of a device buffer queued on `stream`. The default goes through the host
    /// (copy out, `all_reduce_sum`, copy back), so dense S-SGD on device buffers works on every
    /// backend; NCCL reduces in place on the device.
    #[cfg(feature = "cuda")]
    fn all_reduce_sum_device(
        &mut self,
        buf: &mut cudarc::driver::CudaSlice<f32>,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> Result<()> {
        let mut host = stream.clone_dtoh(buf)?;
        self.all_reduce_sum(&mut host)?;
        stream.memcpy_htod(&host, buf)?;
        Ok(())
    }

    /// Sends the first `n` pairs of a sparse set held in device memory (indices then values, the
    /// f32 wire format: 8n bytes). Both sides know `n` (the tree's sets all hold k pairs). This
    /// default goes through the host; NCCL sends from device memory.
    #[cfg(feature = "cuda")]
    fn send_pairs_device(
        &mut self,
        to: usize,
        pairs: (&cudarc::driver::CudaSlice<u32>, &cudarc::driver::CudaSlice<f32>),
        n: usize,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> Result<()> {
        let msg = device_pairs_to_bytes(pairs, n, stream)?;
        self.send(to, &msg)
    }

    /// Receives `n` pairs sent by `send_pairs_device` into device memory.
    #[cfg(feature = "cuda")]
    fn recv_pairs_device(
        &mut self,
        from: usize,
        pairs: (&mut cudarc::driver::CudaSlice<u32>, &mut cudarc::driver::CudaSlice<f32>),
        n: usize,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> Result<()> {
        let msg = self.recv(from)?;
        bytes_to_device_pairs(&msg, pairs, n, stream).with_context(|| format!("pairs received from rank {from}"))
    }

    /// Sends this rank's `n` device pairs to `peer` and receives `peer`'s `n` into `theirs`, both
    /// at once (recursive doubling); as `exchange`, a backend whose send waits for the receiver
    /// must pair them.
    #[cfg(feature = "cuda")]
    fn exchange_pairs_device(
        &mut self,
        peer: usize,
        mine: (&cudarc::driver::CudaSlice<u32>, &cudarc::driver::CudaSlice<f32>),
        theirs: (&mut cudarc::driver::CudaSlice<u32>, &mut cudarc::driver::CudaSlice<f32>),
        n: usize,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> Result<()> {
        let msg = device_pairs_to_bytes(mine, n, stream)?;
        let got = self.exchange(peer, &msg)?;
        bytes_to_device_pairs(&got, theirs, n, stream).with_context(|| format!("pairs received from rank {peer}"))
    }

    /// `root`'s first `n` pairs replace everyone's, in device memory.
    #[cfg(feature = "cuda")]
    fn broadcast_pairs_device(
        &mut self,
        root: usize,
        pairs: (&mut cudarc::driver::CudaSlice<u32>, &mut cudarc::driver::CudaSlice<f32>),
        n: usize,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> Result<()> {
        let mut msg = if self.rank() == root {
            device_pairs_to_bytes((&*pairs.0, &*pairs.1), n, stream)?
        } else {
            Vec::new()
        };
        self.broadcast(root, &mut msg)?;
        if self.rank() != root {
            bytes_to_device_pairs(&msg, pairs, n, stream)
                .with_context(|| format!("pairs broadcast from rank {root}"))?;
        }
        Ok(())
    }
}

/// `n` device pairs as the f32 wire format (indices, then values, little-endian).
#[cfg(feature = "cuda")]
fn device_pairs_to_bytes(
    (idx, val): (&cudarc::driver::CudaSlice<u32>, &cudarc::driver::CudaSlice<f32>),
    n: usize,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
) -> Result<Vec<u8>> {
    anyhow::ensure!(
        n <= idx.len() && n <= val.len(),
        "{n} pairs asked of a set of {}",
        idx.len()
    );
    let mut out = Vec::with_capacity(8 * n);
    if n > 0 {
        let i = stream.clone_dtoh(&idx.slice(..n))?;
        let v = stream.clone_dtoh(&val.slice(..n))?;
        i.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
    }
    Ok(out)
}

#[cfg(feature = "cuda")]
fn bytes_to_device_pairs(
    msg: &[u8],
    (idx, val): (&mut cudarc::driver::CudaSlice<u32>, &mut cudarc::driver::CudaSlice<f32>),
    n: usize,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
) -> Result<()> {
    anyhow::ensure!(
        msg.len() == 8 * n && n <= idx.len() && n <= val.len(),
        "a message of {} bytes where {n} pairs ({} bytes) were expected, for a set of {}",
        msg.len(),
        8 * n,
        idx.len()
    );
    if n > 0 {
        let (ib, vb) = msg.split_at(4 * n);
        let i: Vec<u32> = ib
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let v = bytes_to_f32s(vb)?;
        stream.memcpy_htod(&i, &mut idx.slice_mut(..n))?;
        stream.memcpy_htod(&v, &mut val.slice_mut(..n))?;
    }
    Ok(())
}

pub fn f32s_to_bytes(xs: &[f32]) -> Vec<u8> {
    f32s_as_le_bytes(xs).into_owned()
}

/// `xs` as the wire's little-endian bytes: borrowed, with no copy, where the machine is
/// little-endian itself.
pub fn f32s_as_le_bytes(xs: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(xs))
    } else {
        std::borrow::Cow::Owned(xs.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
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
