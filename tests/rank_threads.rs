//! Ranks started by a launcher share their node's cores, and each node's first rank says how
//! many threads each rank takes and why (`train::threads::budget_per_rank`).

mod common;

use common::{finish, train_command, write_config, Rank};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// `gtopk train` on the tiny config with no launcher's variables and no `RAYON_NUM_THREADS`, as a
/// user types it: the process decides its threads itself.
fn bare_command(cfg: &Path, run: &Path, sets: &[&str]) -> Command {
    let mut cmd = train_command(cfg, "--run-dir", run, sets);
    common::without_launcher(&mut cmd).env_remove("RAYON_NUM_THREADS");
    cmd
}

#[test]
fn spawned_ranks_share_the_cores_and_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let run = dir.path().join("run");
    let sets = ["dist.backend=tcp", "train.max_steps=2", "train.eval_every_epochs=0"];
    let ranks = vec![Rank(bare_command(&cfg, &run, &sets).spawn().unwrap())];
    let (code, err) = finish(ranks, Duration::from_secs(120)).remove(0);
    assert_eq!(code, 0, "{err}");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = (cores / 2).max(1);
    let plural = if per == 1 { "" } else { "s" };
    let line = format!(
        "rank 0: {per} compute thread{plural} per rank ({cores} cores shared by 2 ranks on this node, from LOCAL_WORLD_SIZE)"
    );
    assert!(err.contains(&line), "no line {line:?} in:\n{err}");
}

#[test]
fn a_malformed_count_of_ranks_on_the_node_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let run = dir.path().join("run");
    let mut cmd = bare_command(&cfg, &run, &["dist.backend=tcp", "dist.workers=1"]);
    cmd.env("RANK", "0")
        .env("WORLD_SIZE", "1")
        .env("LOCAL_RANK", "0")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", common::free_port().to_string())
        .env("LOCAL_WORLD_SIZE", "two");
    let (code, err) = finish(vec![Rank(cmd.spawn().unwrap())], Duration::from_secs(60)).remove(0);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("LOCAL_WORLD_SIZE = \"two\""), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
