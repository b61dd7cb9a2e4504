//! A reader that goes away (`gtopk train ... | head -2`) must not end a run: Rust's `println!` and
//! `eprintln!` panic on EPIPE, and a log line can come from anywhere in the trainer. So when stdout
//! or stderr is a pipe or socket, this process writes into a pipe of its own instead, and a thread
//! copies that to the real one; once the reader is gone the thread drops what comes (the run goes
//! on and writes its metrics and checkpoints; only the terminal output is lost). Terminals and
//! files are left alone: they do not close under a writer, and the progress bar must still see
//! its terminal.

use std::io::Write;
use std::os::fd::RawFd;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long the exit waits for the last lines to be copied: a child process that still holds the
/// pipe (it inherited it) must not hold up this one's exit.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

pub struct Relay {
    /// The standard descriptors that now point at our pipes.
    redirected: Vec<RawFd>,
    copiers: Vec<JoinHandle<()>>,
}

/// A pipe or socket: what can lose its reader.
fn can_close_under_us(fd: RawFd) -> Option<(u64, u64)> {
    // SAFETY: fstat on a descriptor number with a valid out pointer; a closed one fails.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    let kind = st.st_mode & libc::S_IFMT;
    (kind == libc::S_IFIFO || kind == libc::S_IFSOCK).then_some((st.st_dev as u64, st.st_ino as u64))
}

/// Puts the relay in place for stdout and stderr where they can lose their reader. One relay
/// serves both when they are the same pipe (`2>&1`), so their lines keep their order.
pub fn install() -> Relay {
    let mut relay = Relay {
        redirected: Vec::new(),
        copiers: Vec::new(),
    };
    let out = can_close_under_us(libc::STDOUT_FILENO);
    let err = can_close_under_us(libc::STDERR_FILENO);
    let groups: Vec<Vec<RawFd>> = match (out, err) {
        (Some(a), Some(b)) if a == b => vec![vec![libc::STDOUT_FILENO, libc::STDERR_FILENO]],
        _ => [(out, libc::STDOUT_FILENO), (err, libc::STDERR_FILENO)]
            .into_iter()
            .filter(|(k, _)| k.is_some())
            .map(|(_, fd)| vec![fd])
            .collect(),
    };
    for fds in groups {
        if let Some(copier) = relay_group(&fds) {
            relay.redirected.extend(&fds);
            relay.copiers.push(copier);
        }
    }
    relay
}

/// Points `fds` at a new pipe and starts the thread that copies it to where they pointed. None
/// (nothing changed) if a system call fails: the run then goes on as it would have without.
fn relay_group(fds: &[RawFd]) -> Option<JoinHandle<()>> {
    let mut ends = [0 as RawFd; 2];
    // SAFETY: plain descriptor calls on numbers we own; every failure path closes what it opened.
    unsafe {
        let real = libc::fcntl(fds[0], libc::F_DUPFD_CLOEXEC, 3);
        if real < 0 {
            return None;
        }
        if libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            libc::close(real);
            return None;
        }
        let [read, write] = ends;
        for &fd in fds {
            libc::dup2(write, fd);
        }
        libc::close(write);
        let spawned = std::thread::Builder::new()
            .name("stdio-relay".into())
            .spawn(move || copy_until_closed(read, real));
        match spawned {
            Ok(h) => Some(h),
            Err(_) => {
                // Put the real descriptors back: a pipe nobody drains would block every write.
                for &fd in fds {
                    libc::dup2(real, fd);
                }
                None
            }
        }
    }
}

/// Copies `read` to `real` until every writer has closed `read`; after the first failed write
/// (the reader is gone) it only drains.
fn copy_until_closed(read: RawFd, real: RawFd) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut reader_gone = false;
    loop {
        // SAFETY: reading into a buffer of the length given.
        let n = unsafe { libc::read(read, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if n == 0 {
            break;
        }
        if !reader_gone {
            let mut target = RealFd(real);
            reader_gone = target.write_all(&buf[..n as usize]).is_err();
        }
    }
    // SAFETY: both descriptors are this thread's alone.
    unsafe {
        libc::close(read);
        libc::close(real);
    }
}

struct RealFd(RawFd);

impl Write for RealFd {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        // SAFETY: writing from a buffer of the length given.
        let n = unsafe { libc::write(self.0, b.as_ptr().cast(), b.len()) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Relay {
    /// Before the process exits: flushes what Rust buffered, closes this process's ends and waits
    /// (a bounded time) for the copies, so the last line (a summary, a resume hint) is not lost.
    pub fn finish(mut self) {
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        if self.redirected.is_empty() {
            return;
        }
        // SAFETY: opening /dev/null and pointing our own standard descriptors at it.
        unsafe {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if null >= 0 {
                for &fd in &self.redirected {
                    libc::dup2(null, fd);
                }
                libc::close(null);
            }
        }
        let deadline = Instant::now() + DRAIN_LIMIT;
        for h in self.copiers.drain(..) {
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}
