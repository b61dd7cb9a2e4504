//! The rendezvous store: a small key-value server that rank 0 hosts for the other ranks to find each
//! other (peer addresses, config fingerprints, the NCCL id) before any data moves.
//!
//! Wire format, all integers little-endian. A connection opens with `b"gtopk-rv"` and the u64 job
//! token; the server answers one byte (`1`) or, for a wrong token, closes the connection. Then
//! requests and replies alternate, each a frame `[u32 len][body]`; a request body is `[u8 op]` and
//! its fields (strings as `[u32 len][bytes]`), a reply body is `[u8 status]` and a payload.
//!
//! The server must survive anything a stranger on the network sends: every frame length is bounded,
//! every connection has its own thread whose reads poll with a short timeout (so a stalled client
//! ties up only its own thread, and shutdown never waits on it), and a connection that breaks the
//! protocol is simply closed. Holders of the token are trusted: they are ranks of the same job.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub const MAX_KEY_BYTES: usize = 4096;
pub const MAX_VALUE_BYTES: usize = 1 << 20;
const MAX_FRAME_BYTES: usize = MAX_VALUE_BYTES + MAX_KEY_BYTES + 64;
const MAGIC: &[u8; 8] = b"gtopk-rv";
const HELLO_OK: u8 = 1;
/// Sent to a connection with our magic but another token: a rank of another job, or a
/// misconfigured one, which deserves to be told rather than left guessing.
const HELLO_REFUSED: u8 = 0;
/// A connection that has not proved its token by then is a stranger: drop it.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Once a request has started to arrive, the rest must follow within this.
const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a blocked read wakes to check for shutdown: bounds how long dropping a server takes.
pub(crate) const POLL: Duration = Duration::from_millis(50);
const ACCEPT_POLL: Duration = Duration::from_millis(5);
/// Past this many open connections new ones are closed at once: a connection flood must not
/// exhaust the process's threads.
const MAX_CONNECTIONS: usize = 4096;
/// Beyond a request's own waiting time, how long a client waits for the reply before calling the
/// server lost.
const REPLY_SLACK: Duration = Duration::from_secs(10);
/// Server-side waits are capped so a hostile wait time cannot overflow `Instant`.
const MAX_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);

const OP_SET: u8 = 1;
const OP_CREATE: u8 = 2;
const OP_GET: u8 = 3;
const OP_ADD: u8 = 4;
const OP_WAIT_AT_LEAST: u8 = 5;

const ST_OK: u8 = 0;
const ST_TIMEOUT: u8 = 1;
const ST_EXISTS: u8 = 2;
const ST_ERROR: u8 = 3;

/// The secret every connection must present, the same on all ranks of one job. It deliberately
/// leaves out the config fingerprint: a rank started with another config must still reach the store,
/// so that it can be told which rank differs and how, instead of failing with "wrong token".
pub fn job_token(master_port: u16, secret: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"gtopk-job"
        .iter()
        .chain(&master_port.to_le_bytes())
        .chain(secret.as_bytes())
    {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// Fills `buf` from a socket whose read timeout is [`POLL`]: partial reads accumulate, and every
/// wake-up checks `stop` and `deadline` (None: wait for data indefinitely).
pub(crate) fn read_polling(
    s: &mut TcpStream,
    buf: &mut [u8],
    deadline: Option<Instant>,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut n = 0;
    while n < buf.len() {
        match s.read(&mut buf[n..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => n += k,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if stop.load(Ordering::Relaxed) {
                    return Err(io::Error::new(io::ErrorKind::Interrupted, "shutting down"));
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(io::ErrorKind::TimedOut.into());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `host:port` as people write it (IPv6 in brackets).
pub(crate) fn show_addr(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Resolves `host` (a name, an IPv4 or IPv6 address, bracketed or not).
fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    Ok((bare, port).to_socket_addrs()?.collect())
}

fn write_frame(s: &mut TcpStream, body: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(body);
    s.write_all(&buf)
}

fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
    buf.extend_from_slice(b);
}

/// Reads a request body; `None` for anything malformed.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as usize;
        self.take(n)
    }
    fn key(&mut self) -> Option<String> {
        let k = self.bytes()?;
        if k.len() > MAX_KEY_BYTES {
            return None;
        }
        String::from_utf8(k.to_vec()).ok()
    }
}

struct Shared {
    token: u64,
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<u8>>> {
        // No code panics while holding the lock, but a poisoned map is still a valid map.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks until `found` yields something, `wait` passes (Err(false)) or the server stops
    /// (Err(true)).
    fn wait_for<R>(
        &self,
        wait: Duration,
        mut found: impl FnMut(&HashMap<String, Vec<u8>>) -> Option<R>,
    ) -> std::result::Result<R, bool> {
        let deadline = Instant::now() + wait.min(MAX_WAIT);
        let mut map = self.lock();
        loop {
            if let Some(r) = found(&map) {
                return Ok(r);
            }
            if self.stop.load(Ordering::Relaxed) {
                return Err(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(false);
            }
            map = self
                .changed
                .wait_timeout(map, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The reply body for one request body; `None` closes the connection.
    fn handle(&self, body: &[u8]) -> Option<Vec<u8>> {
        let mut c = Cursor(body);
        let op = c.u8()?;
        let key = c.key()?;
        let reply = |status: u8, payload: &[u8]| {
            let mut r = Vec::with_capacity(1 + payload.len());
            r.push(status);
            r.extend_from_slice(payload);
            r
        };
        let stopped = || reply(ST_ERROR, b"the rendezvous store is shutting down (rank 0 stopped)");
        let counter = |map: &HashMap<String, Vec<u8>>| -> std::result::Result<i64, ()> {
            match map.get(&key) {
                None => Ok(0),
                Some(v) => Ok(i64::from_le_bytes(v.as_slice().try_into().map_err(|_| ())?)),
            }
        };
        let out = match op {
            OP_SET | OP_CREATE => {
                let value = c.bytes()?;
                if value.len() > MAX_VALUE_BYTES {
                    return None;
                }
                let mut map = self.lock();
                if op == OP_CREATE && map.contains_key(&key) {
                    reply(ST_EXISTS, &[])
                } else {
                    map.insert(key.clone(), value.to_vec());
                    self.changed.notify_all();
                    reply(ST_OK, &[])
                }
            }
            OP_GET => {
                let wait = Duration::from_millis(c.u64()?);
                match self.wait_for(wait, |m| m.get(&key).cloned()) {
                    Ok(v) => reply(ST_OK, &v),
                    Err(false) => reply(ST_TIMEOUT, &[]),
                    Err(true) => stopped(),
                }
            }
            OP_ADD => {
                let delta = c.u64()? as i64;
                let mut map = self.lock();
                match counter(&map) {
                    Ok(v) => {
                        let v = v.wrapping_add(delta);
                        map.insert(key.clone(), v.to_le_bytes().to_vec());
                        self.changed.notify_all();
                        reply(ST_OK, &v.to_le_bytes())
                    }
                    Err(()) => reply(ST_ERROR, format!("key {key:?} holds a value, not a counter").as_bytes()),
                }
            }
            OP_WAIT_AT_LEAST => {
                let target = c.u64()? as i64;
                let wait = Duration::from_millis(c.u64()?);
                let mut last = 0;
                let got = self.wait_for(wait, |m| {
                    last = counter(m).unwrap_or(i64::MIN);
                    (last >= target).then_some(last)
                });
                match got {
                    Ok(v) => reply(ST_OK, &v.to_le_bytes()),
                    Err(false) => reply(ST_TIMEOUT, &last.to_le_bytes()),
                    Err(true) => stopped(),
                }
            }
            _ => return None,
        };
        Some(out)
    }
}

/// The store, serving on its own threads until dropped.
pub struct StoreServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl StoreServer {
    /// Listens on `addr` (port 0: any free port, see [`StoreServer::local_addr`]).
    pub fn bind(addr: SocketAddr, token: u64) -> Result<StoreServer> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                anyhow!(
                    "port {} on {} is in use: another job? choose MASTER_PORT",
                    addr.port(),
                    addr.ip()
                )
            } else {
                anyhow!("rendezvous store: cannot listen on {addr}: {e}")
            }
        })?;
        let local = listener.local_addr()?;
        // Non-blocking accept lets the accept loop notice shutdown without a wake-up connection.
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            token,
            map: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let accept = thread::Builder::new()
            .name("gtopk-store".into())
            .spawn(move || accept_loop(listener, s))
            .context("rendezvous store: cannot start its thread")?;
        Ok(StoreServer {
            addr: local,
            shared,
            accept: Some(accept),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where a client on this host reaches the server: loopback when it listens on all interfaces.
    pub fn dial_addr(&self) -> SocketAddr {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        SocketAddr::new(ip, self.addr.port())
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Notify under the lock so a waiter between its stop check and its wait cannot miss it.
        drop(self.shared.lock());
        self.shared.changed.notify_all();
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !shared.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                conns.retain(|h| !h.is_finished());
                if conns.len() >= MAX_CONNECTIONS {
                    continue;
                }
                let s = shared.clone();
                // Out of threads: the connection closes and that client sees an error.
                if let Ok(h) = thread::Builder::new()
                    .name("gtopk-store-conn".into())
                    .spawn(move || serve(stream, &s))
                {
                    conns.push(h);
                }
            }
            // WouldBlock is the idle case; anything else (EMFILE, an aborted handshake) is
            // transient for a listener, so keep serving.
            Err(_) => thread::sleep(ACCEPT_POLL),
        }
    }
    for h in conns {
        let _ = h.join();
    }
}

fn serve(mut s: TcpStream, sh: &Shared) {
    let setup = s
        .set_nonblocking(false)
        .and_then(|_| s.set_read_timeout(Some(POLL)))
        .and_then(|_| s.set_write_timeout(Some(FRAME_TIMEOUT)))
        .and_then(|_| s.set_nodelay(true));
    if setup.is_err() {
        return;
    }
    let mut hello = [0u8; 16];
    let hello_by = Some(Instant::now() + HANDSHAKE_TIMEOUT);
    if read_polling(&mut s, &mut hello, hello_by, &sh.stop).is_err() || &hello[..8] != MAGIC {
        return;
    }
    if u64::from_le_bytes(hello[8..].try_into().expect("8 bytes")) != sh.token {
        let _ = s.write_all(&[HELLO_REFUSED]);
        return;
    }
    if s.write_all(&[HELLO_OK]).is_err() {
        return;
    }
    loop {
        let mut len = [0u8; 4];
        // Idle between requests is fine for as long as the client likes.
        if read_polling(&mut s, &mut len, None, &sh.stop).is_err() {
            return;
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME_BYTES {
            return;
        }
        let mut body = vec![0u8; len];
        if read_polling(&mut s, &mut body, Some(Instant::now() + FRAME_TIMEOUT), &sh.stop).is_err() {
            return;
        }
        match sh.handle(&body) {
            Some(reply) if write_frame(&mut s, &reply).is_ok() => {}
            _ => return,
        }
    }
}

/// One connection to the store. Calls are synchronous: one request in flight at a time.
pub struct StoreClient {
    stream: TcpStream,
    addr: String,
}

impl StoreClient {
    /// Retries until `timeout` while nothing listens (rank 0 may start after the others); a server
    /// that refuses the token is an immediate error, since retrying cannot fix it.
    pub fn connect(host: &str, port: u16, token: u64, timeout: Duration) -> Result<StoreClient> {
        let addr = show_addr(host, port);
        let deadline = Instant::now() + timeout;
        let mut backoff = Duration::from_millis(20);
        loop {
            let why = match dial(host, port, deadline) {
                Ok(stream) => return Self::greet(stream, addr, token, deadline),
                Err(e) => e,
            };
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "could not reach the rendezvous store at {addr} within {timeout:?} ({why}): is rank 0 \
                     running, and do MASTER_ADDR/MASTER_PORT name it?"
                );
            }
            thread::sleep(backoff.min(deadline - now));
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    fn greet(mut stream: TcpStream, addr: String, token: u64, deadline: Instant) -> Result<StoreClient> {
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&token.to_le_bytes());
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(wait))?;
        stream
            .write_all(&hello)
            .with_context(|| format!("rendezvous store at {addr}: sending the job token"))?;
        let mut ack = [0u8; 1];
        match stream.read_exact(&mut ack) {
            Ok(()) if ack[0] == HELLO_OK => Ok(StoreClient { stream, addr }),
            Ok(()) if ack[0] == HELLO_REFUSED => bail!(
                "the rendezvous store at {addr} refused our job token: it belongs to another job (same \
                 MASTER_PORT?), or the ranks were started with different job secrets"
            ),
            Ok(()) => bail!("{addr} is not a gtopk rendezvous store (bad greeting)"),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                bail!("the rendezvous store at {addr} did not answer the job token within {wait:?}")
            }
            Err(_) => bail!(
                "the rendezvous store at {addr} closed the connection before answering: rank 0 stopped, or \
                 something other than a gtopk store listens there"
            ),
        }
    }

    /// The local address of this connection: the interface this host uses to reach rank 0.
    pub fn local_ip(&self) -> Result<IpAddr> {
        Ok(self.stream.local_addr()?.ip())
    }

    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        let r = self.request(OP_SET, key, value, &[], Duration::ZERO)?;
        self.expect_ok(r, key).map(drop)
    }

    /// Sets `key` only if it is absent; false when another client got there first.
    pub fn create(&mut self, key: &str, value: &[u8]) -> Result<bool> {
        let (status, payload) = self.request(OP_CREATE, key, value, &[], Duration::ZERO)?;
        if status == ST_EXISTS {
            return Ok(false);
        }
        self.expect_ok((status, payload), key).map(|_| true)
    }

    /// The value of `key`, waiting up to `timeout` for someone to set it.
    pub fn get(&mut self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        self.try_get(key, timeout)?.ok_or_else(|| {
            anyhow!(
                "rendezvous: key {key:?} did not appear within {timeout:?} (store at {})",
                self.addr
            )
        })
    }

    /// Like [`StoreClient::get`], with `None` when the key did not appear in time.
    pub fn try_get(&mut self, key: &str, timeout: Duration) -> Result<Option<Vec<u8>>> {
        let r = self.request(OP_GET, key, &[], &millis(timeout).to_le_bytes(), timeout)?;
        if r.0 == ST_TIMEOUT {
            return Ok(None);
        }
        self.expect_ok(r, key).map(Some)
    }

    /// Adds `delta` to the counter `key` (absent counts as 0) and returns the new value.
    pub fn add(&mut self, key: &str, delta: i64) -> Result<i64> {
        let r = self.request(OP_ADD, key, &[], &delta.to_le_bytes(), Duration::ZERO)?;
        let v = self.expect_ok(r, key)?;
        decode_i64(&v, key)
    }

    /// Waits until the counter `key` reaches `target`; the error says how far it got.
    pub fn wait_at_least(&mut self, key: &str, target: i64, timeout: Duration) -> Result<i64> {
        let mut tail = target.to_le_bytes().to_vec();
        tail.extend_from_slice(&millis(timeout).to_le_bytes());
        let (status, payload) = self.request(OP_WAIT_AT_LEAST, key, &[], &tail, timeout)?;
        if status == ST_TIMEOUT {
            bail!(
                "rendezvous: counter {key:?} reached {} of {target} within {timeout:?} (store at {})",
                decode_i64(&payload, key)?,
                self.addr
            );
        }
        let v = self.expect_ok((status, payload), key)?;
        decode_i64(&v, key)
    }

    /// Returns once `world` clients have entered barrier `name`. Reusable: the n-th use of a name
    /// waits for the n-th group of `world` arrivals.
    pub fn barrier(&mut self, name: &str, world: usize, timeout: Duration) -> Result<()> {
        let key = format!("barrier/{name}");
        let world = world.max(1) as i64;
        let arrived = self.add(&key, 1)?;
        let target = ((arrived - 1) / world + 1) * world;
        self.wait_at_least(&key, target, timeout)
            .with_context(|| format!("barrier {name:?}: not all {world} ranks arrived"))
            .map(drop)
    }

    fn request(&mut self, op: u8, key: &str, value: &[u8], tail: &[u8], wait: Duration) -> Result<(u8, Vec<u8>)> {
        if key.len() > MAX_KEY_BYTES {
            bail!(
                "rendezvous key of {} bytes exceeds the {MAX_KEY_BYTES}-byte limit",
                key.len()
            );
        }
        if value.len() > MAX_VALUE_BYTES {
            bail!(
                "rendezvous key {key:?}: value of {} bytes exceeds the {MAX_VALUE_BYTES}-byte limit",
                value.len()
            );
        }
        let mut body = vec![op];
        put_bytes(&mut body, key.as_bytes());
        if op == OP_SET || op == OP_CREATE {
            put_bytes(&mut body, value);
        }
        body.extend_from_slice(tail);
        let addr = self.addr.clone();
        let lost = move |e: io::Error| {
            anyhow!("lost the connection to the rendezvous store at {addr} ({e}): did rank 0 stop?")
        };
        write_frame(&mut self.stream, &body).map_err(&lost)?;
        self.stream
            .set_read_timeout(Some(wait.min(MAX_WAIT) + REPLY_SLACK))
            .map_err(&lost)?;
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).map_err(&lost)?;
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 || len > MAX_FRAME_BYTES {
            bail!("rendezvous store at {}: reply of {len} bytes is malformed", self.addr);
        }
        let mut reply = vec![0u8; len];
        self.stream.read_exact(&mut reply).map_err(&lost)?;
        let status = reply.remove(0);
        Ok((status, reply))
    }

    fn expect_ok(&self, (status, payload): (u8, Vec<u8>), key: &str) -> Result<Vec<u8>> {
        match status {
            ST_OK => Ok(payload),
            ST_ERROR => bail!(
                "rendezvous store at {}, key {key:?}: {}",
                self.addr,
                String::from_utf8_lossy(&payload)
            ),
            s => bail!(
                "rendezvous store at {}, key {key:?}: unexpected reply status {s}",
                self.addr
            ),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.min(MAX_WAIT).as_millis()).unwrap_or(u64::MAX)
}

fn decode_i64(b: &[u8], key: &str) -> Result<i64> {
    let b: [u8; 8] = b
        .try_into()
        .map_err(|_| anyhow!("rendezvous: counter {key:?} came back as {} bytes", b.len()))?;
    Ok(i64::from_le_bytes(b))
}

/// One connection attempt to any address `host` resolves to.
pub(crate) fn dial(host: &str, port: u16, deadline: Instant) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} resolves to no address"));
    for a in resolve(host, port)? {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = left.clamp(Duration::from_millis(100), Duration::from_secs(5));
        match TcpStream::connect_timeout(&a, attempt) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: u64 = 0x5eed;

    fn server() -> StoreServer {
        StoreServer::bind("127.0.0.1:0".parse().unwrap(), TOKEN).unwrap()
    }

    fn client(s: &StoreServer) -> StoreClient {
        StoreClient::connect("127.0.0.1", s.local_addr().port(), TOKEN, Duration::from_secs(5)).unwrap()
    }

    /// A port nothing listens on right now (the kernel handed it out and we let it go).
    fn unused_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn set_get_create_add_and_barrier() {
        let s = server();
        let mut c = client(&s);
        c.set("a", b"one").unwrap();
        assert_eq!(c.get("a", Duration::ZERO).unwrap(), b"one");
        c.set("a", b"").unwrap();
        assert_eq!(c.get("a", Duration::ZERO).unwrap(), b"");
        assert!(c.create("b", b"first").unwrap());
        assert!(!c.create("b", b"second").unwrap());
        assert_eq!(c.get("b", Duration::ZERO).unwrap(), b"first");
        assert_eq!(c.add("n", 2).unwrap(), 2);
        assert_eq!(c.add("n", -5).unwrap(), -3);
        let e = c.add("a", 1).unwrap_err().to_string();
        assert!(e.contains("not a counter"), "{e}");
        assert_eq!(c.try_get("missing", Duration::ZERO).unwrap(), None);
        let big = vec![7u8; MAX_VALUE_BYTES];
        c.set("big", &big).unwrap();
        assert_eq!(c.get("big", Duration::ZERO).unwrap(), big);
        let e = c.set("big", &vec![0u8; MAX_VALUE_BYTES + 1]).unwrap_err().to_string();
        assert!(e.contains("exceeds"), "{e}");

        // Three clients through the same barrier twice: nobody leaves a round early.
        let port = s.local_addr().port();
        let handles: Vec<_> = (0..3)
            .map(|i| {
                thread::spawn(move || {
                    let mut c = StoreClient::connect("127.0.0.1", port, TOKEN, Duration::from_secs(5)).unwrap();
                    for round in 0..2 {
                        c.add(&format!("in/{round}"), 1).unwrap();
                        thread::sleep(Duration::from_millis(20 * i));
                        c.barrier("b", 3, Duration::from_secs(5)).unwrap();
                        assert_eq!(
                            c.get(&format!("in/{round}"), Duration::ZERO).unwrap(),
                            3i64.to_le_bytes()
                        );
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn get_waits_for_a_later_set() {
        let s = server();
        let mut waiter = client(&s);
        let mut setter = client(&s);
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            setter.set("late", b"here").unwrap();
        });
        let start = Instant::now();
        assert_eq!(waiter.get("late", Duration::from_secs(5)).unwrap(), b"here");
        assert!(start.elapsed() >= Duration::from_millis(150));
        t.join().unwrap();
    }

    #[test]
    fn get_timeout_names_the_key_and_the_wait() {
        let s = server();
        let mut c = client(&s);
        let start = Instant::now();
        let e = c.get("addr/3", Duration::from_millis(150)).unwrap_err().to_string();
        assert!(start.elapsed() >= Duration::from_millis(150));
        assert!(e.contains("\"addr/3\"") && e.contains("150ms"), "{e}");
        let e = c.barrier("lonely", 2, Duration::from_millis(50)).unwrap_err();
        assert!(format!("{e:#}").contains("reached 1 of 2"), "{e:#}");
    }

    #[test]
    fn a_port_in_use_is_a_clear_error() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let e = StoreServer::bind(SocketAddr::from(([127, 0, 0, 1], port)), TOKEN)
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            e,
            format!("port {port} on 127.0.0.1 is in use: another job? choose MASTER_PORT")
        );
    }

    #[test]
    fn clients_retry_until_the_server_starts_and_time_out_naming_it() {
        let port = unused_port();
        let e = StoreClient::connect("127.0.0.1", port, TOKEN, Duration::from_millis(200))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&format!("127.0.0.1:{port}")) && e.contains("MASTER_ADDR"),
            "{e}"
        );

        let late = thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            let s = StoreServer::bind(SocketAddr::from(([127, 0, 0, 1], port)), TOKEN).unwrap();
            let mut c = client(&s);
            c.get("done", Duration::from_secs(5)).unwrap();
        });
        let mut c = StoreClient::connect("127.0.0.1", port, TOKEN, Duration::from_secs(5)).unwrap();
        c.set("done", b"").unwrap();
        late.join().unwrap();
    }

    #[test]
    fn wrong_tokens_and_garbage_leave_the_server_serving() {
        let s = server();
        let addr = s.local_addr();
        let e = StoreClient::connect("127.0.0.1", addr.port(), TOKEN + 1, Duration::from_secs(2))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("refused our job token"), "{e}");

        let greeted = || {
            let mut g = TcpStream::connect(addr).unwrap();
            g.write_all(MAGIC).unwrap();
            g.write_all(&TOKEN.to_le_bytes()).unwrap();
            g
        };
        // Each kind of abuse must end in the server closing that connection, never a reply.
        let closed = |mut g: TcpStream| {
            g.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut rest = Vec::new();
            let _ = g.read_to_end(&mut rest);
            assert!(rest.len() <= 1, "server answered garbage: {rest:?}");
        };
        let mut oversized = greeted();
        oversized.write_all(&u32::MAX.to_le_bytes()).unwrap();
        closed(oversized);
        let mut bad_op = greeted();
        bad_op.write_all(&[3, 0, 0, 0, 99, 0, 0]).unwrap();
        closed(bad_op);
        let mut key_overrun = greeted();
        key_overrun
            .write_all(&[7, 0, 0, 0, OP_SET, 255, 255, 255, 255, 0, 0])
            .unwrap();
        closed(key_overrun);
        let mut random = TcpStream::connect(addr).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let _ = random.write_all(&noise);
        closed(random);
        // Stalled mid-greeting and mid-request: they hold only their own threads.
        let mut stalled_hello = TcpStream::connect(addr).unwrap();
        stalled_hello.write_all(&MAGIC[..3]).unwrap();
        let mut stalled_frame = greeted();
        stalled_frame.write_all(&[100, 0, 0, 0, OP_SET]).unwrap();
        let silent = TcpStream::connect(addr).unwrap();

        let mut c = client(&s);
        c.set("still", b"works").unwrap();
        assert_eq!(c.get("still", Duration::ZERO).unwrap(), b"works");
        // Shutting down does not wait out the stalled clients' timeouts.
        let start = Instant::now();
        drop(s);
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
        drop((stalled_hello, stalled_frame, silent));
    }

    #[test]
    fn a_waiting_client_learns_promptly_that_the_server_stopped() {
        let s = server();
        let mut c = client(&s);
        let t = thread::spawn(move || c.get("never", Duration::from_secs(30)));
        thread::sleep(Duration::from_millis(100));
        let start = Instant::now();
        drop(s);
        let e = t.join().unwrap().unwrap_err().to_string();
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(e.contains("shutting down"), "{e}");
    }

    #[test]
    fn job_tokens_differ_by_port_and_secret() {
        assert_eq!(job_token(29500, ""), job_token(29500, ""));
        assert_ne!(job_token(29500, ""), job_token(29501, ""));
        assert_ne!(job_token(29500, ""), job_token(29500, "s"));
    }
}
