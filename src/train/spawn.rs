//! One command, many processes: with no launcher around, this process starts the job's ranks
//! itself, as copies of its own binary that see torchrun's variables and so take the ordinary
//! launcher path. It forwards their output line by line with a "[rank R] " prefix, stops the job
//! when a rank fails, and hands back rank 0's summary.
//!
//! Each child holds the read end of a pipe whose only writer is the parent: end-of-file on its
//! stdin means the parent is gone (exited, killed), and the child stops at once. The parent uses
//! the same pipe as its polite "stop" before it resorts to `Child::kill`. A line on the pipe is a
//! stop request instead (`interrupt`): the parent was asked to stop (Ctrl-C, SIGTERM), and every
//! rank finishes its step and writes its part of a checkpoint first. On Linux the kernel backs the
//! pipe up (`PR_SET_PDEATHSIG`): a child whose watcher never ran still dies with its parent.
//!
//! A child starts with SIGINT and SIGTERM ignored until its own handlers are in place: a terminal's
//! Ctrl-C that reaches a rank still starting up would otherwise kill it outright (a failed rank,
//! not a stopped job), while the parent's "stop" line waits in the pipe for the watcher to read.

use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Set in every child's environment; its value is the parent's process id.
pub const CHILD_ENV: &str = "GTOPK_SPAWNED_BY";

/// Marks rank 0's summary line on its stdout, which the parent takes instead of printing.
const SUMMARY_TAG: &str = "gtopk-spawn-summary ";

/// Exit status of a child that stops because its parent is gone or told it to.
const STOPPED: i32 = 143;

/// True in a process this module started.
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// In a child: stop the process when the parent's end of stdin closes. A no-op elsewhere.
pub fn watch_parent() {
    if !is_child() {
        return;
    }
    let parent = std::env::var(CHILD_ENV).unwrap_or_default();
    let spawned = std::thread::Builder::new().name("parent-watch".into()).spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => super::interrupt::request(),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        // Not eprintln!: the parent that read this stderr may be gone, and a panic here would
        // end the watcher instead of the process.
        let _ = writeln!(
            std::io::stderr(),
            "the job's parent process ({parent}) stopped the job or is gone; stopping"
        );
        std::process::exit(STOPPED);
    });
    if let Err(e) = spawned {
        // Without the watcher the child would outlive a killed parent: better not to start.
        eprintln!("cannot watch the parent process: {e}");
        std::process::exit(STOPPED);
    }
}

/// In a child: rank 0's summary, for the parent to print as the job's.
pub fn report_summary(summary: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{SUMMARY_TAG}{summary}");
    let _ = out.flush();
}

pub struct SpawnOptions {
    pub exe: PathBuf,
    /// The arguments that start this same job (without the launcher variables added here).
    pub args: Vec<OsString>,
    pub world: usize,
    /// Rank 0 writes to this process's stderr directly (unprefixed), so its progress bar can draw
    /// on the terminal.
    pub rank0_owns_stderr: bool,
    /// Once a rank has failed, how long the others get to stop on their own before they are killed.
    pub grace: Duration,
}

struct Rank {
    child: Child,
    /// Dropping it is the request to stop (the child sees end-of-file).
    stdin: Option<ChildStdin>,
    status: Option<ExitStatus>,
    /// In which order the ranks were seen to end (the first failure is the likeliest cause).
    ended: usize,
    /// Killed here, after the grace time: its status says nothing about what went wrong.
    killed: bool,
    stdout: Option<JoinHandle<Option<String>>>,
    stderr: Option<JoinHandle<Option<String>>>,
}

/// The started ranks; dropped before they all ended (an error here, a panic), it kills the rest so
/// none outlives the job.
struct Job(Vec<Rank>);

impl Drop for Job {
    fn drop(&mut self) {
        for r in self.0.iter_mut().filter(|r| r.status.is_none()) {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }
}

/// A port nobody listens on now, for rank 0's rendezvous store. Another program could take it
/// before rank 0 binds it; rank 0 then fails with "in use" and the job stops, never hangs.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port for the rendezvous")?;
    Ok(l.local_addr()?.port())
}

/// Keeps other jobs' processes out of this one's connections; fresh for every job.
fn fresh_secret() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut rng = crate::rng::Rng::new(nanos ^ (u64::from(std::process::id()) << 32));
    format!("{:016x}{:016x}", rng.next_u64(), rng.next_u64())
}

/// Starts `world` ranks, waits for all, and returns rank 0's summary (None if it printed none).
/// A failed rank fails the job, named with its last error line.
pub fn run(o: &SpawnOptions) -> Result<Option<serde_json::Value>> {
    let port = free_port()?;
    let secret = fresh_secret();
    let mut job = Job(Vec::with_capacity(o.world));
    for rank in 0..o.world {
        let mut cmd = Command::new(&o.exe);
        cmd.args(&o.args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", o.world.to_string())
            .env("LOCAL_RANK", rank.to_string())
            // As torchrun says it: each rank then takes its share of the cores (threads.rs).
            .env("LOCAL_WORLD_SIZE", o.world.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("GTOPK_JOB_SECRET", &secret)
            .env(CHILD_ENV, std::process::id().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if rank == 0 && o.rank0_owns_stderr {
                Stdio::inherit()
            } else {
                Stdio::piped()
            });
        tie_to_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting rank {rank} ({})", o.exe.display()))?;
        eprintln!("rank {rank}: process {}", child.id());
        let stdout = child.stdout.take().map(|s| forward(rank, s, Sink::Stdout));
        let stderr = child.stderr.take().map(|s| forward(rank, s, Sink::Stderr));
        job.0.push(Rank {
            stdin: child.stdin.take(),
            child,
            status: None,
            ended: 0,
            killed: false,
            stdout,
            stderr,
        });
    }
    wait_all(&mut job, o.grace)?;

    let mut summary = None;
    // (order ended, rank, status, last error line, only a consequence of another failure)
    let mut failures = Vec::new();
    for (rank, r) in job.0.iter_mut().enumerate() {
        let tagged = r.stdout.take().and_then(|h| h.join().ok()).flatten();
        let last_error = r.stderr.take().and_then(|h| h.join().ok()).flatten();
        let status = r.status.expect("every rank was waited for");
        if !status.success() && status.code() != Some(super::interrupt::EXIT_CODE) {
            let secondary = r.killed
                || status.code() == Some(STOPPED)
                || last_error.as_deref().is_some_and(|e| e.contains("is gone"));
            failures.push((r.ended, rank, status, last_error, secondary));
        } else if rank == 0 {
            summary = match tagged {
                Some(line) => Some(serde_json::from_str(&line).context("rank 0's summary")?),
                None => None,
            };
        }
    }
    if failures.is_empty() {
        return Ok(summary);
    }
    // Report the root cause: the first rank that failed on its own, not one that lost a peer or
    // was stopped.
    failures.sort_by_key(|f| f.0);
    let (_, rank, status, error, _) = failures.iter().find(|f| !f.4).unwrap_or(&failures[0]);
    let why = match error {
        Some(e) => e.trim_start_matches("error: ").to_string(),
        None => "no error message from it (see its output above)".to_string(),
    };
    bail!("rank {rank} of {} failed ({status}): {why}", o.world)
}

/// The child side of the contract in this module's notes: dies with this process (Linux) and
/// ignores SIGINT and SIGTERM until `interrupt::install` (a handled signal's disposition is reset by
/// exec; an ignored one is kept).
fn tie_to_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec only async-signal-safe calls (signal, prctl, getppid), no
    // allocation.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
            #[cfg(target_os = "linux")]
            {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died between fork and prctl: the signal will never come.
                if libc::getppid() != parent {
                    libc::_exit(STOPPED);
                }
            }
            #[cfg(not(target_os = "linux"))]
            let _ = parent;
            Ok(())
        });
    }
}

/// Polls until every rank has ended. After the first failure, the others are asked to stop and,
/// after `grace`, killed.
fn wait_all(job: &mut Job, grace: Duration) -> Result<()> {
    let mut failed_at: Option<Instant> = None;
    let mut ended = 0;
    let mut stop_sent = false;
    loop {
        // A stop request reaches this process alone when only it was signalled (kill PID, not
        // Ctrl-C on the terminal's whole process group): pass it on.
        if !stop_sent && super::interrupt::requested() {
            stop_sent = true;
            for r in job.0.iter_mut() {
                if let Some(stdin) = r.stdin.as_mut() {
                    let _ = stdin.write_all(b"stop\n").and_then(|_| stdin.flush());
                }
            }
        }
        for (rank, r) in job.0.iter_mut().enumerate() {
            if r.status.is_some() {
                continue;
            }
            if let Some(s) = r.child.try_wait().with_context(|| format!("waiting for rank {rank}"))? {
                r.status = Some(s);
                r.ended = ended;
                ended += 1;
                let interrupted = s.code() == Some(super::interrupt::EXIT_CODE);
                if !s.success() && !interrupted && failed_at.is_none() {
                    eprintln!("rank {rank} exited with {s}; stopping the other ranks");
                    failed_at = Some(Instant::now());
                }
            }
        }
        if job.0.iter().all(|r| r.status.is_some()) {
            return Ok(());
        }
        if let Some(t) = failed_at {
            for r in &mut job.0 {
                r.stdin = None;
            }
            if t.elapsed() >= grace {
                for r in job.0.iter_mut().filter(|r| r.status.is_none()) {
                    let _ = r.child.kill();
                    r.killed = true;
                    r.ended = ended;
                    r.status = Some(r.child.wait()?);
                }
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Clone, Copy)]
enum Sink {
    Stdout,
    Stderr,
}

/// Copies a child's lines with its rank as prefix until the child closes the stream. Returns, for
/// stdout, rank 0's tagged summary (kept out of the output) and, for stderr, the last line that
/// starts with "error:" (the child's own report of why it failed).
fn forward(rank: usize, stream: impl Read + Send + 'static, sink: Sink) -> JoinHandle<Option<String>> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut kept = None;
        let mut buf = Vec::new();
        loop {
            buf.clear();
            // A read error is the child's stream breaking: nothing more will come.
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return kept,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&buf);
            let line = line.trim_end_matches(['\n', '\r']);
            // Write errors (a closed terminal or pipe) are ignored: keep draining so the child never
            // blocks on a full pipe.
            match sink {
                Sink::Stdout => {
                    if let Some(s) = line.strip_prefix(SUMMARY_TAG) {
                        kept = Some(s.to_string());
                        continue;
                    }
                    let _ = writeln!(std::io::stdout().lock(), "[rank {rank}] {line}");
                }
                Sink::Stderr => {
                    if line.starts_with("error:") {
                        kept = Some(line.to_string());
                    }
                    let _ = writeln!(std::io::stderr().lock(), "[rank {rank}] {line}");
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, world: usize, grace: Duration) -> Result<Option<serde_json::Value>> {
        run(&SpawnOptions {
            exe: "sh".into(),
            args: vec!["-c".into(), script.into()],
            world,
            rank0_owns_stderr: false,
            grace,
        })
    }

    #[test]
    fn every_rank_gets_its_variables_and_rank_0_its_summary() {
        let script = format!(
            "test \"$WORLD_SIZE $LOCAL_WORLD_SIZE $LOCAL_RANK $MASTER_ADDR\" = \"3 3 $RANK 127.0.0.1\" && test -n \"$MASTER_PORT\" \
             && test -n \"$GTOPK_JOB_SECRET\" && test -n \"${CHILD_ENV}\" || exit 9; \
             if [ $RANK = 0 ]; then echo '{SUMMARY_TAG}{{\"steps\": 4}}'; fi"
        );
        let summary = sh(&script, 3, Duration::from_secs(1)).unwrap();
        assert_eq!(summary, Some(serde_json::json!({ "steps": 4 })));
    }

    #[test]
    fn a_failing_rank_stops_the_others_and_is_named() {
        // Rank 1 fails; the others ignore the closed stdin (sleep does not read it), so only the kill
        // after the grace time ends them.
        let script = "if [ $RANK = 1 ]; then echo 'error: rank 1: broken' >&2; exit 3; fi; exec sleep 60";
        let start = Instant::now();
        let e = format!("{:#}", sh(script, 3, Duration::from_millis(500)).unwrap_err());
        assert!(e.contains("rank 1 of 3 failed") && e.contains("rank 1: broken"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
    }

    #[test]
    fn ranks_that_read_stdin_stop_when_asked() {
        // The others wait for end-of-file on stdin, as the trainer's watcher does: no kill needed.
        let script = "if [ $RANK = 2 ]; then exit 4; fi; cat >/dev/null; exit 143";
        let start = Instant::now();
        let e = format!("{:#}", sh(script, 3, Duration::from_secs(30)).unwrap_err());
        assert!(e.contains("rank 2 of 3 failed"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
    }
}
