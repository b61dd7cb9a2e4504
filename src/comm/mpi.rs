//! Workers as MPI processes (feature `mpi`): `mpirun -np N gtopk train ...` or `srun`, over the
//! cluster's own MPI (shared memory, InfiniBand/UCX, whatever it was built and tuned for).
//!
//! What goes over MPI's own collectives and what over point to point:
//! - `send`/`recv`/`exchange` (the gTop-k tree, recursive doubling, the ring): `MPI_Isend`, and
//!   `MPI_Improbe` + `MPI_Imrecv` for a message whose length the receiver does not know.
//! - `all_gather` (Top-k): `MPI_Iallgather` of the lengths, then `MPI_Iallgatherv` of the bytes.
//! - `broadcast` (the global set, rank 0's run directory verdict, NCCL's unique id): `MPI_Ibcast` of
//!   the length, then of the bytes.
//! - `all_reduce_sum` (dense): our ring over point to point by default, because MPI adds in its own
//!   order (the algorithm depends on the library, message size and world size), so dense S-SGD would
//!   no longer be bit-identical to the local and TCP backends. `dist.mpi_all_reduce = "native"`
//!   asks for `MPI_Iallreduce` instead: faster on a tuned fabric, same values to rounding.
//!   Gathering and broadcasting copy bytes, so MPI's versions give the same bits as ours.
//!
//! Byte counts: point to point counts message bytes as the local backend does; the collectives
//! report what the default collectives would have counted (the `*_traffic` formulas, as NCCL does),
//! so traffic metrics compare across backends. The length messages are framing and not counted.
//!
//! Timeouts: MPI has none. Every operation here is non-blocking and polled against `dist.timeout`
//! (sleeping a little longer between polls as the wait grows, so oversubscribed ranks leave the
//! cores to the ones computing). A receive that sees nothing from its peer in time fails with an
//! error naming that peer; a send is buffered (returns at once, as the default collectives need) and
//! fails at a later call if its receiver has not taken it within `dist.timeout` of posting; a
//! collective that times out fails naming the operation and the missing ranks. MPI does not say
//! who is missing, so the rank calls the roll: a zero-byte message to every peer, answered by any
//! rank polling an operation here (every poll loop answers), and the ranks that do not answer
//! within a second (stalled, or still computing) are named. The caller then ends
//! the whole job with `MPI_Abort` (`MpiSession::abort`), since a rank stuck in MPI can only be
//! stopped from outside and `MPI_Finalize` would wait for it.

use super::{ring_all_gather_traffic, ring_all_reduce_traffic, tree_broadcast_traffic};
use super::{Communicator, Traffic};
use ::mpi::ffi;
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::ffi::c_int;
use std::os::raw::c_void;
use std::time::{Duration, Instant};

/// The process's MPI library: `MPI_Init_thread` when made, `MPI_Finalize` when dropped. Only one per
/// process (MPI cannot be initialised twice).
pub struct MpiSession {
    universe: Option<::mpi::environment::Universe>,
}

impl MpiSession {
    /// Initialises MPI. Serialized threading: the communicator may move between threads but is used
    /// by one at a time (`&mut self`), which every MPI library supports.
    pub fn init() -> Result<MpiSession> {
        let (universe, got) = ::mpi::initialize_with_threading(::mpi::Threading::Serialized)
            .context("MPI is already initialised in this process")?;
        ensure!(
            matches!(got, ::mpi::Threading::Serialized | ::mpi::Threading::Multiple),
            "the MPI library offers only {got:?} threading; gtopk needs Serialized"
        );
        Ok(MpiSession {
            universe: Some(universe),
        })
    }

    /// Prints `err` as `main` would and ends every rank of the job with `MPI_Abort`: the others may
    /// be blocked in MPI on this rank, and nothing but the launcher can stop them.
    pub fn abort(mut self, err: &anyhow::Error) -> ! {
        eprintln!("error: {err:#}");
        eprintln!("error: ending the MPI job (MPI_Abort)");
        // Peers that time out at about the same moment get to print their own view first: the one
        // nearest the stalled rank names it, and the first abort would silence it.
        std::thread::sleep(ABORT_GRACE);
        // Never finalise: MPI_Finalize would wait for the ranks this abort is about to stop.
        std::mem::forget(self.universe.take());
        // SAFETY: MPI is initialised (self exists); MPI_Abort does not return.
        unsafe {
            ffi::MPI_Abort(ffi::RSMPI_COMM_WORLD, 1);
        }
        std::process::exit(1)
    }
}

/// Knobs of the MPI communicator.
#[derive(Clone, Debug)]
pub struct MpiOptions {
    pub timeout: Duration,
    /// `all_reduce_sum` through `MPI_Iallreduce` instead of the ring (see the module comment).
    pub native_all_reduce: bool,
    /// Every rank must bring the same (fingerprint, version), as over TCP.
    pub fingerprint: u64,
    pub version: String,
}

/// A buffered send still in flight: MPI reads `buf` until the request completes.
struct Pending {
    req: ffi::MPI_Request,
    buf: Vec<u8>,
    to: usize,
    posted: Instant,
}

pub struct MpiComm {
    comm: ffi::MPI_Comm,
    rank: usize,
    world: usize,
    opts: MpiOptions,
    pending: Vec<Pending>,
    traffic: Traffic,
    /// A request timed out or failed: its buffers may still be in MPI's hands, so Drop must not free
    /// them or the communicator.
    broken: bool,
}

// SAFETY: MPI runs with MPI_THREAD_SERIALIZED (MpiSession::init) and every call goes through
// `&mut self`, so one thread at a time uses the handles; they are plain values valid in any thread.
unsafe impl Send for MpiComm {}

const TAG: c_int = 0;
/// After a collective times out: "are you there?" to every peer (zero bytes).
const TAG_ROLL_CALL: c_int = 1;
/// The answer of a rank that is inside MPI (polling any operation here) to a roll call.
const TAG_PRESENT: c_int = 2;
/// How long a rank whose collective timed out collects answers to its roll call (and answers
/// the others'): ranks polling in MPI answer within milliseconds.
const ROLL_CALL_GRACE: Duration = Duration::from_millis(1000);
/// A valid address for zero-length buffers. An empty `Vec`'s pointer is dangling (the address 1
/// for bytes), which Open MPI takes for `MPI_IN_PLACE` (also 1) and rejects with MPI_ERR_ARG.
static EMPTY: [u64; 1] = [0];

fn send_ptr(buf: &[u8]) -> *const c_void {
    if buf.is_empty() {
        EMPTY.as_ptr() as *const c_void
    } else {
        buf.as_ptr() as *const c_void
    }
}

/// Only for buffers MPI writes nothing into when empty (zero counts).
fn recv_ptr(buf: &mut [u8]) -> *mut c_void {
    if buf.is_empty() {
        EMPTY.as_ptr() as *mut c_void
    } else {
        buf.as_mut_ptr() as *mut c_void
    }
}
/// See `MpiSession::abort`.
const ABORT_GRACE: Duration = Duration::from_millis(500);

/// Polls `done` until it says yes, sleeping a little longer each time (up to 1 ms), or gives up at
/// `deadline`. Returns whether it finished.
fn poll_until(deadline: Instant, mut done: impl FnMut() -> Result<bool>) -> Result<bool> {
    let mut nap = Duration::from_micros(1);
    loop {
        if done()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        if nap < Duration::from_micros(20) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(nap);
        }
        nap = (nap * 2).min(Duration::from_millis(1));
    }
}

/// An MPI return code as an error with the library's own words.
fn check(code: c_int, what: &str) -> Result<()> {
    if code == ffi::MPI_SUCCESS as c_int {
        return Ok(());
    }
    let mut text = vec![0u8; ffi::MPI_MAX_ERROR_STRING as usize + 1];
    let mut len: c_int = 0;
    // SAFETY: `text` holds MPI_MAX_ERROR_STRING bytes as MPI_Error_string requires.
    unsafe { ffi::MPI_Error_string(code, text.as_mut_ptr().cast(), &mut len) };
    text.truncate(len.max(0) as usize);
    bail!("{what}: MPI error {code}: {}", String::from_utf8_lossy(&text))
}

fn count(n: usize, what: &str) -> Result<c_int> {
    c_int::try_from(n).map_err(|_| anyhow!("{what}: {n} elements exceed MPI's int count"))
}

impl MpiComm {
    /// Joins the job over a duplicate of `MPI_COMM_WORLD` (so nothing else in the process can
    /// match our messages) and checks that every rank runs the same config and version.
    pub fn connect(_session: &MpiSession, opts: MpiOptions) -> Result<MpiComm> {
        let mut comm: ffi::MPI_Comm = unsafe { ffi::RSMPI_COMM_NULL };
        let (mut rank, mut world): (c_int, c_int) = (0, 0);
        // SAFETY: MPI is initialised (the session exists); out-pointers are valid.
        unsafe {
            check(ffi::MPI_Comm_dup(ffi::RSMPI_COMM_WORLD, &mut comm), "MPI_Comm_dup")?;
            // Errors come back as codes (turned into messages) instead of killing the job unexplained.
            check(
                ffi::MPI_Comm_set_errhandler(comm, ffi::RSMPI_ERRORS_RETURN),
                "MPI_Comm_set_errhandler",
            )?;
            check(ffi::MPI_Comm_rank(comm, &mut rank), "MPI_Comm_rank")?;
            check(ffi::MPI_Comm_size(comm, &mut world), "MPI_Comm_size")?;
        }
        let mut c = MpiComm {
            comm,
            rank: rank as usize,
            world: world as usize,
            opts,
            pending: Vec::new(),
            traffic: Traffic::default(),
            broken: false,
        };
        c.agree_on_job()?;
        // The setup's messages are not training traffic.
        c.traffic = Traffic::default();
        Ok(c)
    }

    /// Every rank compares every other rank's fingerprint and version with its own, so a mismatch
    /// stops all of them with the same message.
    fn agree_on_job(&mut self) -> Result<()> {
        let mine = serde_json::to_vec(&(self.opts.fingerprint, &self.opts.version))?;
        let all = self
            .all_gather(&mine)
            .context("MPI setup: comparing the ranks' configs")?;
        for (q, theirs) in all.iter().enumerate() {
            let (fp, version): (u64, String) =
                serde_json::from_slice(theirs).with_context(|| format!("MPI setup: rank {q}'s config message"))?;
            ensure!(
                version == self.opts.version,
                "rank {}: rank {q} runs gtopk {version}, this rank {}",
                self.rank,
                self.opts.version
            );
            ensure!(
                fp == self.opts.fingerprint,
                "rank {}: rank {q} was started with a different config (fingerprint {fp:#x}, this rank's \
                 {:#x}): every rank must get the same config file and --set overrides",
                self.rank,
                self.opts.fingerprint
            );
        }
        Ok(())
    }

    /// After a failure MPI may still own some of our buffers, so nothing more goes through MPI but
    /// the abort that follows.
    fn usable(&self) -> Result<()> {
        ensure!(
            !self.broken,
            "rank {}: the MPI communicator failed earlier (see the first error)",
            self.rank
        );
        Ok(())
    }

    fn peer_check(&self, peer: usize) -> Result<()> {
        self.usable()?;
        ensure!(
            peer < self.world && peer != self.rank,
            "rank {}: invalid peer rank {peer} (world size {})",
            self.rank,
            self.world
        );
        Ok(())
    }

    fn test(&mut self, req: &mut ffi::MPI_Request, what: &str) -> Result<bool> {
        let mut flag: c_int = 0;
        // SAFETY: `req` is a live request (or MPI_REQUEST_NULL, which tests as done).
        let r = unsafe { ffi::MPI_Test(req, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
        if let Err(e) = check(r, what) {
            self.broken = true;
            return Err(e);
        }
        Ok(flag != 0)
    }

    /// A zero-byte message with `tag` to `to`, not waited for (MPI completes it on its own).
    fn signal(&self, to: usize, tag: c_int) -> Result<()> {
        let mut req: ffi::MPI_Request = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: zero bytes from a static address; the request is freed at once, which MPI allows
        // for a send (it still completes).
        unsafe {
            check(
                ffi::MPI_Isend(
                    send_ptr(&[]),
                    0,
                    ffi::RSMPI_UINT8_T,
                    to as c_int,
                    tag,
                    self.comm,
                    &mut req,
                ),
                "MPI_Isend (roll call)",
            )?;
            check(ffi::MPI_Request_free(&mut req), "MPI_Request_free (roll call)")?;
        }
        Ok(())
    }

    /// Takes one zero-byte message with `tag` from any rank if one is there; returns its sender.
    fn take_signal(&self, tag: c_int) -> Result<Option<usize>> {
        let mut flag: c_int = 0;
        let mut message: ffi::MPI_Message = unsafe { ffi::RSMPI_MESSAGE_NULL };
        let mut status: ffi::MPI_Status = unsafe { std::mem::zeroed() };
        // SAFETY: out-pointers are valid; a matched message is ours alone, and zero bytes long, so
        // receiving it completes at once.
        unsafe {
            check(
                ffi::MPI_Improbe(
                    ffi::RSMPI_ANY_SOURCE,
                    tag,
                    self.comm,
                    &mut flag,
                    &mut message,
                    &mut status,
                ),
                "MPI_Improbe (roll call)",
            )?;
            if flag == 0 {
                return Ok(None);
            }
            check(
                ffi::MPI_Mrecv(
                    recv_ptr(&mut []),
                    0,
                    ffi::RSMPI_UINT8_T,
                    &mut message,
                    ffi::RSMPI_STATUS_IGNORE,
                ),
                "MPI_Mrecv (roll call)",
            )?;
        }
        Ok(Some(status.MPI_SOURCE as usize))
    }

    /// Answers every roll call waiting for this rank: it is inside MPI, so present.
    fn answer_roll_calls(&mut self) -> Result<()> {
        while let Some(from) = self.take_signal(TAG_ROLL_CALL)? {
            self.signal(from, TAG_PRESENT)?;
        }
        Ok(())
    }

    /// After a collective timed out: asks every peer whether it is there and returns the ones that
    /// did not answer within `ROLL_CALL_GRACE` (a rank polling any MPI operation here answers; a
    /// stalled or still computing one does not). Answers the others' roll calls meanwhile.
    fn roll_call(&mut self) -> Vec<usize> {
        let mut present = vec![false; self.world];
        present[self.rank] = true;
        for q in (0..self.world).filter(|&q| q != self.rank) {
            if self.signal(q, TAG_ROLL_CALL).is_err() {
                return Vec::new();
            }
        }
        let deadline = Instant::now() + ROLL_CALL_GRACE.min(self.opts.timeout);
        // Polls for the whole grace, even once all answered, to answer later roll calls.
        let _ = poll_until(deadline, || {
            while let Some(q) = self.take_signal(TAG_PRESENT)? {
                present[q] = true;
            }
            while let Some(q) = self.take_signal(TAG_ROLL_CALL)? {
                // A rank calling the roll is there too.
                present[q] = true;
                self.signal(q, TAG_PRESENT)?;
            }
            Ok(false)
        });
        (0..self.world).filter(|&q| !present[q]).collect()
    }

    /// Completes the buffered sends whose receivers have taken them; one still waiting after
    /// `dist.timeout` is an error naming its receiver. Answers roll calls too (every poll loop
    /// comes here).
    fn progress_sends(&mut self) -> Result<()> {
        self.answer_roll_calls()?;
        let mut i = 0;
        while i < self.pending.len() {
            let mut req = self.pending[i].req;
            let to = self.pending[i].to;
            let done = self.test(&mut req, &format!("rank {}: send to rank {to}", self.rank))?;
            self.pending[i].req = req;
            if done {
                self.pending.swap_remove(i);
            } else if self.pending[i].posted.elapsed() >= self.opts.timeout {
                self.broken = true;
                bail!(
                    "rank {}: rank {to} did not take a message sent to it within {:?} (dist.timeout)",
                    self.rank,
                    self.opts.timeout
                );
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// Waits for one request of a collective (or a receive), progressing the buffered sends too.
    fn wait(
        &mut self,
        mut req: ffi::MPI_Request,
        what: &str,
        timeout_msg: impl FnOnce(&mut Self) -> String,
    ) -> Result<()> {
        let deadline = Instant::now() + self.opts.timeout;
        let done = poll_until(deadline, || {
            self.progress_sends()?;
            self.test(&mut req, what)
        })?;
        if !done {
            self.broken = true;
            let msg = timeout_msg(self);
            bail!("{msg}");
        }
        Ok(())
    }

    /// A collective that did not finish in time. MPI does not say who is missing, so the roll call
    /// finds the ranks that are not inside MPI.
    fn collective_timeout(&mut self, op: &str) -> String {
        let absent = self.roll_call();
        let who = match absent.as_slice() {
            [] => "every rank answers a roll call, so some are in a different collective".to_string(),
            [q] => format!("rank {q} has not joined it (it did not answer a roll call)"),
            qs => format!(
                "ranks {} have not joined it (they did not answer a roll call)",
                qs.iter().map(|q| q.to_string()).collect::<Vec<_>>().join(", ")
            ),
        };
        format!(
            "rank {}: {op} over {} ranks did not complete within {:?} (dist.timeout): {who}",
            self.rank, self.world, self.opts.timeout
        )
    }

    fn bcast_raw(&mut self, root: usize, ptr: *mut c_void, n: usize, dtype: ffi::MPI_Datatype, op: &str) -> Result<()> {
        let mut req: ffi::MPI_Request = unsafe { ffi::RSMPI_REQUEST_NULL };
        let n = count(n, op)?;
        // SAFETY: `ptr` points at `n` elements of `dtype` that outlive the wait below.
        let r = unsafe { ffi::MPI_Ibcast(ptr, n, dtype, root as c_int, self.comm, &mut req) };
        check(r, op)?;
        self.wait(req, op, |c| c.collective_timeout(op))
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn send(&mut self, to: usize, msg: &[u8]) -> Result<()> {
        self.peer_check(to)?;
        self.progress_sends()?;
        let buf = msg.to_vec();
        let n = count(buf.len(), "send")?;
        let mut req: ffi::MPI_Request = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: `buf` moves into `pending` (its heap block does not move) and stays there until
        // the request completes.
        let r = unsafe {
            ffi::MPI_Isend(
                send_ptr(&buf),
                n,
                ffi::RSMPI_UINT8_T,
                to as c_int,
                TAG,
                self.comm,
                &mut req,
            )
        };
        check(r, &format!("rank {}: MPI_Isend to rank {to}", self.rank))?;
        self.pending.push(Pending {
            req,
            buf,
            to,
            posted: Instant::now(),
        });
        self.traffic.sent += msg.len() as u64;
        Ok(())
    }

    fn recv(&mut self, from: usize) -> Result<Vec<u8>> {
        self.peer_check(from)?;
        let deadline = Instant::now() + self.opts.timeout;
        let mut message: ffi::MPI_Message = unsafe { ffi::RSMPI_MESSAGE_NULL };
        let mut status: ffi::MPI_Status = unsafe { std::mem::zeroed() };
        let comm = self.comm;
        let what = format!("rank {}: receive from rank {from}", self.rank);
        let arrived = poll_until(deadline, || {
            self.progress_sends()?;
            let mut flag: c_int = 0;
            // SAFETY: out-pointers are valid; a matched message is ours alone (MPI_Improbe).
            let r = unsafe { ffi::MPI_Improbe(from as c_int, TAG, comm, &mut flag, &mut message, &mut status) };
            check(r, &what)?;
            Ok(flag != 0)
        })?;
        if !arrived {
            self.broken = true;
            bail!(
                "rank {}: no message from rank {from} within {:?} (dist.timeout)",
                self.rank,
                self.opts.timeout
            );
        }
        let mut n: c_int = 0;
        // SAFETY: `status` was filled by the probe that matched the message.
        check(
            unsafe { ffi::MPI_Get_count(&status, ffi::RSMPI_UINT8_T, &mut n) },
            &what,
        )?;
        let mut buf = vec![0u8; n.max(0) as usize];
        let mut req: ffi::MPI_Request = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: `buf` holds the matched message's `n` bytes and outlives the wait below (on a
        // timeout `broken` keeps Drop from freeing anything MPI may still write, and the job aborts).
        let r = unsafe { ffi::MPI_Imrecv(recv_ptr(&mut buf), n, ffi::RSMPI_UINT8_T, &mut message, &mut req) };
        check(r, &what)?;
        let (rank, timeout) = (self.rank, self.opts.timeout);
        let res = self.wait(req, &what, |_| {
            format!("rank {rank}: a message from rank {from} did not finish arriving within {timeout:?} (dist.timeout)")
        });
        if let Err(e) = res {
            std::mem::forget(buf);
            return Err(e);
        }
        self.traffic.recv += buf.len() as u64;
        Ok(buf)
    }

    fn traffic(&self) -> Traffic {
        self.traffic
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.usable()?;
        if !self.opts.native_all_reduce {
            return super::collectives::ring_all_reduce(self, buf);
        }
        let before = self.traffic;
        if self.world > 1 && !buf.is_empty() {
            let n = count(buf.len(), "all-reduce")?;
            // A copy as the input: MPI_IN_PLACE is a macro whose value differs between libraries and
            // the bindings do not carry it.
            let input = buf.to_vec();
            let mut req: ffi::MPI_Request = unsafe { ffi::RSMPI_REQUEST_NULL };
            // SAFETY: `input` and `buf` outlive the wait below.
            let r = unsafe {
                ffi::MPI_Iallreduce(
                    input.as_ptr() as *const c_void,
                    buf.as_mut_ptr() as *mut c_void,
                    n,
                    ffi::RSMPI_FLOAT,
                    ffi::RSMPI_SUM,
                    self.comm,
                    &mut req,
                )
            };
            check(r, "MPI_Iallreduce")?;
            let res = self.wait(req, "MPI_Iallreduce", |c| {
                c.collective_timeout("the all-reduce (MPI_Iallreduce)")
            });
            if let Err(e) = res {
                std::mem::forget(input);
                return Err(e);
            }
        }
        self.traffic = before;
        self.traffic += ring_all_reduce_traffic(buf.len(), self.world, self.rank);
        Ok(())
    }

    fn all_gather(&mut self, msg: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.usable()?;
        let world = self.world;
        let mut lens = vec![0u64; world];
        let mine = msg.len() as u64;
        let mut req: ffi::MPI_Request = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: `mine` and `lens` (world u64s) outlive the wait below.
        let r = unsafe {
            ffi::MPI_Iallgather(
                &mine as *const u64 as *const c_void,
                1,
                ffi::RSMPI_UINT64_T,
                lens.as_mut_ptr() as *mut c_void,
                1,
                ffi::RSMPI_UINT64_T,
                self.comm,
                &mut req,
            )
        };
        check(r, "MPI_Iallgather")?;
        let res = self.wait(req, "MPI_Iallgather", |c| {
            c.collective_timeout("the all-gather of lengths (MPI_Iallgather)")
        });
        if let Err(e) = res {
            std::mem::forget(lens);
            return Err(e);
        }

        let lens: Vec<usize> = lens.iter().map(|&l| l as usize).collect();
        let counts = lens
            .iter()
            .map(|&l| count(l, "all-gather"))
            .collect::<Result<Vec<_>>>()?;
        let mut displs = Vec::with_capacity(world);
        let mut at = 0usize;
        for &l in &lens {
            displs.push(count(at, "all-gather")?);
            at += l;
        }
        count(at, "all-gather")?;
        let mut all = vec![0u8; at];
        let mut req: ffi::MPI_Request = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: `msg`, `counts`, `displs` and `all` (sum of counts bytes) outlive the wait below.
        let r = unsafe {
            ffi::MPI_Iallgatherv(
                send_ptr(msg),
                counts[self.rank],
                ffi::RSMPI_UINT8_T,
                recv_ptr(&mut all),
                counts.as_ptr(),
                displs.as_ptr(),
                ffi::RSMPI_UINT8_T,
                self.comm,
                &mut req,
            )
        };
        check(r, "MPI_Iallgatherv")?;
        let res = self.wait(req, "MPI_Iallgatherv", |c| {
            c.collective_timeout("the all-gather (MPI_Iallgatherv)")
        });
        if let Err(e) = res {
            std::mem::forget(all);
            std::mem::forget(counts);
            std::mem::forget(displs);
            return Err(e);
        }
        self.traffic += ring_all_gather_traffic(&lens, self.rank);
        let mut out = Vec::with_capacity(world);
        let mut at = 0;
        for &l in &lens {
            out.push(all[at..at + l].to_vec());
            at += l;
        }
        Ok(out)
    }

    fn broadcast(&mut self, root: usize, msg: &mut Vec<u8>) -> Result<()> {
        self.usable()?;
        ensure!(
            root < self.world,
            "broadcast root {root} outside world of {}",
            self.world
        );
        if self.world == 1 {
            return Ok(());
        }
        let mut len = msg.len() as u64;
        self.bcast_raw(
            root,
            &mut len as *mut u64 as *mut c_void,
            1,
            unsafe { ffi::RSMPI_UINT64_T },
            &format!("the broadcast from rank {root} (MPI_Ibcast of its length)"),
        )?;
        if self.rank != root {
            *msg = vec![0u8; len as usize];
        }
        let op = format!("the broadcast from rank {root} (MPI_Ibcast)");
        if let Err(e) = self.bcast_raw(root, recv_ptr(msg), msg.len(), unsafe { ffi::RSMPI_UINT8_T }, &op) {
            // MPI may still write into the buffer: hand it over for good.
            std::mem::forget(std::mem::take(msg));
            return Err(e);
        }
        self.traffic += tree_broadcast_traffic(self.world, root, self.rank, msg.len());
        Ok(())
    }
}

impl Drop for MpiComm {
    /// Waits (within `dist.timeout`) for the buffered sends, so the last messages reach their
    /// receivers before MPI_Finalize; after a failure MPI may still own buffers, so leak them. The
    /// duplicate communicator is left to MPI_Finalize: freeing it is collective in the standard,
    /// and a rank on its way to MPI_Abort never would.
    fn drop(&mut self) {
        if !self.broken {
            let deadline = Instant::now() + self.opts.timeout;
            let drained = poll_until(deadline, || {
                self.progress_sends()?;
                Ok(self.pending.is_empty())
            });
            if matches!(drained, Ok(true)) {
                return;
            }
        }
        for p in std::mem::take(&mut self.pending) {
            std::mem::forget(p.buf);
        }
    }
}
