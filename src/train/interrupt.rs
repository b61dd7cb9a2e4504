//! Ctrl-C and SIGTERM as a request to stop: the workers finish the step they are in, agree on it
//! (one rank's request stops every rank after the same step), write a checkpoint and return. A
//! second signal ends the process at once, as a user pressing Ctrl-C twice expects.

use anyhow::{Context, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// The exit status of a job stopped by a signal (128 + SIGINT, what shells report for Ctrl-C), both
/// after its checkpoint and at once on the second signal.
pub const EXIT_CODE: i32 = 130;

fn flag() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Turns SIGINT and SIGTERM into a stop request for this process (the command line does this; a
/// library caller keeps its own handlers).
pub fn install() -> Result<()> {
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Registered first, so it sees the flag as the previous signal left it: set means this is
        // the second signal.
        signal_hook::flag::register_conditional_shutdown(sig, EXIT_CODE, flag().clone())
            .context("installing the Ctrl-C handler")?;
        signal_hook::flag::register(sig, flag().clone()).context("installing the Ctrl-C handler")?;
    }
    Ok(())
}

/// Asks the job to stop after its current step (a signal, or the parent process of spawned ranks).
pub fn request() {
    flag().store(true, Ordering::SeqCst);
}

pub fn requested() -> bool {
    flag().load(Ordering::SeqCst)
}
