//! Workers as processes, on one host or many: a full mesh of TCP connections, set up through the
//! rendezvous store that rank 0 hosts.
//!
//! Setup, for rank r of P:
//! 1. open a data listener on an ephemeral port; claim `meta/r` (world size, config fingerprint,
//!    version) with a create-if-absent, so a second process with the same rank is refused; publish
//!    `addr/r`;
//! 2. rank 0 compares everyone's `meta/q` with its own and publishes a `verdict` (empty: go); every
//!    other rank compares itself with `meta/0` and then waits for the verdict, so a mismatch stops
//!    every rank with a message that names the rank and the difference;
//! 3. the mesh: rank r dials every lower rank and accepts every higher one, each connection opened by
//!    a hello (magic, job token, from, to, world size) that the acceptor answers with one status byte.
//!
//! Data: each message is a frame `[u64 len LE][payload]`. One reader thread per peer drains its
//! socket into an unbounded channel, so the kernel buffers never stay full for long and a rank
//! blocked in `send` can never deadlock with a peer blocked in `send`. Sends write straight to the
//! socket (TCP_NODELAY): because the far side's reader always drains, a write waits only for the
//! network, never for the peer to call `recv`; going direct saves a copy of every (possibly huge)
//! message and reports a broken connection at the `send` that hit it. A write timeout of
//! `dist.timeout` catches a peer that stopped reading altogether (a stopped process).

use super::launch::LaunchInfo;
use super::rendezvous::{self, read_polling, show_addr, StoreClient, StoreServer, POLL};
use super::{Communicator, Traffic};
use anyhow::{anyhow, bail, ensure, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 4 << 30;

const MAGIC: &[u8; 8] = b"gtopk-dp";
const HELLO_LEN: usize = 8 + 8 + 3 * 4;
const ACCEPTED: u8 = 0;
const WRONG_WORLD: u8 = 1;
const NOT_EXPECTED: u8 = 2;
const DUPLICATE: u8 = 3;
/// A connection to a data port must say who it is within this, or it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds the handshake threads a flood of junk connections can start during setup.
const MAX_GREETERS: usize = 1024;
const ACCEPT_POLL: Duration = Duration::from_millis(5);
/// Rank 0 decides the verdict within `timeout` of reaching the store; the others wait this much
/// longer for it, so they report rank 0's reason rather than a timeout of their own.
const VERDICT_SLACK: Duration = Duration::from_secs(10);
/// How long a failed rank 0 keeps its store up for the others to read why (at most `timeout`).
const VERDICT_LINGER: Duration = Duration::from_secs(5);
/// How long Drop waits for peers to close their side (at most `timeout`), see `Drop`.
const CLOSE_LINGER: Duration = Duration::from_secs(5);
/// Messages up to this size go out in one write with their header (one segment with TCP_NODELAY).
const SMALL_FRAME: usize = 64 << 10;
/// A receive buffer starts this large and at most doubles with the bytes that actually arrived, so a
/// garbage length costs at most twice the data really sent.
const FIRST_CHUNK: usize = 16 << 20;

#[derive(Clone, Debug)]
pub struct TcpOptions {
    /// Shared secret of the job (see [`rendezvous::job_token`]): strangers are refused.
    pub token: u64,
    /// Hash of the effective config: ranks with different configs refuse to start.
    pub fingerprint: u64,
    /// The binary's version: ranks running different builds refuse to start.
    pub version: String,
    /// `dist.timeout`: for setup, for each `recv` and for each `send`.
    pub timeout: Duration,
    /// Interface for the data listener and, on rank 0, the rendezvous store.
    pub bind_ip: IpAddr,
    /// The host other ranks dial to reach this one. Default: `bind_ip` if it is specific; on rank 0
    /// MASTER_ADDR (everyone reaches it already); elsewhere the interface that reaches rank 0.
    pub advertise_host: Option<String>,
    /// Largest message sent or accepted; a bigger length from a peer means a corrupt stream.
    pub max_message_bytes: u64,
}

impl TcpOptions {
    pub fn new(token: u64, fingerprint: u64, version: impl Into<String>) -> TcpOptions {
        TcpOptions {
            token,
            fingerprint,
            version: version.into(),
            timeout: DEFAULT_TIMEOUT,
            bind_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            advertise_host: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Meta {
    world_size: usize,
    fingerprint: u64,
    version: String,
}

#[derive(Serialize, Deserialize)]
struct PeerAddr {
    host: String,
    port: u16,
}

enum Event {
    Msg(Vec<u8>),
    /// The connection ended; why.
    Gone(String),
    /// The peer broke the framing; the whole message, naming the peer.
    Bad(String),
}

struct Peer {
    stream: TcpStream,
    inbox: Receiver<Event>,
    reader: Option<JoinHandle<()>>,
    /// Once a peer is gone or broke the protocol, every later call says so again.
    failed: Option<String>,
}

pub struct TcpComm {
    rank: usize,
    world: usize,
    peers: Vec<Option<Peer>>,
    timeout: Duration,
    max_message: u64,
    traffic: Traffic,
    /// Rank 0 keeps the store up for the life of the job.
    _store: Option<StoreServer>,
}

impl TcpComm {
    /// Joins the job described by `info`; rank 0 hosts the rendezvous store on
    /// `bind_ip:MASTER_PORT`, the others reach it at `MASTER_ADDR:MASTER_PORT`.
    pub fn connect(info: &LaunchInfo, opts: &TcpOptions) -> Result<TcpComm> {
        if info.world_size <= 1 {
            return Self::alone(opts);
        }
        let rank = info.rank;
        let port = info.master_port.ok_or_else(|| {
            anyhow!(
                "rank {rank}: MASTER_PORT is not set: rank 0 hosts the rendezvous store on that port of \
                 MASTER_ADDR ({}); set both, or start the job with scripts/launch.sh",
                info.master_addr
            )
        })?;
        if rank == 0 {
            let server = StoreServer::bind(SocketAddr::new(opts.bind_ip, port), opts.token)
                .map_err(|e| anyhow!("rank 0: cannot host the rendezvous store: {e:#}"))?;
            return Self::connect_hosting(info, opts, server);
        }
        ensure!(
            port != 0,
            "rank {rank}: MASTER_PORT = 0 lets rank 0 pick any free port, but the other ranks need the number"
        );
        ensure!(!opts.timeout.is_zero(), "rank {rank}: dist.timeout must be positive");
        let store = StoreClient::connect(&info.master_addr, port, opts.token, opts.timeout)
            .map_err(|e| anyhow!("rank {rank}: {e:#}"))?;
        Self::establish(info, opts, store, None)
    }

    /// Rank 0 with a store it has already bound (to learn a port-0 address before the others start).
    pub fn connect_hosting(info: &LaunchInfo, opts: &TcpOptions, store: StoreServer) -> Result<TcpComm> {
        ensure!(
            info.rank == 0,
            "rank {}: only rank 0 hosts the rendezvous store",
            info.rank
        );
        if info.world_size <= 1 {
            return Self::alone(opts);
        }
        ensure!(!opts.timeout.is_zero(), "rank 0: dist.timeout must be positive");
        let dial = store.dial_addr();
        let client = StoreClient::connect(&dial.ip().to_string(), dial.port(), opts.token, opts.timeout)
            .map_err(|e| anyhow!("rank 0: cannot reach its own rendezvous store: {e:#}"))?;
        Self::establish(info, opts, client, Some(store))
    }

    fn alone(opts: &TcpOptions) -> Result<TcpComm> {
        Ok(TcpComm {
            rank: 0,
            world: 1,
            peers: vec![None],
            timeout: opts.timeout,
            max_message: opts.max_message_bytes,
            traffic: Traffic::default(),
            _store: None,
        })
    }

    fn establish(
        info: &LaunchInfo,
        opts: &TcpOptions,
        mut store: StoreClient,
        server: Option<StoreServer>,
    ) -> Result<TcpComm> {
        let (rank, world) = (info.rank, info.world_size);
        let tag = |e: anyhow::Error| anyhow!("rank {rank}: {e:#}");
        let listener = TcpListener::bind((opts.bind_ip, 0))
            .map_err(|e| anyhow!("rank {rank}: cannot open a data port on {}: {e}", opts.bind_ip))?;
        let port = listener.local_addr()?.port();
        let host = match &opts.advertise_host {
            Some(h) => h.clone(),
            None if !opts.bind_ip.is_unspecified() => opts.bind_ip.to_string(),
            None if rank == 0 => info.master_addr.clone(),
            None => store.local_ip().map_err(tag)?.to_string(),
        };
        let me = Meta {
            world_size: world,
            fingerprint: opts.fingerprint,
            version: opts.version.clone(),
        };
        // Claim the rank before publishing the address, so a duplicate cannot overwrite it.
        if !store
            .create(&format!("meta/{rank}"), &serde_json::to_vec(&me)?)
            .map_err(tag)?
        {
            bail!("rank {rank}: another process already joined as rank {rank} (two processes started with the same rank?)");
        }
        store
            .set(&format!("addr/{rank}"), &serde_json::to_vec(&PeerAddr { host, port })?)
            .map_err(tag)?;
        if rank == 0 {
            check_everyone(&mut store, &me, world, opts.timeout).map_err(tag)?;
        } else {
            await_verdict(&mut store, rank, &me, opts.timeout).map_err(tag)?;
        }
        let deadline = Instant::now() + opts.timeout;
        let mut lower = Vec::with_capacity(rank);
        for q in 0..rank {
            let raw = store.get(&format!("addr/{q}"), opts.timeout).map_err(tag)?;
            let a: PeerAddr = serde_json::from_slice(&raw)
                .map_err(|e| anyhow!("rank {rank}: rank {q} published an unreadable address: {e}"))?;
            lower.push(a);
        }
        // Nothing below needs the store: this rank is done with it before it dials rank 0, so rank 0
        // (whose mesh completes only after every rank dialled it) can never close it under anyone.
        drop(store);

        let streams = mesh(rank, world, opts, listener, &lower, deadline).map_err(tag)?;
        let mut comm = TcpComm {
            rank,
            world,
            peers: (0..world).map(|_| None).collect(),
            timeout: opts.timeout,
            max_message: opts.max_message_bytes,
            traffic: Traffic::default(),
            _store: server,
        };
        // Peers are added one by one so that an error half-way leaves Drop to close what exists.
        for (q, s) in streams.into_iter().enumerate() {
            if let Some(s) = s {
                comm.peers[q] = Some(start_peer(s, q, opts).map_err(|e| anyhow!("rank {rank}: rank {q}: {e}"))?);
            }
        }
        Ok(comm)
    }

    fn peer_check(&self, peer: usize) -> Result<()> {
        if peer >= self.world || peer == self.rank {
            bail!(
                "rank {}: invalid peer rank {peer} (world size {})",
                self.rank,
                self.world
            );
        }
        Ok(())
    }
}

fn differs(q: usize, m: &Meta, m0: &Meta) -> Option<String> {
    if m.world_size != m0.world_size {
        Some(format!(
            "rank {q} was started with world size {}, rank 0 with {}",
            m.world_size, m0.world_size
        ))
    } else if m.version != m0.version {
        Some(format!(
            "rank {q} runs version {:?}, rank 0 runs {:?} (version mismatch: start every rank from the same build)",
            m.version, m0.version
        ))
    } else if m.fingerprint != m0.fingerprint {
        Some(format!(
            "rank {q} runs a different config (fingerprint {:016x}) than rank 0 ({:016x})",
            m.fingerprint, m0.fingerprint
        ))
    } else {
        None
    }
}

fn parse_meta(raw: &[u8], q: usize) -> Result<Meta> {
    serde_json::from_slice(raw).map_err(|e| anyhow!("rank {q} published unreadable metadata: {e}"))
}

fn ranks_list(ranks: &[usize]) -> String {
    let list: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
    match ranks.len() {
        1 => format!("rank {}", list[0]),
        _ => format!("ranks {}", list.join(", ")),
    }
}

/// Rank 0: every rank must agree with it. Decides within `timeout` and publishes the verdict.
fn check_everyone(store: &mut StoreClient, me: &Meta, world: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut problem: Option<String> = None;
    let mut missing = Vec::new();
    let mut gave_up_on = 0;
    for q in 1..world {
        // After the first problem only look: the verdict is decided, and waiting for a rank that may
        // never come (it could be outside our world) would only delay everyone's error.
        let wait = match problem {
            Some(_) => Duration::ZERO,
            None => deadline.saturating_duration_since(Instant::now()),
        };
        match store.try_get(&format!("meta/{q}"), wait)? {
            None => {
                missing.push(q);
                if Instant::now() >= deadline {
                    gave_up_on += 1;
                }
            }
            Some(raw) => {
                let found = parse_meta(&raw, q).map_or_else(|e| Some(e.to_string()), |m| differs(q, &m, me));
                if let Some(p) = found {
                    problem.get_or_insert(p);
                }
            }
        }
    }
    if problem.is_none() && !missing.is_empty() {
        problem = Some(format!(
            "{} did not join within {timeout:?} (dist.timeout): was every rank started, with the same \
             MASTER_ADDR and MASTER_PORT?",
            ranks_list(&missing)
        ));
    }
    store.set("verdict", problem.as_deref().unwrap_or("").as_bytes())?;
    if let Some(p) = problem {
        // Keep the store up until every rank that may still come has learnt why (each says so),
        // so they report the reason instead of a lost connection; not for those given up on.
        let expect = (world - 1 - gave_up_on) as i64;
        let _ = store.wait_at_least("verdict/seen", expect, timeout.min(VERDICT_LINGER));
        bail!("the job cannot start: {p}");
    }
    Ok(())
}

fn await_verdict(store: &mut StoreClient, rank: usize, me: &Meta, timeout: Duration) -> Result<()> {
    let m0 = parse_meta(&store.get("meta/0", timeout)?, 0)?;
    if let Some(p) = differs(rank, me, &m0) {
        let _ = store.add("verdict/seen", 1);
        bail!("the job cannot start: {p}");
    }
    let wait = timeout + VERDICT_SLACK;
    let verdict = store
        .try_get("verdict", wait)?
        .ok_or_else(|| anyhow!("rank 0 did not confirm the job within {wait:?}"))?;
    if !verdict.is_empty() {
        let _ = store.add("verdict/seen", 1);
        bail!("the job cannot start: {}", String::from_utf8_lossy(&verdict));
    }
    Ok(())
}

/// One connection per pair: dial the lower ranks while a thread accepts the higher ones.
fn mesh(
    rank: usize,
    world: usize,
    opts: &TcpOptions,
    listener: TcpListener,
    lower: &[PeerAddr],
    deadline: Instant,
) -> Result<Vec<Option<TcpStream>>> {
    let cancel = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let cancel = cancel.clone();
        let (token, timeout) = (opts.token, opts.timeout);
        thread::Builder::new()
            .name("gtopk-accept".into())
            .spawn(move || accept_peers(listener, rank, world, token, deadline, timeout, &cancel))?
    };
    let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
    for (q, a) in lower.iter().enumerate() {
        match dial_peer(rank, world, q, a, opts.token, deadline, opts.timeout) {
            Ok(s) => streams[q] = Some(s),
            Err(e) => {
                cancel.store(true, Ordering::Relaxed);
                let _ = acceptor.join();
                return Err(e);
            }
        }
    }
    let accepted = acceptor
        .join()
        .map_err(|_| anyhow!("the thread accepting peers panicked"))??;
    for (q, s) in accepted {
        streams[q] = Some(s);
    }
    Ok(streams)
}

fn hello(token: u64, from: usize, to: usize, world: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(HELLO_LEN);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&token.to_le_bytes());
    for v in [from, to, world] {
        h.extend_from_slice(&(v as u32).to_le_bytes());
    }
    h
}

fn dial_peer(
    rank: usize,
    world: usize,
    q: usize,
    a: &PeerAddr,
    token: u64,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream> {
    let addr = show_addr(&a.host, a.port);
    // The peer listens before it publishes its address, so a refusal is a transient (full backlog).
    let mut s = loop {
        match rendezvous::dial(&a.host, a.port, deadline) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                bail!("cannot connect to rank {q} at {addr} within {timeout:?} (dist.timeout): {e}")
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    };
    s.set_nodelay(true)?;
    s.write_all(&hello(token, rank, q, world))
        .map_err(|e| anyhow!("rank {q} at {addr}: handshake failed: {e}"))?;
    let wait = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    s.set_read_timeout(Some(wait))?;
    let mut ack = [0u8; 1];
    match s.read_exact(&mut ack) {
        Ok(()) => match ack[0] {
            ACCEPTED => {
                s.set_read_timeout(None)?;
                Ok(s)
            }
            WRONG_WORLD => bail!("rank {q} at {addr} refused us: it was started with a different world size"),
            NOT_EXPECTED => bail!("rank {q} at {addr} did not expect a connection from rank {rank}"),
            DUPLICATE => bail!("rank {q} at {addr} already has a rank {rank}: two processes started as rank {rank}?"),
            x => bail!("{addr} answered the handshake with {x}: not a gtopk rank"),
        },
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            bail!("rank {q} at {addr} did not answer the handshake within {timeout:?} (dist.timeout)")
        }
        Err(_) => {
            bail!("rank {q} at {addr} closed the connection during the handshake: wrong job token, or not a gtopk rank")
        }
    }
}

/// Accepts until every higher rank has said hello. Each accepted socket gets its own short-lived
/// thread to read the hello, so junk that stalls or trickles never holds up the real ranks.
fn accept_peers(
    listener: TcpListener,
    rank: usize,
    world: usize,
    token: u64,
    deadline: Instant,
    timeout: Duration,
    cancel: &AtomicBool,
) -> Result<Vec<(usize, TcpStream)>> {
    listener.set_nonblocking(true)?;
    let mut need: BTreeSet<usize> = (rank + 1..world).collect();
    let mut got = Vec::new();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = channel::<(TcpStream, [u8; HELLO_LEN])>();
    let mut greeters: Vec<JoinHandle<()>> = Vec::new();
    let result = 'accept: loop {
        while let Ok((mut s, h)) = rx.try_recv() {
            if &h[..8] != MAGIC || u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")) != token {
                continue;
            }
            let field = |i: usize| u32::from_le_bytes(h[16 + 4 * i..20 + 4 * i].try_into().expect("4 bytes")) as usize;
            let (from, to, w) = (field(0), field(1), field(2));
            let answer = if w != world {
                WRONG_WORLD
            } else if to != rank || from <= rank || from >= world {
                NOT_EXPECTED
            } else if !need.contains(&from) {
                DUPLICATE
            } else {
                ACCEPTED
            };
            let delivered = s.write_all(&[answer]).is_ok();
            if answer == DUPLICATE {
                break 'accept Err(anyhow!(
                    "two processes connected as rank {from} (two processes started as rank {from}?)"
                ));
            }
            if answer == ACCEPTED && delivered {
                need.remove(&from);
                got.push((from, s));
            }
        }
        if need.is_empty() {
            break Ok(());
        }
        if cancel.load(Ordering::Relaxed) {
            break Err(anyhow!("cancelled"));
        }
        if Instant::now() >= deadline {
            let missing: Vec<usize> = need.iter().copied().collect();
            break Err(anyhow!(
                "{} did not connect within {timeout:?} (dist.timeout)",
                ranks_list(&missing)
            ));
        }
        match listener.accept() {
            Ok((s, _)) => {
                greeters.retain(|h| !h.is_finished());
                if greeters.len() < MAX_GREETERS {
                    let (tx, stop) = (tx.clone(), stop.clone());
                    let by = (Instant::now() + HANDSHAKE_TIMEOUT).min(deadline);
                    let spawned = thread::Builder::new()
                        .name("gtopk-greet".into())
                        .spawn(move || read_hello(s, by, &stop, &tx));
                    if let Ok(h) = spawned {
                        greeters.push(h);
                    }
                }
            }
            Err(_) => thread::sleep(ACCEPT_POLL),
        }
    };
    stop.store(true, Ordering::Relaxed);
    for h in greeters {
        let _ = h.join();
    }
    result.map(|()| got)
}

fn read_hello(mut s: TcpStream, by: Instant, stop: &AtomicBool, tx: &Sender<(TcpStream, [u8; HELLO_LEN])>) {
    if s.set_nonblocking(false).is_err() || s.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let mut h = [0u8; HELLO_LEN];
    if read_polling(&mut s, &mut h, Some(by), stop).is_ok() {
        let _ = tx.send((s, h));
    }
}

fn start_peer(s: TcpStream, q: usize, opts: &TcpOptions) -> io::Result<Peer> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(None)?;
    s.set_write_timeout(Some(opts.timeout))?;
    s.set_nodelay(true)?;
    let reading = s.try_clone()?;
    let (tx, inbox) = channel();
    let max = opts.max_message_bytes;
    let reader = thread::Builder::new()
        .name(format!("gtopk-recv-{q}"))
        .spawn(move || read_frames(reading, q, max, &tx))?;
    Ok(Peer {
        stream: s,
        inbox,
        reader: Some(reader),
        failed: None,
    })
}

fn describe(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => "connection closed".into(),
        _ => format!("connection error: {e}"),
    }
}

/// The reader thread of one peer: frames into the inbox until the connection ends.
fn read_frames(mut s: TcpStream, peer: usize, max: u64, tx: &Sender<Event>) {
    let end = loop {
        let mut hdr = [0u8; 8];
        if let Err(e) = s.read_exact(&mut hdr) {
            break Event::Gone(describe(&e));
        }
        let len = u64::from_le_bytes(hdr);
        if len > max {
            // Nothing after a bad length can be trusted; closing tells the peer at once.
            let _ = s.shutdown(Shutdown::Both);
            break Event::Bad(format!(
                "rank {peer} sent a message of {len} bytes, over the {max}-byte limit (max message bytes): \
                 corrupt stream or not a gtopk rank"
            ));
        }
        match read_body(&mut s, len) {
            Ok(m) => {
                if tx.send(Event::Msg(m)).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                break Event::Gone(format!("connection closed in the middle of a {len}-byte message"))
            }
            Err(e) => break Event::Gone(describe(&e)),
        }
    };
    let _ = tx.send(end);
}

fn read_body(s: &mut TcpStream, len: u64) -> io::Result<Vec<u8>> {
    let len = usize::try_from(len).map_err(|_| io::Error::other("message larger than this machine's address space"))?;
    let mut buf = Vec::new();
    while buf.len() < len {
        let start = buf.len();
        let target = len.min(start.saturating_mul(2).max(FIRST_CHUNK));
        buf.reserve_exact(target - start);
        // Appended by the read itself, into memory not zeroed first: the bytes are written once.
        let want = (target - start) as u64;
        if (&mut *s).take(want).read_to_end(&mut buf)? as u64 != want {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf)
}

fn write_frame(s: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    let hdr = (msg.len() as u64).to_le_bytes();
    if msg.len() <= SMALL_FRAME {
        let mut buf = Vec::with_capacity(8 + msg.len());
        buf.extend_from_slice(&hdr);
        buf.extend_from_slice(msg);
        s.write_all(&buf)
    } else {
        s.write_all(&hdr)?;
        s.write_all(msg)
    }
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn send(&mut self, to: usize, msg: &[u8]) -> Result<()> {
        self.peer_check(to)?;
        let (me, timeout) = (self.rank, self.timeout);
        if msg.len() as u64 > self.max_message {
            bail!(
                "rank {me}: message of {} bytes to rank {to} exceeds the {}-byte limit (max message bytes)",
                msg.len(),
                self.max_message
            );
        }
        let peer = self.peers[to].as_mut().expect("a connection to every peer");
        if let Some(e) = &peer.failed {
            bail!("{e}");
        }
        if let Err(e) = write_frame(&mut peer.stream, msg) {
            // A partial frame may be on the wire: this connection cannot carry another message.
            let e = match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
                    "rank {me}: sending to rank {to} timed out after {timeout:?} (dist.timeout): is it stalled?"
                ),
                _ => format!("rank {me}: rank {to} is gone ({})", describe(&e)),
            };
            peer.failed = Some(e.clone());
            bail!(e);
        }
        self.traffic.sent += msg.len() as u64;
        Ok(())
    }

    fn recv(&mut self, from: usize) -> Result<Vec<u8>> {
        self.peer_check(from)?;
        let (me, timeout) = (self.rank, self.timeout);
        let peer = self.peers[from].as_mut().expect("a connection to every peer");
        if let Some(e) = &peer.failed {
            bail!("{e}");
        }
        let event = match peer.inbox.recv_timeout(timeout) {
            Ok(ev) => ev,
            Err(RecvTimeoutError::Timeout) => {
                bail!("rank {me}: no message from rank {from} within {timeout:?} (dist.timeout)")
            }
            Err(RecvTimeoutError::Disconnected) => Event::Gone("connection closed".into()),
        };
        let e = match event {
            Event::Msg(m) => {
                self.traffic.recv += m.len() as u64;
                return Ok(m);
            }
            Event::Gone(why) => format!("rank {me}: rank {from} is gone ({why})"),
            Event::Bad(why) => format!("rank {me}: {why}"),
        };
        peer.failed = Some(e.clone());
        bail!(e)
    }

    fn traffic(&self) -> Traffic {
        self.traffic
    }
}

impl Drop for TcpComm {
    fn drop(&mut self) {
        let peers: Vec<Peer> = self.peers.iter_mut().filter_map(Option::take).collect();
        // Half-close first: the kernel still delivers everything already sent, then end-of-stream.
        for p in &peers {
            let _ = p.stream.shutdown(Shutdown::Write);
        }
        // Closing a socket while the peer's data sits unread makes the kernel reset the connection,
        // which can destroy our last messages before the peer has read them. So wait (briefly) for
        // each peer to close its side too; the reader keeps draining meanwhile.
        let until = Instant::now() + self.timeout.min(CLOSE_LINGER);
        for p in &peers {
            while let Ok(Event::Msg(_)) = p.inbox.recv_timeout(until.saturating_duration_since(Instant::now())) {}
        }
        for mut p in peers {
            // Wakes a reader still blocked in read (a peer that never closed).
            let _ = p.stream.shutdown(Shutdown::Both);
            if let Some(h) = p.reader.take() {
                let _ = h.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::launch::Overrides;
    use crate::comm::local::LocalComm;
    use std::net::Ipv4Addr;
    use std::process::Command;
    use std::sync::Barrier;

    const TOKEN: u64 = 0x7e57;
    const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn info(rank: usize, world: usize, port: u16) -> LaunchInfo {
        LaunchInfo {
            rank,
            world_size: world,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: Some(port),
            source: "test",
        }
    }

    fn opts(timeout: Duration) -> TcpOptions {
        let mut o = TcpOptions::new(TOKEN, 7, "test");
        o.timeout = timeout;
        o.bind_ip = LOOPBACK;
        o
    }

    fn bind_store() -> StoreServer {
        StoreServer::bind(SocketAddr::new(LOOPBACK, 0), TOKEN).unwrap()
    }

    /// Starts one rank on a thread; `store` only for rank 0.
    fn spawn_rank<T: Send + 'static>(
        info: LaunchInfo,
        opts: TcpOptions,
        store: Option<StoreServer>,
        body: impl FnOnce(Result<TcpComm>) -> T + Send + 'static,
    ) -> JoinHandle<T> {
        thread::spawn(move || {
            let comm = match store {
                Some(s) => TcpComm::connect_hosting(&info, &opts, s),
                None => TcpComm::connect(&info, &opts),
            };
            body(comm)
        })
    }

    /// `threads` ranks as threads; `setup(i, port)` says who thread i claims to be. Thread 0 hosts
    /// the store, on a port the kernel picked.
    fn run_job<T: Send + 'static>(
        threads: usize,
        setup: impl Fn(usize, u16) -> (LaunchInfo, TcpOptions),
        body: impl Fn(Result<TcpComm>) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let store = bind_store();
        let port = store.local_addr().port();
        let body = Arc::new(body);
        let mut store = Some(store);
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (info, o) = setup(i, port);
                let body = body.clone();
                spawn_rank(info, o, if i == 0 { store.take() } else { None }, move |c| body(c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn plain(world: usize, timeout: Duration) -> impl Fn(usize, u16) -> (LaunchInfo, TcpOptions) {
        move |i, port| (info(i, world, port), opts(timeout))
    }

    fn data(rank: usize, len: usize) -> Vec<f32> {
        // Values of mixed magnitude, so the order of additions shows in the rounding.
        (0..len)
            .map(|i| ((i * 2_654_435_761 + rank * 97) % 1999) as f32 / 7.0 - 140.0 + 1e-3 * rank as f32)
            .collect()
    }

    #[derive(Debug, PartialEq)]
    struct Outcome {
        reduced: Vec<Vec<u32>>,
        gathered: Vec<Vec<Vec<u8>>>,
        broadcast: Vec<Vec<u8>>,
        traffic: Traffic,
    }

    fn collectives(c: &mut dyn Communicator) -> Outcome {
        let (rank, world) = (c.rank(), c.world_size());
        let mut out = Outcome {
            reduced: Vec::new(),
            gathered: Vec::new(),
            broadcast: Vec::new(),
            traffic: Traffic::default(),
        };
        for len in [0usize, 1, 3, 17, 1000] {
            let mut buf = data(rank, len);
            c.all_reduce_sum(&mut buf).unwrap();
            out.reduced.push(buf.iter().map(|x| x.to_bits()).collect());
            let mine: Vec<u8> = (0..len + rank).map(|i| (i * 31 + rank) as u8).collect();
            out.gathered.push(c.all_gather(&mine).unwrap());
        }
        for root in [0, world / 2, world - 1] {
            let mut msg = if rank == root {
                vec![root as u8 + 1; 10 + root]
            } else {
                Vec::new()
            };
            c.broadcast(root, &mut msg).unwrap();
            out.broadcast.push(msg);
        }
        out.traffic = c.traffic();
        out
    }

    fn local_outcomes(world: usize) -> Vec<Outcome> {
        let handles: Vec<_> = LocalComm::group(world, Duration::from_secs(10))
            .into_iter()
            .map(|mut c| thread::spawn(move || collectives(&mut c)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn collectives_match_local_comm_bit_for_bit_and_byte_for_byte() {
        for world in 1..=5 {
            let tcp = run_job(world, plain(world, Duration::from_secs(20)), |c| {
                collectives(&mut c.unwrap())
            });
            assert_eq!(tcp, local_outcomes(world), "world {world}");
        }
    }

    #[test]
    fn large_messages_in_both_directions_at_once() {
        const MB: usize = 1 << 20;
        let msg =
            |from: usize, i: usize| -> Vec<u8> { (0..6 * MB + i).map(|j| (j * 7 + from * 13 + i) as u8).collect() };
        let out = run_job(2, plain(2, Duration::from_secs(30)), move |c| {
            let mut c = c.unwrap();
            let (me, other) = (c.rank(), 1 - c.rank());
            // Everything is sent before anything is received: far more than the socket buffers hold.
            for i in 0..3 {
                c.send(other, &msg(me, i)).unwrap();
            }
            for i in 0..3 {
                assert!(
                    c.recv(other).unwrap() == msg(other, i),
                    "message {i} from {other} corrupted"
                );
            }
            c.traffic()
        });
        let bytes = (3 * 6 * MB + 3) as u64;
        for t in out {
            assert_eq!(
                t,
                Traffic {
                    sent: bytes,
                    recv: bytes
                }
            );
        }
    }

    #[test]
    fn a_peer_that_leaves_is_reported_gone_quickly() {
        let out = run_job(3, plain(3, Duration::from_secs(20)), |c| {
            let mut c = c.unwrap();
            let mut buf = data(c.rank(), 100);
            c.all_reduce_sum(&mut buf).unwrap();
            if c.rank() == 2 {
                return Vec::new();
            }
            let start = Instant::now();
            let errs: Vec<String> = (0..2).map(|_| c.recv(2).unwrap_err().to_string()).collect();
            assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
            errs
        });
        for (rank, errs) in out.iter().enumerate().take(2) {
            for e in errs {
                assert_eq!(e, &format!("rank {rank}: rank 2 is gone (connection closed)"));
            }
        }
    }

    #[test]
    fn a_silent_peer_times_out_naming_it() {
        let done = Arc::new(Barrier::new(2));
        let out = run_job(2, plain(2, Duration::from_secs(1)), move |c| {
            let mut c = c.unwrap();
            if c.rank() == 1 {
                done.wait();
                return (String::new(), Duration::ZERO);
            }
            let start = Instant::now();
            let e = c.recv(1).unwrap_err().to_string();
            let waited = start.elapsed();
            done.wait();
            (e, waited)
        });
        assert_eq!(out[0].0, "rank 0: no message from rank 1 within 1s (dist.timeout)");
        assert!(
            out[0].1 >= Duration::from_millis(950) && out[0].1 < Duration::from_secs(3),
            "{:?}",
            out[0].1
        );
    }

    fn all_refuse(threads: usize, setup: impl Fn(usize, u16) -> (LaunchInfo, TcpOptions), want: &str) {
        let start = Instant::now();
        let out = run_job(threads, setup, |c| c.err().map(|e| format!("{e:#}")));
        assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
        for (rank, e) in out.into_iter().enumerate() {
            let e = e.unwrap_or_else(|| panic!("rank {rank} started despite: {want}"));
            assert_eq!(e, format!("rank {rank}: the job cannot start: {want}"));
        }
    }

    #[test]
    fn mismatched_ranks_refuse_to_start_everywhere() {
        let t = Duration::from_secs(20);
        all_refuse(
            3,
            move |i, port| {
                let mut o = opts(t);
                o.fingerprint = if i == 2 { 0xbad } else { 7 };
                (info(i, 3, port), o)
            },
            "rank 2 runs a different config (fingerprint 0000000000000bad) than rank 0 (0000000000000007)",
        );
        all_refuse(
            3,
            move |i, port| {
                let mut o = opts(t);
                o.version = if i == 1 { "0.2.0".into() } else { "0.1.0".into() };
                (info(i, 3, port), o)
            },
            "rank 1 runs version \"0.2.0\", rank 0 runs \"0.1.0\" (version mismatch: start every rank from the same build)",
        );
        all_refuse(
            3,
            move |i, port| (info(i, if i == 2 { 4 } else { 3 }, port), opts(t)),
            "rank 2 was started with world size 4, rank 0 with 3",
        );
        // Rank 0 expects a rank 3 that never comes: it stops waiting for it once it knows, and keeps
        // the store up only min(timeout, 5 s) for rank 3 to learn why.
        let start = Instant::now();
        let t = Duration::from_secs(2);
        let out = run_job(
            3,
            move |i, port| (info(i, if i == 0 { 4 } else { 3 }, port), opts(t)),
            |c| c.err().map(|e| format!("{e:#}")).unwrap(),
        );
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(
            out[0],
            "rank 0: the job cannot start: rank 1 was started with world size 3, rank 0 with 4"
        );
        assert_eq!(
            out[2],
            "rank 2: the job cannot start: rank 2 was started with world size 3, rank 0 with 4"
        );
    }

    #[test]
    fn a_missing_rank_is_named_by_everyone() {
        let out = run_job(2, plain(3, Duration::from_secs(1)), |c| {
            c.err().map(|e| format!("{e:#}")).unwrap()
        });
        let why = "rank 2 did not join within 1s (dist.timeout): was every rank started, with the same \
                   MASTER_ADDR and MASTER_PORT?";
        for (rank, e) in out.iter().enumerate() {
            assert_eq!(e, &format!("rank {rank}: the job cannot start: {why}"));
        }
    }

    #[test]
    fn a_second_process_with_the_same_rank_is_refused() {
        let out = run_job(
            3,
            |i, port| (info(i.min(1), 2, port), opts(Duration::from_secs(20))),
            |c| match c {
                Ok(mut c) => {
                    let mut buf = data(c.rank(), 5);
                    c.all_reduce_sum(&mut buf).unwrap();
                    Ok(buf)
                }
                Err(e) => Err(format!("{e:#}")),
            },
        );
        let refused: Vec<&String> = out.iter().filter_map(|r| r.as_ref().err()).collect();
        assert_eq!(
            refused,
            vec!["rank 1: another process already joined as rank 1 (two processes started with the same rank?)"]
        );
        let sums: Vec<&Vec<f32>> = out.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(sums.len(), 2);
        assert_eq!(sums[0], sums[1]);
    }

    #[test]
    fn setup_errors_are_clear() {
        let o = opts(Duration::from_secs(1));
        let mut i = info(1, 2, 0);
        i.master_port = None;
        let e = TcpComm::connect(&i, &o).err().unwrap().to_string();
        assert!(e.starts_with("rank 1: MASTER_PORT is not set"), "{e}");
        let e = TcpComm::connect(&info(1, 2, 0), &o).err().unwrap().to_string();
        assert!(e.contains("MASTER_PORT = 0"), "{e}");
        let taken = TcpListener::bind((LOOPBACK, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let e = TcpComm::connect(&info(0, 2, port), &o).err().unwrap().to_string();
        assert_eq!(
            e,
            format!("rank 0: cannot host the rendezvous store: port {port} on 127.0.0.1 is in use: another job? choose MASTER_PORT")
        );
        drop(taken);
        // A lone process needs no network, and still refuses to talk to itself.
        let mut c = TcpComm::connect(&info(0, 1, 0), &o).unwrap();
        assert!(c.send(0, &[1]).is_err() && c.recv(1).is_err());
        let mut buf = vec![1.5f32, -2.0];
        c.all_reduce_sum(&mut buf).unwrap();
        assert_eq!(buf, vec![1.5, -2.0]);
    }

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Junk for a store port: wrong token, oversized frame, random bytes, and a silent connection
    /// (returned, to be held open until the job is over).
    fn attack_store(port: u16) -> Vec<TcpStream> {
        let addr = SocketAddr::new(LOOPBACK, port);
        let e = StoreClient::connect("127.0.0.1", port, TOKEN ^ 1, Duration::from_secs(5))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("refused our job token"), "{e}");
        let mut oversized = TcpStream::connect(addr).unwrap();
        oversized.write_all(b"gtopk-rv").unwrap();
        oversized.write_all(&TOKEN.to_le_bytes()).unwrap();
        oversized.write_all(&u32::MAX.to_le_bytes()).unwrap();
        let mut random = TcpStream::connect(addr).unwrap();
        let _ = random.write_all(&noise(10_000, 1));
        vec![oversized, random, TcpStream::connect(addr).unwrap()]
    }

    /// Junk for a data port, written but never read: a wrong token, a valid token with impossible
    /// ranks or world size, random bytes, an oversized "hello", and a silent connection.
    fn junk_for_data_port(a: &PeerAddr, world: usize) -> Vec<TcpStream> {
        let addr: SocketAddr = format!("{}:{}", a.host, a.port).parse().unwrap();
        let junk = [
            hello(TOKEN ^ 1, world - 1, 0, world),
            hello(TOKEN, world + 3, 0, world),
            hello(TOKEN, world - 1, 0, world + 1),
            noise(5000, 9),
            [u64::MAX.to_le_bytes(); 8].concat(),
            Vec::new(),
        ];
        junk.into_iter()
            .map(|bytes| {
                let mut s = TcpStream::connect(addr).unwrap();
                let _ = s.write_all(&bytes);
                s
            })
            .collect()
    }

    #[test]
    fn junk_on_store_and_data_ports_does_not_disturb_the_job() {
        let world = 3;
        let t = Duration::from_secs(20);
        let store = bind_store();
        let port = store.local_addr().port();
        let mut held = attack_store(port);
        let run = |c: Result<TcpComm>| collectives(&mut c.unwrap());
        let r0 = spawn_rank(info(0, world, port), opts(t), Some(store), run);
        let r1 = spawn_rank(info(1, world, port), opts(t), None, run);
        // The junk reaches ranks 0 and 1 before rank 2 exists, so it is queued ahead of it.
        let mut spy = StoreClient::connect("127.0.0.1", port, TOKEN, t).unwrap();
        for q in 0..2 {
            let a: PeerAddr = serde_json::from_slice(&spy.get(&format!("addr/{q}"), t).unwrap()).unwrap();
            held.extend(junk_for_data_port(&a, world));
        }
        held.extend(attack_store(port));
        let r2 = spawn_rank(info(2, world, port), opts(t), None, run);
        let tcp: Vec<Outcome> = [r0, r1, r2].into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(tcp, local_outcomes(world));
        drop((held, spy));
    }

    /// Registers `ranks` in the store as agreeing with rank 0, and returns rank 0's data address
    /// once rank 0 has given the go (its acceptor is then running).
    fn pose_as(port: u16, ranks: &[usize], world: usize) -> (StoreClient, PeerAddr) {
        let t = Duration::from_secs(10);
        let mut store = StoreClient::connect("127.0.0.1", port, TOKEN, t).unwrap();
        let meta = Meta {
            world_size: world,
            fingerprint: 7,
            version: "test".into(),
        };
        for r in ranks {
            assert!(store
                .create(&format!("meta/{r}"), &serde_json::to_vec(&meta).unwrap())
                .unwrap());
        }
        assert_eq!(store.get("verdict", t).unwrap(), b"");
        let a: PeerAddr = serde_json::from_slice(&store.get("addr/0", t).unwrap()).unwrap();
        (store, a)
    }

    fn say_hello(a: &PeerAddr, h: &[u8]) -> (TcpStream, Vec<u8>) {
        let mut s = TcpStream::connect(format!("{}:{}", a.host, a.port)).unwrap();
        s.write_all(h).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut reply = [0u8; 1];
        let got = match s.read(&mut reply) {
            Ok(1) => vec![reply[0]],
            _ => Vec::new(),
        };
        (s, got)
    }

    #[test]
    fn a_data_port_turns_strangers_away_and_still_takes_the_real_rank() {
        let store = bind_store();
        let port = store.local_addr().port();
        let r0 = spawn_rank(info(0, 2, port), opts(Duration::from_secs(10)), Some(store), |c| {
            let mut c = c?;
            let m = c.recv(1)?;
            c.send(1, &m.iter().rev().copied().collect::<Vec<u8>>())?;
            anyhow::Ok(c.traffic())
        });
        let (_store, a) = pose_as(port, &[1], 2);
        assert_eq!(say_hello(&a, &hello(TOKEN ^ 1, 1, 0, 2)).1, Vec::<u8>::new());
        assert_eq!(say_hello(&a, &noise(HELLO_LEN, 3)).1, Vec::<u8>::new());
        assert_eq!(say_hello(&a, &hello(TOKEN, 7, 0, 2)).1, vec![NOT_EXPECTED]);
        assert_eq!(say_hello(&a, &hello(TOKEN, 1, 1, 2)).1, vec![NOT_EXPECTED]);
        assert_eq!(say_hello(&a, &hello(TOKEN, 1, 0, 3)).1, vec![WRONG_WORLD]);
        let stalled = TcpStream::connect(format!("{}:{}", a.host, a.port)).unwrap();
        let t = Duration::from_secs(10);
        let mut s = dial_peer(1, 2, 0, &a, TOKEN, Instant::now() + t, t).unwrap();
        write_frame(&mut s, b"abc").unwrap();
        assert_eq!(read_frame(&mut s), b"cba");
        drop((s, stalled));
        assert_eq!(r0.join().unwrap().unwrap(), Traffic { sent: 3, recv: 3 });
    }

    fn read_frame(s: &mut TcpStream) -> Vec<u8> {
        let mut hdr = [0u8; 8];
        s.read_exact(&mut hdr).unwrap();
        read_body(s, u64::from_le_bytes(hdr)).unwrap()
    }

    #[test]
    fn two_connections_claiming_one_rank_stop_the_job() {
        let store = bind_store();
        let port = store.local_addr().port();
        let r0 = spawn_rank(info(0, 3, port), opts(Duration::from_secs(10)), Some(store), |c| {
            c.err().map(|e| e.to_string())
        });
        let (_store, a) = pose_as(port, &[1, 2], 3);
        let (first, ok) = say_hello(&a, &hello(TOKEN, 1, 0, 3));
        assert_eq!(ok, vec![ACCEPTED]);
        let (second, dup) = say_hello(&a, &hello(TOKEN, 1, 0, 3));
        assert_eq!(dup, vec![DUPLICATE]);
        assert_eq!(
            r0.join().unwrap().unwrap(),
            "rank 0: two processes connected as rank 1 (two processes started as rank 1?)"
        );
        drop((first, second));
    }

    /// Rank 1 played by hand: joins properly, then sends `frame` raw down the data connection and,
    /// if `hang_up`, closes its side.
    fn fake_rank_1(port: u16, frame: Vec<u8>, hang_up: bool) -> JoinHandle<()> {
        thread::spawn(move || {
            let t = Duration::from_secs(10);
            let mut store = StoreClient::connect("127.0.0.1", port, TOKEN, t).unwrap();
            let meta = Meta {
                world_size: 2,
                fingerprint: 7,
                version: "test".into(),
            };
            assert!(store.create("meta/1", &serde_json::to_vec(&meta).unwrap()).unwrap());
            assert_eq!(store.get("verdict", t).unwrap(), b"");
            let a: PeerAddr = serde_json::from_slice(&store.get("addr/0", t).unwrap()).unwrap();
            let mut s = dial_peer(1, 2, 0, &a, TOKEN, Instant::now() + t, t).unwrap();
            s.write_all(&frame).unwrap();
            if hang_up {
                s.shutdown(Shutdown::Write).unwrap();
            }
            // Stay until rank 0 hangs up, as a live peer would.
            let _ = s.read_to_end(&mut Vec::new());
        })
    }

    #[test]
    fn a_peer_sending_garbage_frames_is_named_not_trusted() {
        let cases = [
            (
                (1u64 << 40).to_le_bytes().to_vec(),
                false,
                "rank 0: rank 1 sent a message of 1099511627776 bytes, over the 4294967296-byte limit (max message \
                 bytes): corrupt stream or not a gtopk rank",
            ),
            // A length under the limit, then the peer vanishes mid-message.
            (
                [(3u64 << 30).to_le_bytes().to_vec(), vec![1; 1000]].concat(),
                true,
                "rank 0: rank 1 is gone (connection closed in the middle of a 3221225472-byte message)",
            ),
        ];
        for (frame, hang_up, want) in cases {
            let store = bind_store();
            let port = store.local_addr().port();
            let fake = fake_rank_1(port, frame, hang_up);
            let mut c = TcpComm::connect_hosting(&info(0, 2, port), &opts(Duration::from_secs(10)), store).unwrap();
            let start = Instant::now();
            assert_eq!(c.recv(1).unwrap_err().to_string(), want);
            assert!(start.elapsed() < Duration::from_secs(2));
            // The failure sticks: later calls say the same, and nothing is sent into a broken stream.
            assert_eq!(c.recv(1).unwrap_err().to_string(), want);
            assert_eq!(c.send(1, &[1]).unwrap_err().to_string(), want);
            drop(c);
            fake.join().unwrap();
        }
    }

    #[test]
    fn oversized_sends_are_refused_locally() {
        let out = run_job(
            2,
            |i, port| {
                let mut o = opts(Duration::from_secs(10));
                o.max_message_bytes = 100;
                (info(i, 2, port), o)
            },
            |c| {
                let mut c = c.unwrap();
                let other = 1 - c.rank();
                let e = c.send(other, &[0; 101]).unwrap_err().to_string();
                c.send(other, &[5; 100]).unwrap();
                (e, c.recv(other).unwrap())
            },
        );
        for (rank, (e, got)) in out.into_iter().enumerate() {
            assert_eq!(
                e,
                format!(
                    "rank {rank}: message of 101 bytes to rank {} exceeds the 100-byte limit (max message bytes)",
                    1 - rank
                )
            );
            assert_eq!(got, vec![5; 100]);
        }
    }

    const CHILD_ENV: &str = "GTOPK_TCP_TEST_CHILD";

    /// The real thing: separate processes started by scripts/launch.sh, finding each other through
    /// the environment. The test binary is its own child: with CHILD_ENV set it plays one rank.
    #[test]
    fn processes_started_by_launch_sh_agree_with_local_comm() {
        if std::env::var_os(CHILD_ENV).is_some() {
            let info = LaunchInfo::from_env(&Overrides::default()).unwrap();
            assert_eq!(info.source, "torchrun");
            let mut o = opts(Duration::from_secs(20));
            o.token = rendezvous::job_token(info.master_port.unwrap(), "e2e");
            let mut c = TcpComm::connect(&info, &o).unwrap();
            let got = collectives(&mut c);
            assert_eq!(got, local_outcomes(info.world_size).swap_remove(info.rank));
            println!("rank {} of {} agrees", info.rank, info.world_size);
            return;
        }
        let port = TcpListener::bind((LOOPBACK, 0)).unwrap().local_addr().unwrap().port();
        let exe = std::env::current_exe().unwrap();
        let out = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/launch.sh"))
            .args(["-n", "3", "-p", &port.to_string(), "--"])
            .arg(exe)
            .args([
                "--exact",
                "comm::tcp::tests::processes_started_by_launch_sh_agree_with_local_comm",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for r in 0..3 {
            let line = stdout.lines().find(|l| l.contains(&format!("rank {r} of 3 agrees")));
            assert!(line.is_some_and(|l| l.starts_with(&format!("[rank {r}] "))), "{stdout}");
        }
    }
}
