//! Ctrl-C and SIGTERM as a request to stop: the workers finish the step they are in, agree on it
//! (one rank's request stops every rank after the same step), write a checkpoint and return. A
//! second signal ends the process at once, as a user pressing Ctrl-C twice expects.
//!
//! One Ctrl-C can reach a process twice: `timeout -s INT` signals its child and then its whole
//! process group, and a script may signal both a PID and its group. Two deliveries closer than
//! [`SAME_SIGNAL_WINDOW`] are one request; only a later one means "exit now". Were the duplicate
//! taken for a second Ctrl-C, the parent of spawned ranks would exit without its resume line while
//! its ranks were still writing their checkpoint.

use anyhow::{Context, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// The exit status of a job stopped by a signal (128 + SIGINT, what shells report for Ctrl-C), both
/// after its checkpoint and at once on the second signal.
pub const EXIT_CODE: i32 = 130;

/// Signals closer together than this are one delivered twice; a person's second Ctrl-C comes later.
pub const SAME_SIGNAL_WINDOW: Duration = Duration::from_millis(500);

static REQUESTED: AtomicBool = AtomicBool::new(false);
/// When the first signal arrived (monotonic nanoseconds, never 0); 0: none yet. A stop request
/// that came another way (the parent's pipe) does not start the window: the first real signal
/// still only asks.
static FIRST_SIGNAL_NS: AtomicU64 = AtomicU64::new(0);

/// Monotonic clock in nanoseconds, at least 1; `clock_gettime` is async-signal-safe.
fn now_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out pointer and a clock every Linux and macOS kernel has.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
        .max(1)
}

/// The signal handler's whole decision: Some(code) to exit at once with, None to only ask.
fn on_signal(now: u64) -> Option<i32> {
    REQUESTED.store(true, Ordering::SeqCst);
    match FIRST_SIGNAL_NS.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst) {
        Ok(_) => None,
        Err(first) if now.saturating_sub(first) < SAME_SIGNAL_WINDOW.as_nanos() as u64 => None,
        Err(_) => Some(EXIT_CODE),
    }
}

/// Turns SIGINT and SIGTERM into a stop request for this process (the command line does this; a
/// library caller keeps its own handlers). Installed explicitly, so a process started with SIGINT
/// ignored (a background job of a non-interactive shell) obeys `kill -INT` as well.
pub fn install() -> Result<()> {
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // SAFETY: the action only touches atomics, reads the clock and calls `_exit`, all
        // async-signal-safe.
        unsafe {
            signal_hook::low_level::register(sig, || {
                if let Some(code) = on_signal(now_ns()) {
                    signal_hook::low_level::exit(code);
                }
            })
        }
        .context("installing the Ctrl-C handler")?;
    }
    Ok(())
}

/// Asks the job to stop after its current step (the parent process of spawned ranks does this).
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duplicate_within_the_window_only_asks_and_a_later_signal_exits() {
        // The statics are this process's; this is the only test that signals them.
        let t0 = 1_000_000_000;
        let window = SAME_SIGNAL_WINDOW.as_nanos() as u64;
        assert_eq!(on_signal(t0), None);
        assert!(requested());
        assert_eq!(on_signal(t0 + window / 10), None, "the same Ctrl-C delivered twice");
        assert_eq!(on_signal(t0 + window + 1), Some(EXIT_CODE), "a second Ctrl-C");
    }
}
