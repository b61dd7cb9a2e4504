//! Test-only fault injection, so the tests can prove that the trainer's guards fire. Off unless the
//! environment variable `GTOPK_FAULT_INJECT` is set; never set it in a real run. It holds a
//! comma-separated list of faults (steps are 1-based training steps, as in metrics.jsonl):
//!
//! - `checkpoint-write-fail:STEP`: every file write of the checkpoint of step STEP fails as a full
//!   disk would (ENOSPC), on every rank.
//! - `nan-grad:RANK:STEP`: rank RANK's gradient holds a NaN at step STEP.
//! - `huge-grad:RANK:STEP`: rank RANK's gradient holds f32::MAX at step STEP (finite, but two such
//!   ranks sum to infinity).
//! - `leak-mass:RANK:STEP`: rank RANK's residual gains mass at step STEP, after the aggregation (a bug
//!   in a merge or a transport that corrupts a value would look like this to the conservation check).
//! - `stall:RANK:STEP`: rank RANK stops at step STEP, before its gradient reaches the communicator,
//!   and never goes on (a hung GPU or a stuck file system looks like this to its peers).
//!
//! The variable is read once per process; a malformed value is an error at the start of training.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::sync::OnceLock;

pub const ENV: &str = "GTOPK_FAULT_INJECT";

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    CheckpointWriteFail { step: u64 },
    NanGrad { rank: usize, step: u64 },
    HugeGrad { rank: usize, step: u64 },
    LeakMass { rank: usize, step: u64 },
    Stall { rank: usize, step: u64 },
}

pub fn parse(spec: &str) -> Result<Vec<Fault>> {
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let parts: Vec<&str> = item.split(':').collect();
        let num = |i: usize| -> Result<u64> {
            parts
                .get(i)
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("{ENV}: {item:?} needs a number in field {}", i + 1))
        };
        let fault = match (parts[0], parts.len()) {
            ("checkpoint-write-fail", 2) => Fault::CheckpointWriteFail { step: num(1)? },
            ("nan-grad", 3) => Fault::NanGrad {
                rank: num(1)? as usize,
                step: num(2)?,
            },
            ("huge-grad", 3) => Fault::HugeGrad {
                rank: num(1)? as usize,
                step: num(2)?,
            },
            ("leak-mass", 3) => Fault::LeakMass {
                rank: num(1)? as usize,
                step: num(2)?,
            },
            ("stall", 3) => Fault::Stall {
                rank: num(1)? as usize,
                step: num(2)?,
            },
            _ => bail!(
                "{ENV}: {item:?} is not a fault (checkpoint-write-fail:STEP, nan-grad:RANK:STEP, huge-grad:RANK:STEP, leak-mass:RANK:STEP, stall:RANK:STEP)"
            ),
        };
        out.push(fault);
    }
    Ok(out)
}

fn plan() -> &'static Result<Vec<Fault>, String> {
    static PLAN: OnceLock<Result<Vec<Fault>, String>> = OnceLock::new();
    PLAN.get_or_init(|| match std::env::var(ENV) {
        Ok(spec) => parse(&spec).map_err(|e| format!("{e:#}")),
        Err(_) => Ok(Vec::new()),
    })
}

/// Called when training starts: a malformed plan stops the run instead of silently testing nothing.
pub fn check_plan() -> Result<()> {
    match plan() {
        Ok(f) if !f.is_empty() => {
            eprintln!("warning: {ENV} is set: injecting test faults {f:?}");
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) => bail!("{e}"),
    }
}

fn armed(f: Fault) -> bool {
    matches!(plan(), Ok(faults) if faults.contains(&f))
}

/// Fails a checkpoint write as a full disk would, when the plan says so for the checkpoint that
/// `path` belongs to (its directory is `step-NNNNNNNN.tmp`).
pub fn checkpoint_write(path: &Path) -> std::io::Result<()> {
    let step = path
        .parent()
        .and_then(|d| d.file_name())
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("step-"))
        .and_then(|n| n.strip_suffix(".tmp"))
        .and_then(|n| n.parse().ok());
    match step {
        Some(step) if armed(Fault::CheckpointWriteFail { step }) => Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "No space left on device (injected by GTOPK_FAULT_INJECT)",
        )),
        _ => Ok(()),
    }
}

/// Poisons the first gradient entry under `nan-grad` or `huge-grad`.
pub fn bad_grad(rank: usize, step: u64, grad: &mut [f32]) {
    let value = if armed(Fault::NanGrad { rank, step }) {
        f32::NAN
    } else if armed(Fault::HugeGrad { rank, step }) {
        f32::MAX
    } else {
        return;
    };
    if let Some(g) = grad.first_mut() {
        *g = value;
    }
}

/// Never returns under `stall`: the process stays alive and silent, so only its peers' timeouts
/// (or the launcher) can end the job.
pub fn stall(rank: usize, step: u64) {
    if armed(Fault::Stall { rank, step }) {
        eprintln!("warning: rank {rank} stalls at step {step} ({ENV})");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

pub fn leak_mass(rank: usize, step: u64, residual: &mut [f32]) {
    if armed(Fault::LeakMass { rank, step }) {
        // As large as the whole residual, so the relative error is far above any rounding.
        let norm = residual.iter().map(|r| r * r).sum::<f32>().sqrt() + 1.0;
        if let Some(r) = residual.first_mut() {
            *r += norm;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse("checkpoint-write-fail:4, nan-grad:1:3, stall:2:5").unwrap(),
            vec![
                Fault::CheckpointWriteFail { step: 4 },
                Fault::NanGrad { rank: 1, step: 3 },
                Fault::Stall { rank: 2, step: 5 }
            ]
        );
        assert!(parse("").unwrap().is_empty());
        for bad in ["nan-grad:1", "nan-grad:x:3", "explode:1"] {
            let e = format!("{:#}", parse(bad).unwrap_err());
            assert!(e.contains(ENV) && e.contains(bad), "{e}");
        }
    }
}
