//! NCCL between GPUs (`dist.backend = "nccl"`, feature `cuda`): one rank per GPU, every call queued
//! on the stream the rank's candle device uses, so NCCL orders with our kernels without extra
//! synchronisation.
//!
//! - Setup: rank 0 creates NCCL's unique id and broadcasts it over the job's bootstrap communicator
//!   (TCP, connected through the rendezvous store, so the id travels over the job's checked
//!   channel); every rank then joins with `ncclCommInitRankConfig`.
//! - Host bytes travel through grow-only device buffers: a u64 length first, then the payload (NCCL
//!   needs both sides to name the count). `send` returns once the peer has received, so
//!   `exchange` puts both directions in one NCCL group per phase and cannot deadlock.
//! - Collectives are NCCL's own. Every rank gets identical bits, but NCCL's all-reduce adds in its
//!   own order (ring, tree or NVLS, chosen by size), so its sums differ in the last bits from our
//!   ring's (`collectives.rs`) and from another world size's. Variable-length `all_gather` gathers
//!   the lengths first and pads every piece to the longest.
//! - No hangs on a dead peer: NCCL's kernels would spin forever waiting for it. The communicator is
//!   non-blocking (`blocking = 0`), and after queuing a group we poll `ncclCommGetAsyncError` and an
//!   event behind the work until `timeout`; past it the communicator is aborted (its kernels exit)
//!   and this call and every later one fail. No NCCL work of ours is left running when a call
//!   returns, so host copies never wait on a peer.
//! - Byte counts (`traffic`): point to point, the message bytes as the TCP and local backends count
//!   them (no length header). Collectives count what the default collective would have counted on
//!   this rank (`ring_all_reduce_traffic` and friends), not NCCL's internal traffic, padding or
//!   headers, so metrics compare across backends.
//!
//! The pure parts (the group plans, the all-gather cut) are tested everywhere; the rest only on
//! GPUs (`check_against_local`).

#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use anyhow::{ensure, Result};

/// Largest message a peer may announce, as for TCP: a corrupt length must not allocate terabytes.
const MAX_MESSAGE_BYTES: u64 = super::tcp::DEFAULT_MAX_MESSAGE_BYTES;

/// One NCCL point-to-point call of a group. `bytes` is what moves; the buffers are the caller's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum P2p {
    Send { peer: usize, bytes: usize },
    Recv { peer: usize, bytes: usize },
}

/// The first group of a point-to-point operation: the u64 lengths, both ways at once when both
/// are given.
fn header_group(send_to: Option<usize>, recv_from: Option<usize>) -> Vec<P2p> {
    let mut g = Vec::new();
    if let Some(peer) = send_to {
        g.push(P2p::Send { peer, bytes: 8 });
    }
    if let Some(peer) = recv_from {
        g.push(P2p::Recv { peer, bytes: 8 });
    }
    g
}

/// The second group: the payloads, `(peer, bytes)`. Empty ones are left out on both sides alike,
/// because the receiver learnt the length from the header.
fn payload_group(send: Option<(usize, usize)>, recv: Option<(usize, usize)>) -> Vec<P2p> {
    let mut g = Vec::new();
    if let Some((peer, bytes)) = send.filter(|s| s.1 > 0) {
        g.push(P2p::Send { peer, bytes });
    }
    if let Some((peer, bytes)) = recv.filter(|r| r.1 > 0) {
        g.push(P2p::Recv { peer, bytes });
    }
    g
}

/// A length a peer announced, checked before anything that large is allocated.
fn announced_len(len: u64, from: usize) -> Result<usize> {
    ensure!(
        len <= MAX_MESSAGE_BYTES,
        "rank {from} announced a message of {len} bytes (limit {MAX_MESSAGE_BYTES}): corrupt length"
    );
    Ok(len as usize)
}

/// The stride of a padded all-gather (the longest piece) and the bytes of its output.
fn gather_shape(lens: &[u64]) -> Result<(usize, usize)> {
    let mut stride = 0;
    for (q, &l) in lens.iter().enumerate() {
        stride = stride.max(announced_len(l, q)?);
    }
    let total = stride
        .checked_mul(lens.len())
        .filter(|&t| t as u64 <= MAX_MESSAGE_BYTES);
    let total = total.ok_or_else(|| {
        anyhow::anyhow!(
            "all-gather of {} pieces padded to {stride} bytes exceeds {MAX_MESSAGE_BYTES} bytes",
            lens.len()
        )
    })?;
    Ok((stride, total))
}

/// Rank q's piece out of a padded all-gather: the first `lens[q]` bytes of its `stride`-byte slot.
fn cut_gathered(gathered: &[u8], lens: &[usize], stride: usize) -> Result<Vec<Vec<u8>>> {
    ensure!(
        gathered.len() == stride * lens.len(),
        "all-gather: {} bytes came back, expected {} pieces of {stride}",
        gathered.len(),
        lens.len()
    );
    lens.iter()
        .enumerate()
        .map(|(q, &l)| {
            ensure!(
                l <= stride,
                "all-gather: piece of rank {q} ({l} bytes) is longer than the stride {stride}"
            );
            Ok(gathered[q * stride..q * stride + l].to_vec())
        })
        .collect()
}

#[cfg(feature = "cuda")]
pub use device::{check_against_local, NcclComm};

#[cfg(feature = "cuda")]
mod device {
    use super::{announced_len, cut_gathered, gather_shape, header_group, payload_group, P2p};
    use crate::comm::{
        local::LocalComm, ring_all_gather_traffic, ring_all_reduce_traffic, tree_broadcast_traffic, Communicator,
        Traffic,
    };
    use crate::gpu::RankGpu;
    use anyhow::{anyhow, bail, ensure, Context, Result};
    use cudarc::driver::ValidAsZeroBits;
    use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};
    use cudarc::nccl::sys::{self, ncclComm_t, ncclConfig_t, ncclDataType_t, ncclRedOp_t, ncclResult_t};
    use std::ffi::{c_int, c_void, CStr};
    use std::fmt;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// `NCCL_VERSION(2, 30, 0)`: the header cudarc's bindings (feature `nccl` = 2.30) come from,
    /// which fixes the layout of the `ncclConfig_t` we pass. NCCL copies only the first `size`
    /// bytes of it, so an older library simply ignores the fields it does not know.
    const CONFIG_VERSION: u32 = 2 * 10_000 + 30 * 100;
    const CONFIG_MAGIC: u32 = 0xcafe_beef;
    /// `NCCL_CONFIG_UNDEF_INT`: leave the field to NCCL's default (or its environment variable).
    const UNDEF: c_int = c_int::MIN;
    /// Drop waits at most this long (and never past `timeout`) for NCCL to flush before aborting.
    const DROP_LINGER: Duration = Duration::from_secs(10);
    /// Polls spin (yielding) this long before they start to sleep: small messages finish within it.
    const SPIN: Duration = Duration::from_micros(200);

    fn nonblocking_config() -> ncclConfig_t {
        ncclConfig_t {
            size: std::mem::size_of::<ncclConfig_t>(),
            magic: CONFIG_MAGIC,
            version: CONFIG_VERSION,
            blocking: 0,
            cgaClusterSize: UNDEF,
            minCTAs: UNDEF,
            maxCTAs: UNDEF,
            netName: std::ptr::null(),
            splitShare: UNDEF,
            trafficClass: UNDEF,
            commName: c"gtopk".as_ptr(),
            collnetEnable: UNDEF,
            CTAPolicy: UNDEF,
            shrinkShare: UNDEF,
            nvlsCTAs: UNDEF,
            nChannelsPerNetPeer: UNDEF,
            nvlinkCentricSched: UNDEF,
            graphUsageMode: UNDEF,
            numRmaCtx: UNDEF,
            maxP2pPeers: UNDEF,
        }
    }

    /// The raw communicator. NCCL lets a communicator be driven from any thread, one call at a
    /// time; `&mut NcclComm` guarantees the one at a time.
    struct Handle(ncclComm_t);
    // SAFETY: see above; the pointer is only used through `&mut NcclComm` or in Drop.
    unsafe impl Send for Handle {}

    /// Who an operation waits for, for error messages.
    #[derive(Clone, Copy)]
    enum With {
        Rank(usize),
        All(usize),
    }

    #[derive(Clone, Copy)]
    struct Op {
        name: &'static str,
        with: With,
    }

    impl fmt::Display for Op {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self.with {
                With::Rank(p) => write!(f, "{} with rank {p}", self.name),
                With::All(n) => write!(f, "{} with all {n} ranks", self.name),
            }
        }
    }

    /// One NCCL call with raw device pointers (buffers owned by the caller, alive past the wait).
    enum Call {
        Send {
            buf: u64,
            count: usize,
            ty: ncclDataType_t,
            peer: usize,
        },
        Recv {
            buf: u64,
            count: usize,
            ty: ncclDataType_t,
            peer: usize,
        },
        AllReduceSum {
            buf: u64,
            count: usize,
        },
        AllGather {
            send: u64,
            recv: u64,
            count: usize,
            ty: ncclDataType_t,
        },
        Broadcast {
            buf: u64,
            count: usize,
            ty: ncclDataType_t,
            root: usize,
        },
    }

    #[derive(Clone, Copy)]
    enum Dir {
        Send,
        Recv,
        Broadcast(usize),
    }

    /// The two calls that move n pairs (an index array and a value array, device pointers).
    fn pair_calls(dir: Dir, peer: usize, (idx, val): (u64, u64), n: usize) -> [Call; 2] {
        let one = |buf, ty| match dir {
            Dir::Send => Call::Send {
                buf,
                count: n,
                ty,
                peer,
            },
            Dir::Recv => Call::Recv {
                buf,
                count: n,
                ty,
                peer,
            },
            Dir::Broadcast(root) => Call::Broadcast {
                buf,
                count: n,
                ty,
                root,
            },
        };
        [
            one(idx, ncclDataType_t::ncclUint32),
            one(val, ncclDataType_t::ncclFloat32),
        ]
    }

    /// # Safety
    /// The pointers are live device buffers of the communicator's device, large enough for `count`.
    unsafe fn issue(call: &Call, comm: ncclComm_t, stream: sys::cudaStream_t) -> ncclResult_t {
        match *call {
            Call::Send { buf, count, ty, peer } => {
                sys::ncclSend(buf as *const c_void, count, ty, peer as c_int, comm, stream)
            }
            Call::Recv { buf, count, ty, peer } => {
                sys::ncclRecv(buf as *mut c_void, count, ty, peer as c_int, comm, stream)
            }
            Call::AllReduceSum { buf, count } => sys::ncclAllReduce(
                buf as *const c_void,
                buf as *mut c_void,
                count,
                ncclDataType_t::ncclFloat32,
                ncclRedOp_t::ncclSum,
                comm,
                stream,
            ),
            Call::AllGather { send, recv, count, ty } => {
                sys::ncclAllGather(send as *const c_void, recv as *mut c_void, count, ty, comm, stream)
            }
            Call::Broadcast { buf, count, ty, root } => sys::ncclBroadcast(
                buf as *const c_void,
                buf as *mut c_void,
                count,
                ty,
                root as c_int,
                comm,
                stream,
            ),
        }
    }

    fn failed(r: ncclResult_t) -> bool {
        !matches!(r, ncclResult_t::ncclSuccess | ncclResult_t::ncclInProgress)
    }

    fn describe(r: ncclResult_t, comm: ncclComm_t) -> String {
        // SAFETY: both return pointers to static (or per-thread) NUL-terminated strings or null.
        let name = unsafe { sys::ncclGetErrorString(r) };
        let last = unsafe { sys::ncclGetLastError(comm) };
        let text = |p: *const std::ffi::c_char| {
            (!p.is_null())
                .then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
                .filter(|s| !s.is_empty())
        };
        match (text(name), text(last)) {
            (Some(n), Some(l)) => format!("{r:?}: {n} ({l})"),
            (Some(n), None) => format!("{r:?}: {n}"),
            (None, _) => format!("{r:?}"),
        }
    }

    /// Yields while a wait is young, then sleeps a little longer each time up to a millisecond, so
    /// short operations return fast and long ones do not burn a core.
    struct Backoff {
        start: Instant,
        nap: Duration,
    }

    impl Backoff {
        fn new() -> Self {
            Self {
                start: Instant::now(),
                nap: Duration::from_micros(10),
            }
        }

        fn pause(&mut self) {
            if self.start.elapsed() < SPIN {
                std::thread::yield_now();
            } else {
                std::thread::sleep(self.nap);
                self.nap = (self.nap * 2).min(Duration::from_millis(1));
            }
        }
    }

    /// A device buffer that only grows.
    struct Scratch<T>(Option<CudaSlice<T>>);

    impl<T: DeviceRepr + ValidAsZeroBits> Scratch<T> {
        fn at_least(&mut self, stream: &Arc<CudaStream>, n: usize) -> Result<&mut CudaSlice<T>> {
            let have = self.0.as_ref().map_or(0, |s| s.len());
            if have < n || self.0.is_none() {
                self.0 = None;
                self.0 = Some(stream.alloc_zeros(n.max(2 * have).max(1))?);
            }
            Ok(self.0.as_mut().expect("allocated above"))
        }
    }

    /// See the module documentation.
    pub struct NcclComm {
        handle: Handle,
        rank: usize,
        world: usize,
        stream: Arc<CudaStream>,
        /// Recorded behind each group; polled instead of synchronising, to keep the deadline.
        done: CudaEvent,
        timeout: Duration,
        traffic: Traffic,
        /// Why the communicator was aborted; every later call fails with it.
        aborted: Option<String>,
        len_out: CudaSlice<u64>,
        len_in: CudaSlice<u64>,
        bytes_out: Scratch<u8>,
        bytes_in: Scratch<u8>,
        floats: Scratch<f32>,
    }

    impl NcclComm {
        /// Joins the NCCL communicator of the job `bootstrap` belongs to (same rank, same world),
        /// queuing all work on the rank's one stream (`gpu`'s, candle's). Collective: every rank
        /// calls it. `timeout` bounds the setup and every later call.
        pub fn connect(bootstrap: &mut dyn Communicator, gpu: &RankGpu, timeout: Duration) -> Result<NcclComm> {
            let stream = gpu.stream();
            let (rank, world) = (bootstrap.rank(), bootstrap.world_size());
            ensure!(world <= c_int::MAX as usize, "NCCL: world size {world} is too large");
            stream.context().bind_to_thread()?;
            // Rank 0 sends an empty id when it has none, so the others stop instead of waiting.
            let made = if rank == 0 {
                Some(cudarc::nccl::result::get_uniqueid().map_err(|e| describe(e.0, std::ptr::null_mut())))
            } else {
                None
            };
            let mut id_bytes = match &made {
                Some(Ok(id)) => id.internal.iter().map(|&c| c as u8).collect(),
                _ => Vec::new(),
            };
            bootstrap
                .broadcast(0, &mut id_bytes)
                .context("NCCL setup: broadcast of the unique id")?;
            if let Some(Err(e)) = made {
                bail!("rank 0: ncclGetUniqueId failed: {e}");
            }
            let mut id = sys::ncclUniqueId { internal: [0; 128] };
            ensure!(
                id_bytes.len() == id.internal.len(),
                "rank {rank}: NCCL setup: rank 0 sent an id of {} bytes (it could not create one: see its error)",
                id_bytes.len()
            );
            for (d, &b) in id.internal.iter_mut().zip(&id_bytes) {
                *d = b as std::ffi::c_char;
            }

            let mut raw: ncclComm_t = std::ptr::null_mut();
            let mut config = nonblocking_config();
            // SAFETY: `raw` and `config` outlive the call; NCCL copies the config.
            let r = unsafe { sys::ncclCommInitRankConfig(&mut raw, world as c_int, id, rank as c_int, &mut config) };
            let done = stream.context().new_event(None)?;
            let mut comm = NcclComm {
                handle: Handle(raw),
                rank,
                world,
                len_out: stream.alloc_zeros(1)?,
                len_in: stream.alloc_zeros(world.max(1))?,
                stream,
                done,
                timeout,
                traffic: Traffic::default(),
                aborted: None,
                bytes_out: Scratch(None),
                bytes_in: Scratch(None),
                floats: Scratch(None),
            };
            let op = Op {
                name: "init",
                with: With::All(world),
            };
            if failed(r) {
                return Err(comm.fail(op, describe(r, raw)));
            }
            ensure!(
                !raw.is_null(),
                "rank {rank}: ncclCommInitRankConfig returned no communicator"
            );
            comm.settle(op, Instant::now() + timeout)?;
            Ok(comm)
        }

        fn usable(&self, op: Op) -> Result<()> {
            if let Some(why) = &self.aborted {
                bail!(
                    "rank {}: NCCL {op}: the communicator was aborted earlier: {why}",
                    self.rank
                );
            }
            self.stream.context().bind_to_thread()?;
            Ok(())
        }

        /// The checks every device-pair call makes; `peer` None: all ranks take part.
        fn pairs_op(
            &self,
            name: &'static str,
            peer: Option<usize>,
            stream: &CudaStream,
            n: usize,
            lens: &[usize],
        ) -> Result<Op> {
            let with = peer.map_or(With::All(self.world), With::Rank);
            let op = Op { name, with };
            self.usable(op)?;
            if let Some(p) = peer {
                self.peer_check(p)?;
            }
            self.same_device(op, stream)?;
            ensure!(
                lens.iter().all(|&l| n <= l),
                "rank {}: NCCL {op} of {n} pairs with device arrays of {lens:?}",
                self.rank
            );
            Ok(op)
        }

        /// The caller's device work must be on this rank's one stream (`RankGpu`), the one NCCL
        /// queues on: on any other, NCCL would neither wait for the buffers' writes nor be waited for.
        fn same_device(&self, op: Op, stream: &CudaStream) -> Result<()> {
            ensure!(
                stream.cu_stream() == self.stream.cu_stream(),
                "rank {}: NCCL {op} asked to order with a stream other than the rank's \
                 ({:?}, NCCL's is {:?})",
                self.rank,
                stream.cu_stream(),
                self.stream.cu_stream()
            );
            Ok(())
        }

        fn peer_check(&self, peer: usize) -> Result<()> {
            ensure!(
                peer < self.world && peer != self.rank,
                "rank {}: invalid peer rank {peer} (world size {})",
                self.rank,
                self.world
            );
            Ok(())
        }

        /// Aborts the communicator and returns the error that every later call repeats.
        fn fail(&mut self, op: Op, why: String) -> anyhow::Error {
            self.abort();
            let msg = format!("rank {}: NCCL {op} failed: {why}; communicator aborted", self.rank);
            self.aborted = Some(msg.clone());
            anyhow!(msg)
        }

        fn timed_out(&mut self, op: Op) -> anyhow::Error {
            self.abort();
            let msg = format!(
                "rank {}: NCCL {op} did not complete within {} s (peer gone?); communicator aborted",
                self.rank,
                self.timeout.as_secs_f64()
            );
            self.aborted = Some(msg.clone());
            anyhow!(msg)
        }

        fn abort(&mut self) {
            let raw = std::mem::replace(&mut self.handle.0, std::ptr::null_mut());
            if !raw.is_null() {
                // SAFETY: a communicator of ours, never used again. Aborting makes its kernels exit.
                unsafe { sys::ncclCommAbort(raw) };
            }
        }

        /// The communicator's state: Ok(true) once NCCL has finished its host-side work.
        fn poll_state(&mut self, op: Op) -> Result<bool> {
            let mut state = ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator (callers check `aborted` first).
            let r = unsafe { sys::ncclCommGetAsyncError(self.handle.0, &mut state) };
            if failed(r) {
                return Err(self.fail(op, describe(r, self.handle.0)));
            }
            if failed(state) {
                return Err(self.fail(op, describe(state, self.handle.0)));
            }
            Ok(state == ncclResult_t::ncclSuccess)
        }

        /// Waits until NCCL leaves `ncclInProgress` (non-blocking mode: setup, connections and the
        /// launch of a group happen in the background).
        fn settle(&mut self, op: Op, deadline: Instant) -> Result<()> {
            let mut b = Backoff::new();
            while !self.poll_state(op)? {
                if Instant::now() >= deadline {
                    return Err(self.timed_out(op));
                }
                b.pause();
            }
            Ok(())
        }

        /// Queues `calls` as one NCCL group on `stream` and waits until they have run.
        fn run(&mut self, op: Op, stream: &CudaStream, calls: &[Call]) -> Result<()> {
            let deadline = Instant::now() + self.timeout;
            let comm = self.handle.0;
            let s = stream.cu_stream() as sys::cudaStream_t;
            // SAFETY: every call's buffers are ours or the caller's and outlive the wait below.
            let start = unsafe { sys::ncclGroupStart() };
            if failed(start) {
                return Err(self.fail(op, describe(start, comm)));
            }
            let mut first_err = None;
            for c in calls {
                let r = unsafe { issue(c, comm, s) };
                if failed(r) && first_err.is_none() {
                    first_err = Some(r);
                }
            }
            // The group is closed even after a failed call, or the thread's next group would nest.
            let end = unsafe { sys::ncclGroupEnd() };
            if let Some(r) = first_err.or(failed(end).then_some(end)) {
                return Err(self.fail(op, describe(r, comm)));
            }
            self.settle(op, deadline)?;
            self.done.record(stream)?;
            let mut b = Backoff::new();
            loop {
                if self.done.try_is_complete()? {
                    // The kernels may have ended because NCCL saw an error: look once more.
                    self.poll_state(op)?;
                    return Ok(());
                }
                self.poll_state(op)?;
                if Instant::now() >= deadline {
                    return Err(self.timed_out(op));
                }
                b.pause();
            }
        }

        /// Runs a point-to-point plan: header calls use the length buffers, payload calls the byte
        /// scratch (sized by the caller).
        fn run_p2p(&mut self, op: Op, plan: &[P2p], header: bool) -> Result<()> {
            if plan.is_empty() {
                return Ok(());
            }
            let stream = self.stream.clone();
            let calls: Vec<Call> = plan
                .iter()
                .map(|p| match (*p, header) {
                    (P2p::Send { peer, .. }, true) => Call::Send {
                        buf: ptr(&self.len_out, &stream),
                        count: 1,
                        ty: ncclDataType_t::ncclUint64,
                        peer,
                    },
                    (P2p::Recv { peer, .. }, true) => Call::Recv {
                        buf: ptr(&self.len_in, &stream),
                        count: 1,
                        ty: ncclDataType_t::ncclUint64,
                        peer,
                    },
                    (P2p::Send { peer, bytes }, false) => Call::Send {
                        buf: self.bytes_out.0.as_ref().map_or(0, |b| ptr(b, &stream)),
                        count: bytes,
                        ty: ncclDataType_t::ncclUint8,
                        peer,
                    },
                    (P2p::Recv { peer, bytes }, false) => Call::Recv {
                        buf: self.bytes_in.0.as_ref().map_or(0, |b| ptr(b, &stream)),
                        count: bytes,
                        ty: ncclDataType_t::ncclUint8,
                        peer,
                    },
                })
                .collect();
            self.run(op, &stream, &calls)
        }

        fn stage_len(&mut self, len: usize) -> Result<()> {
            self.stream.memcpy_htod(&[len as u64], &mut self.len_out)?;
            Ok(())
        }

        /// Copies `msg` to the start of the outgoing scratch, grown to `room` bytes at least first
        /// (growing drops the old contents); returns the scratch's address.
        fn stage_bytes(&mut self, msg: &[u8], room: usize) -> Result<u64> {
            let stream = self.stream.clone();
            let buf = self.bytes_out.at_least(&stream, room.max(msg.len()))?;
            if !msg.is_empty() {
                stream.memcpy_htod(msg, &mut buf.slice_mut(..msg.len()))?;
            }
            Ok(ptr(buf, &stream))
        }

        fn stage_out(&mut self, msg: &[u8]) -> Result<()> {
            self.stage_len(msg.len())?;
            self.stage_bytes(msg, msg.len())?;
            Ok(())
        }

        /// The first `n` values of the incoming length slots (the stream is idle: `run` waited).
        fn lens_in(&self, n: usize) -> Result<Vec<u64>> {
            Ok(self.stream.clone_dtoh(&self.len_in.slice(..n))?)
        }

        fn bytes_in(&self, n: usize) -> Result<Vec<u8>> {
            match (&self.bytes_in.0, n) {
                (_, 0) => Ok(Vec::new()),
                (Some(b), n) => Ok(self.stream.clone_dtoh(&b.slice(..n))?),
                (None, _) => bail!("NCCL: no incoming buffer for {n} bytes"),
            }
        }

        /// A length from a peer; a bad one leaves the two sides out of step, so it aborts.
        fn checked(&mut self, op: Op, len: u64, from: usize) -> Result<usize> {
            announced_len(len, from).map_err(|e| self.fail(op, e.to_string()))
        }
    }

    fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
        // Our scratch buffers live on our stream only, so the read/write events need no upkeep.
        s.device_ptr(stream).0
    }

    impl Communicator for NcclComm {
        fn rank(&self) -> usize {
            self.rank
        }

        fn world_size(&self) -> usize {
            self.world
        }

        fn send(&mut self, to: usize, msg: &[u8]) -> Result<()> {
            let op = Op {
                name: "send",
                with: With::Rank(to),
            };
            self.usable(op)?;
            self.peer_check(to)?;
            self.stage_out(msg)?;
            self.run_p2p(op, &header_group(Some(to), None), true)?;
            self.run_p2p(op, &payload_group(Some((to, msg.len())), None), false)?;
            self.traffic.sent += msg.len() as u64;
            Ok(())
        }

        fn recv(&mut self, from: usize) -> Result<Vec<u8>> {
            let op = Op {
                name: "recv",
                with: With::Rank(from),
            };
            self.usable(op)?;
            self.peer_check(from)?;
            self.run_p2p(op, &header_group(None, Some(from)), true)?;
            let len = self.lens_in(1)?[0];
            let len = self.checked(op, len, from)?;
            if len > 0 {
                let stream = self.stream.clone();
                self.bytes_in.at_least(&stream, len)?;
            }
            self.run_p2p(op, &payload_group(None, Some((from, len))), false)?;
            let msg = self.bytes_in(len)?;
            self.traffic.recv += len as u64;
            Ok(msg)
        }

        fn traffic(&self) -> Traffic {
            self.traffic
        }

        fn exchange(&mut self, peer: usize, msg: &[u8]) -> Result<Vec<u8>> {
            let op = Op {
                name: "exchange",
                with: With::Rank(peer),
            };
            self.usable(op)?;
            self.peer_check(peer)?;
            self.stage_out(msg)?;
            self.run_p2p(op, &header_group(Some(peer), Some(peer)), true)?;
            let len = self.lens_in(1)?[0];
            let len = self.checked(op, len, peer)?;
            if len > 0 {
                let stream = self.stream.clone();
                self.bytes_in.at_least(&stream, len)?;
            }
            self.run_p2p(op, &payload_group(Some((peer, msg.len())), Some((peer, len))), false)?;
            let got = self.bytes_in(len)?;
            self.traffic.sent += msg.len() as u64;
            self.traffic.recv += len as u64;
            Ok(got)
        }

        /// All ranks must pass the same length: NCCL cannot check it (a mismatch times out or
        /// sums garbage), unlike the ring, which reports it.
        fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
            let op = Op {
                name: "all_reduce",
                with: With::All(self.world),
            };
            self.usable(op)?;
            if self.world == 1 || buf.is_empty() {
                return Ok(());
            }
            let stream = self.stream.clone();
            let dev = self.floats.at_least(&stream, buf.len())?;
            stream.memcpy_htod(&*buf, &mut dev.slice_mut(..buf.len()))?;
            let call = Call::AllReduceSum {
                buf: ptr(dev, &stream),
                count: buf.len(),
            };
            self.run(op, &stream, &[call])?;
            let dev = self.floats.0.as_ref().expect("allocated above");
            stream.memcpy_dtoh(&dev.slice(..buf.len()), buf)?;
            self.traffic += ring_all_reduce_traffic(buf.len(), self.world, self.rank);
            Ok(())
        }

        fn all_gather(&mut self, msg: &[u8]) -> Result<Vec<Vec<u8>>> {
            let op = Op {
                name: "all_gather",
                with: With::All(self.world),
            };
            self.usable(op)?;
            if self.world == 1 {
                return Ok(vec![msg.to_vec()]);
            }
            let stream = self.stream.clone();
            self.stage_len(msg.len())?;
            let lens_call = Call::AllGather {
                send: ptr(&self.len_out, &stream),
                recv: ptr(&self.len_in, &stream),
                count: 1,
                ty: ncclDataType_t::ncclUint64,
            };
            self.run(op, &stream, &[lens_call])?;
            let lens = self.lens_in(self.world)?;
            if lens[self.rank] != msg.len() as u64 {
                return Err(self.fail(op, format!("own length came back as {}", lens[self.rank])));
            }
            let (stride, total) = gather_shape(&lens).map_err(|e| self.fail(op, e.to_string()))?;
            let lens: Vec<usize> = lens.iter().map(|&l| l as usize).collect();
            let mut out = if stride == 0 {
                vec![Vec::new(); self.world]
            } else {
                // Past `msg.len()` the outgoing scratch holds stale bytes: padding, cut away.
                let send = self.stage_bytes(msg, stride)?;
                let recv = ptr(self.bytes_in.at_least(&stream, total)?, &stream);
                let call = Call::AllGather {
                    send,
                    recv,
                    count: stride,
                    ty: ncclDataType_t::ncclUint8,
                };
                self.run(op, &stream, &[call])?;
                cut_gathered(&self.bytes_in(total)?, &lens, stride)?
            };
            out[self.rank] = msg.to_vec();
            self.traffic += ring_all_gather_traffic(&lens, self.rank);
            Ok(out)
        }

        fn broadcast(&mut self, root: usize, msg: &mut Vec<u8>) -> Result<()> {
            let op = Op {
                name: "broadcast",
                with: With::All(self.world),
            };
            self.usable(op)?;
            ensure!(
                root < self.world,
                "broadcast root {root} outside world of {}",
                self.world
            );
            if self.world == 1 {
                return Ok(());
            }
            let stream = self.stream.clone();
            let is_root = self.rank == root;
            if is_root {
                stream.memcpy_htod(&[msg.len() as u64], &mut self.len_in)?;
            }
            let len_call = Call::Broadcast {
                buf: ptr(&self.len_in, &stream),
                count: 1,
                ty: ncclDataType_t::ncclUint64,
                root,
            };
            self.run(op, &stream, &[len_call])?;
            let len = self.lens_in(1)?[0];
            let len = self.checked(op, len, root)?;
            if len > 0 {
                // In place: the root broadcasts from the outgoing scratch, the others receive there.
                let buf = if is_root {
                    self.stage_bytes(msg, len)?
                } else {
                    ptr(self.bytes_out.at_least(&stream, len)?, &stream)
                };
                let call = Call::Broadcast {
                    buf,
                    count: len,
                    ty: ncclDataType_t::ncclUint8,
                    root,
                };
                self.run(op, &stream, &[call])?;
                if !is_root {
                    let b = self.bytes_out.0.as_ref().expect("allocated above");
                    *msg = stream.clone_dtoh(&b.slice(..len))?;
                }
            } else if !is_root {
                msg.clear();
            }
            self.traffic += tree_broadcast_traffic(self.world, root, self.rank, len);
            Ok(())
        }

        fn all_reduce_sum_device(&mut self, buf: &mut CudaSlice<f32>, stream: &Arc<CudaStream>) -> Result<()> {
            let op = Op {
                name: "all_reduce",
                with: With::All(self.world),
            };
            self.usable(op)?;
            self.same_device(op, stream)?;
            if self.world == 1 || buf.is_empty() {
                return Ok(());
            }
            let count = buf.len();
            // The guard records the write on `buf` once the reduction is queued (multi-stream use).
            let (p, _written) = buf.device_ptr_mut(stream);
            self.run(op, stream, &[Call::AllReduceSum { buf: p, count }])?;
            self.traffic += ring_all_reduce_traffic(count, self.world, self.rank);
            Ok(())
        }

        /// No length header: both sides know n. Indices and values go in one group.
        fn send_pairs_device(
            &mut self,
            to: usize,
            (idx, val): (&CudaSlice<u32>, &CudaSlice<f32>),
            n: usize,
            stream: &Arc<CudaStream>,
        ) -> Result<()> {
            let op = self.pairs_op("send", Some(to), stream, n, &[idx.len(), val.len()])?;
            if n > 0 {
                self.run(
                    op,
                    stream,
                    &pair_calls(Dir::Send, to, (ptr(idx, stream), ptr(val, stream)), n),
                )?;
            }
            self.traffic.sent += 8 * n as u64;
            Ok(())
        }

        fn recv_pairs_device(
            &mut self,
            from: usize,
            (idx, val): (&mut CudaSlice<u32>, &mut CudaSlice<f32>),
            n: usize,
            stream: &Arc<CudaStream>,
        ) -> Result<()> {
            let op = self.pairs_op("recv", Some(from), stream, n, &[idx.len(), val.len()])?;
            if n > 0 {
                let (ip, _wi) = idx.device_ptr_mut(stream);
                let (vp, _wv) = val.device_ptr_mut(stream);
                self.run(op, stream, &pair_calls(Dir::Recv, from, (ip, vp), n))?;
            }
            self.traffic.recv += 8 * n as u64;
            Ok(())
        }

        fn exchange_pairs_device(
            &mut self,
            peer: usize,
            (idx, val): (&CudaSlice<u32>, &CudaSlice<f32>),
            (their_idx, their_val): (&mut CudaSlice<u32>, &mut CudaSlice<f32>),
            n: usize,
            stream: &Arc<CudaStream>,
        ) -> Result<()> {
            let lens = [idx.len(), val.len(), their_idx.len(), their_val.len()];
            let op = self.pairs_op("exchange", Some(peer), stream, n, &lens)?;
            if n > 0 {
                let (ip, _wi) = their_idx.device_ptr_mut(stream);
                let (vp, _wv) = their_val.device_ptr_mut(stream);
                let [s0, s1] = pair_calls(Dir::Send, peer, (ptr(idx, stream), ptr(val, stream)), n);
                let [r0, r1] = pair_calls(Dir::Recv, peer, (ip, vp), n);
                // One group: each side's send waits for the other's receive.
                self.run(op, stream, &[s0, s1, r0, r1])?;
            }
            self.traffic.sent += 8 * n as u64;
            self.traffic.recv += 8 * n as u64;
            Ok(())
        }

        fn broadcast_pairs_device(
            &mut self,
            root: usize,
            (idx, val): (&mut CudaSlice<u32>, &mut CudaSlice<f32>),
            n: usize,
            stream: &Arc<CudaStream>,
        ) -> Result<()> {
            ensure!(
                root < self.world,
                "broadcast root {root} outside a world of {}",
                self.world
            );
            let op = self.pairs_op("broadcast", None, stream, n, &[idx.len(), val.len()])?;
            if self.world == 1 || n == 0 {
                return Ok(());
            }
            let (ip, _wi) = idx.device_ptr_mut(stream);
            let (vp, _wv) = val.device_ptr_mut(stream);
            self.run(op, stream, &pair_calls(Dir::Broadcast(root), root, (ip, vp), n))?;
            self.traffic += tree_broadcast_traffic(self.world, root, self.rank, 8 * n);
            Ok(())
        }
    }

    impl Drop for NcclComm {
        /// Finalize (flushes, and in non-blocking mode runs in the background) then destroy; abort
        /// instead when that does not finish in time or something failed before.
        fn drop(&mut self) {
            let raw = self.handle.0;
            if raw.is_null() {
                return;
            }
            let _ = self.stream.context().bind_to_thread();
            // SAFETY: a live communicator of ours; after destroy or abort the handle is cleared.
            let r = unsafe { sys::ncclCommFinalize(raw) };
            let deadline = Instant::now() + self.timeout.min(DROP_LINGER);
            let op = Op {
                name: "finalize",
                with: With::All(self.world),
            };
            if !failed(r) && self.settle(op, deadline).is_ok() && !self.handle.0.is_null() {
                unsafe { sys::ncclCommDestroy(raw) };
                self.handle.0 = std::ptr::null_mut();
            } else {
                self.abort();
            }
        }
    }

    // ---- the check on real GPUs ----------------------------------------------------------------

    /// What one rank saw in the check script, in order.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Bytes(&'static str, Vec<u8>),
        Floats(&'static str, Vec<f32>),
    }

    fn data(rank: usize, len: usize, salt: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((rank * 131 + i * 17 + salt * 7) % 101) as f32 * 0.37 - 18.5)
            .collect()
    }

    fn piece(rank: usize, len: usize, salt: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ rank as u8 ^ salt)
            .collect()
    }

    /// The same calls on any backend. Point to point pairs rank 2i with 2i+1, the lower one
    /// sending first, so a backend whose sends wait for the receiver cannot deadlock.
    fn script(c: &mut dyn Communicator, stream: &Arc<CudaStream>) -> Result<Vec<Seen>> {
        let (rank, world) = (c.rank(), c.world_size());
        let mut seen = Vec::new();
        let partner = rank ^ 1;
        let sizes = [0usize, 1, 7, 4096, (1 << 20) + 3];
        if partner < world {
            for (i, &n) in sizes.iter().enumerate() {
                let mine = piece(rank, n + rank, i as u8);
                if rank < partner {
                    c.send(partner, &mine)?;
                    seen.push(Seen::Bytes("recv", c.recv(partner)?));
                } else {
                    seen.push(Seen::Bytes("recv", c.recv(partner)?));
                    c.send(partner, &mine)?;
                }
                seen.push(Seen::Bytes("exchange", c.exchange(partner, &mine)?));
                // One side empty, the other not.
                let lopsided = if rank < partner { Vec::new() } else { mine.clone() };
                seen.push(Seen::Bytes("exchange-lopsided", c.exchange(partner, &lopsided)?));
            }
        }
        for (i, &n) in [0usize, 1, 1000, (1 << 22) + 5].iter().enumerate() {
            let mut v = data(rank, n, i);
            c.all_reduce_sum(&mut v)?;
            seen.push(Seen::Floats("all_reduce", v));
            let mut d = stream.clone_htod(&data(rank, n, i + 10))?;
            c.all_reduce_sum_device(&mut d, stream)?;
            seen.push(Seen::Floats("all_reduce_device", stream.clone_dtoh(&d)?));
        }
        for (i, &n) in sizes.iter().enumerate() {
            let len = (n + rank * 3) % ((1 << 20) + 11);
            for part in c.all_gather(&piece(rank, len, i as u8))? {
                seen.push(Seen::Bytes("all_gather", part));
            }
            // All pieces empty: the gather of lengths alone (the training loop's barrier).
            for part in c.all_gather(&[])? {
                seen.push(Seen::Bytes("all_gather-empty", part));
            }
            for root in 0..world {
                let mut m = if rank == root {
                    piece(root, n, i as u8)
                } else {
                    vec![9; 3]
                };
                c.broadcast(root, &mut m)?;
                seen.push(Seen::Bytes("broadcast", m));
            }
        }
        Ok(seen)
    }

    /// NCCL on every visible GPU (at most 4, one thread each) against the local backend running
    /// the same script: identical bytes for point to point, gathers and broadcasts; sums within
    /// rounding of the ring's and bitwise identical across ranks; identical traffic counts. Then a
    /// exchange nobody answers must fail within its timeout and leave the communicator aborted.
    /// `Ok(None)` when fewer than 2 GPUs are visible (NCCL cannot put two ranks on one GPU).
    pub fn check_against_local(timeout: Duration) -> Result<Option<String>> {
        let gpus = CudaContext::device_count()? as usize;
        if gpus < 2 {
            return Ok(None);
        }
        // Even, so that every rank has a point-to-point partner and all scripts line up.
        let world = if gpus >= 4 { 4 } else { 2 };
        let boots = LocalComm::group(world, timeout);
        let refs = LocalComm::group(world, timeout);
        let handles: Vec<_> = boots
            .into_iter()
            .zip(refs)
            .map(|(mut boot, mut local)| {
                std::thread::spawn(move || -> Result<_> {
                    let rank = boot.rank();
                    // Exactly as a training rank opens its GPU (train::device::open).
                    let gpu = RankGpu::open(rank)?;
                    let stream = gpu.stream();
                    let mut nccl = NcclComm::connect(&mut boot, &gpu, timeout)?;
                    let got = script(&mut nccl, &stream).context("NCCL script")?;
                    let want = script(&mut local, &stream).context("local script")?;
                    let traffic = (nccl.traffic(), local.traffic());
                    drop(nccl);
                    let timeout_err = check_timeout(&mut boot, &gpu)?;
                    Ok((got, want, traffic, timeout_err))
                })
            })
            .collect();
        let mut results = Vec::new();
        for (r, h) in handles.into_iter().enumerate() {
            let out = h.join().map_err(|_| anyhow!("rank {r} of the NCCL check panicked"))?;
            results.push(out.with_context(|| format!("rank {r} of the NCCL check"))?);
        }
        let mut problems = Vec::new();
        let mut compared = 0;
        for (r, (got, want, (t_nccl, t_local), _)) in results.iter().enumerate() {
            if got.len() != want.len() {
                problems.push(format!(
                    "rank {r}: {} results from NCCL, {} from local",
                    got.len(),
                    want.len()
                ));
                continue;
            }
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                compared += 1;
                match (g, w) {
                    (Seen::Floats(name, a), Seen::Floats(_, b)) => {
                        let scale = b.iter().fold(1.0f32, |m, x| m.max(x.abs()));
                        let bad = a.len() != b.len()
                            || a.iter()
                                .zip(b)
                                .any(|(x, y)| (x - y).abs() > 1e-5 * scale * world as f32);
                        if bad {
                            problems.push(format!("rank {r}: {name} #{i} differs from the ring beyond rounding"));
                        }
                        // Identical bits on every rank (rank 0's result as reference).
                        if let Some(Seen::Floats(_, z)) = results[0].0.get(i) {
                            let same = z.len() == a.len() && z.iter().zip(a).all(|(p, q)| p.to_bits() == q.to_bits());
                            if !same {
                                problems.push(format!("rank {r}: {name} #{i} is not bitwise rank 0's"));
                            }
                        }
                    }
                    (g, w) if g != w => problems.push(format!("rank {r}: result #{i} differs: {}", short(g, w))),
                    _ => {}
                }
            }
            if t_nccl != t_local {
                problems.push(format!("rank {r}: traffic {t_nccl:?} on NCCL, {t_local:?} on local"));
            }
        }
        if let Some((_, _, _, Some(e))) = results.first() {
            let ok = e.0.contains("did not complete within") && e.1.contains("aborted earlier");
            if !ok {
                problems.push(format!(
                    "rank 0: the unanswered exchange gave {:?}, then {:?}",
                    e.0, e.1
                ));
            }
        }
        ensure!(problems.is_empty(), "NCCL check: {}", problems.join("; "));
        Ok(Some(format!(
            "NCCL check passed on {world} GPUs: {compared} results equal to the local backend's, traffic equal, \
             an unanswered exchange timed out and aborted"
        )))
    }

    fn short(g: &Seen, w: &Seen) -> String {
        let d = |s: &Seen| match s {
            Seen::Bytes(n, b) => format!("{n} of {} bytes", b.len()),
            Seen::Floats(n, f) => format!("{n} of {} floats", f.len()),
        };
        format!("NCCL {} vs local {}", d(g), d(w))
    }

    /// A fresh 2-second communicator; rank 0 exchanges with rank 1, which never answers (an
    /// exchange, because NCCL may buffer a small plain send). Rank 0 returns (that error, the next
    /// call's error); the others wait for it on `boot`.
    fn check_timeout(boot: &mut LocalComm, gpu: &RankGpu) -> Result<Option<(String, String)>> {
        let mut c = NcclComm::connect(boot, gpu, Duration::from_secs(2))?;
        let out = if c.rank() == 0 {
            let first = c
                .exchange(1, &vec![7u8; 1 << 20])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            let next = c.all_gather(&[]).err().map(|e| e.to_string()).unwrap_or_default();
            Some((first, next))
        } else {
            None
        };
        let mut go = Vec::new();
        boot.broadcast(0, &mut go)?;
        Ok(out)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        #[ignore = "needs 2 GPUs"]
        fn nccl_matches_the_local_backend() {
            match super::check_against_local(std::time::Duration::from_secs(60)).unwrap() {
                Some(report) => println!("{report}"),
                None => println!("skipped: fewer than 2 GPUs visible"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Does `a`'s group pair up, call by call in order, with `b`'s (as NCCL matches them)?
    fn pairs(a_rank: usize, a: &[P2p], b_rank: usize, b: &[P2p]) -> bool {
        let towards = |ops: &[P2p], peer: usize, sends: bool| -> Vec<usize> {
            ops.iter()
                .filter_map(|op| match *op {
                    P2p::Send { peer: p, bytes } if sends && p == peer => Some(bytes),
                    P2p::Recv { peer: p, bytes } if !sends && p == peer => Some(bytes),
                    _ => None,
                })
                .collect()
        };
        towards(a, b_rank, true) == towards(b, a_rank, false) && towards(b, a_rank, true) == towards(a, b_rank, false)
    }

    #[test]
    fn exchange_groups_pair_up_for_every_length() {
        for la in [0usize, 1, 9, 1 << 20] {
            for lb in [0usize, 1, 9, 1 << 20] {
                let (a, b) = (2, 5);
                assert!(pairs(
                    a,
                    &header_group(Some(b), Some(b)),
                    b,
                    &header_group(Some(a), Some(a))
                ));
                let pa = payload_group(Some((b, la)), Some((b, lb)));
                let pb = payload_group(Some((a, lb)), Some((a, la)));
                assert!(pairs(a, &pa, b, &pb), "{la} {lb}: {pa:?} {pb:?}");
                assert_eq!(pa.len(), usize::from(la > 0) + usize::from(lb > 0));
            }
        }
    }

    #[test]
    fn send_and_recv_groups_pair_up_and_skip_empty_payloads() {
        let (s, r) = (0, 3);
        assert!(pairs(s, &header_group(Some(r), None), r, &header_group(None, Some(s))));
        for len in [0usize, 5] {
            let ps = payload_group(Some((r, len)), None);
            let pr = payload_group(None, Some((s, len)));
            assert!(pairs(s, &ps, r, &pr));
            assert_eq!(ps.is_empty(), len == 0);
        }
        // A send alone must not pair with an exchange (the peer would wait for our length).
        assert!(!pairs(
            s,
            &header_group(Some(r), None),
            r,
            &header_group(Some(s), Some(s))
        ));
    }

    #[test]
    fn gather_pads_to_the_longest_and_cuts_back() {
        let pieces: Vec<Vec<u8>> = vec![vec![1, 2, 3], vec![], vec![4], vec![5, 6, 7]];
        let lens: Vec<u64> = pieces.iter().map(|p| p.len() as u64).collect();
        let (stride, total) = gather_shape(&lens).unwrap();
        assert_eq!((stride, total), (3, 12));
        let mut padded = Vec::new();
        for p in &pieces {
            padded.extend_from_slice(p);
            padded.resize(padded.len() + stride - p.len(), 0xee);
        }
        let lens: Vec<usize> = lens.iter().map(|&l| l as usize).collect();
        assert_eq!(cut_gathered(&padded, &lens, stride).unwrap(), pieces);
        assert_eq!(gather_shape(&[0, 0]).unwrap(), (0, 0));
        assert_eq!(cut_gathered(&[], &[0, 0], 0).unwrap(), vec![Vec::<u8>::new(); 2]);
        assert!(cut_gathered(&padded[1..], &lens, stride).is_err());
        assert!(cut_gathered(&padded, &[4, 0, 0, 0], stride).is_err());
    }

    #[test]
    fn corrupt_lengths_are_refused_before_allocating() {
        assert_eq!(announced_len(12, 1).unwrap(), 12);
        let err = announced_len(MAX_MESSAGE_BYTES + 1, 3).unwrap_err().to_string();
        assert!(err.contains("rank 3") && err.contains("corrupt"), "{err}");
        assert!(gather_shape(&[1, u64::MAX]).is_err());
        // Each piece within the limit, but not all of them padded together.
        assert!(gather_shape(&[MAX_MESSAGE_BYTES / 2; 3]).is_err());
    }
}
