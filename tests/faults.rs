//! Faults during training, through the real binary: SIGKILL while checkpoints are written, a full
//! disk at a checkpoint, NaN on one worker, a leak of mass caught by the conservation check, a run
//! directory that cannot be written. Faults are injected with `GTOPK_FAULT_INJECT` (src/fault.rs).

mod common;

use common::{finish, records, write_config, Rank};
use gtopk::train::checkpoint;
use std::path::Path;
use std::time::{Duration, Instant};

/// `gtopk train` started in the background, with a fault plan or none.
fn start(cfg: &Path, how: &str, run: &Path, sets: &[&str], fault: Option<&str>) -> Rank {
    let mut cmd = common::train_command(cfg, how, run, sets);
    if let Some(f) = fault {
        cmd.env(gtopk::fault::ENV, f);
    }
    Rank(cmd.spawn().unwrap())
}

/// Runs to the end; (exit code, stderr).
fn run(cfg: &Path, how: &str, run: &Path, sets: &[&str], fault: Option<&str>) -> (i32, String) {
    finish(vec![start(cfg, how, run, sets, fault)], Duration::from_secs(120)).remove(0)
}

fn model_bytes(run: &Path) -> Vec<u8> {
    let last = checkpoint::latest(run).unwrap().unwrap();
    std::fs::read(last.join(checkpoint::MODEL)).unwrap()
}

#[test]
fn killed_at_random_points_while_checkpointing_it_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let sets = [
        "sparse.method=gtopk",
        "sparse.density=0.01",
        "train.checkpoint_every=1",
        "train.log_every=1",
        "train.epochs=3",
    ];
    let whole = dir.path().join("whole");
    let t0 = Instant::now();
    let (code, err) = run(&cfg, "--run-dir", &whole, &sets, None);
    assert_eq!(code, 0, "{err}");
    let span = t0.elapsed().as_millis() as u64;

    // Kill after seeded random delays across the run's length; every step writes a checkpoint, so
    // most kills land in or near one.
    let mut rng = gtopk::rng::Rng::new(9);
    let parts = dir.path().join("parts");
    let mut kills = 0;
    // Six kills; a resumed run has fewer steps left, so under load it may finish before its kill:
    // then start over (more rounds, still bounded) rather than depend on the machine's speed.
    for round in 0..16 {
        if kills == 6 {
            break;
        }
        let resumable = checkpoint::latest(&parts).unwrap().is_some();
        if !resumable && parts.exists() {
            // Killed before the first checkpoint: nothing to resume, start again.
            std::fs::remove_dir_all(&parts).unwrap();
        }
        let how = if resumable { "--resume" } else { "--run-dir" };
        let mut p = start(&cfg, how, &parts, &sets, None);
        let delay = Duration::from_millis(150 + rng.below(span / 3 + 1));
        let until = Instant::now() + delay;
        while Instant::now() < until && p.0.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        if p.0.try_wait().unwrap().is_some() {
            std::fs::remove_dir_all(&parts).unwrap(); // finished before the kill: start over
            continue;
        }
        drop(p); // SIGKILL, reaped
        kills += 1;
        // Whatever the moment, what is published is whole: the newest checkpoint verifies.
        let latest = checkpoint::latest(&parts).unwrap_or_else(|e| panic!("round {round}: {e:#}"));
        if let Some(latest) = &latest {
            checkpoint::verify(latest).unwrap();
        }
        eprintln!("round {round}: killed after {delay:?}; newest checkpoint {latest:?}");
    }
    assert!(kills >= 3, "only {kills} kills landed (the run took {span} ms)");
    let how = if checkpoint::latest(&parts).unwrap().is_some() {
        "--resume"
    } else {
        std::fs::remove_dir_all(&parts).unwrap();
        "--run-dir"
    };
    let (code, err) = run(&cfg, how, &parts, &sets, None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(records(&whole), records(&parts));
    assert!(model_bytes(&whole) == model_bytes(&parts), "final weights differ");
}

#[test]
fn a_full_disk_at_a_checkpoint_names_the_file_and_keeps_the_last_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let sets = ["train.checkpoint_every=2", "train.max_steps=6"];
    let runs = dir.path();
    let (code, err) = run(
        &cfg,
        "--run-dir",
        &runs.join("full"),
        &sets,
        Some("checkpoint-write-fail:4"),
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("step-00000004.tmp/rank-") && err.contains("No space left on device"),
        "{err}"
    );
    let latest = checkpoint::latest(&runs.join("full")).unwrap().unwrap();
    assert!(latest.ends_with("step-00000002"), "{}", latest.display());
    checkpoint::verify(&latest).unwrap();

    // With space again, it resumes from step 2 and ends as a run that never failed.
    let (code, err) = run(&cfg, "--resume", &runs.join("full"), &sets, None);
    assert_eq!(code, 0, "{err}");
    let (code, err) = run(&cfg, "--run-dir", &runs.join("clean"), &sets, None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(records(&runs.join("full")), records(&runs.join("clean")));
}

#[test]
fn nan_on_rank_1_is_named_and_never_applied() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let base = ["dist.workers=3", "train.batch_size=18", "train.max_steps=3"];
    let (code, err) = run(&cfg, "--run-dir", &dir.path().join("e"), &base, Some("nan-grad:1:3"));
    assert_ne!(code, 0);
    assert!(
        err.contains("step 3: non-finite loss or gradient on rank(s) [1]; the update was not applied"),
        "{err}"
    );

    // skip-step: step 3 is logged as skipped and the weights are those after step 2.
    let mut skip = base.to_vec();
    skip.push("train.on_nonfinite=skip-step");
    let (code, err) = run(&cfg, "--run-dir", &dir.path().join("s"), &skip, Some("nan-grad:1:3"));
    assert_eq!(code, 0, "{err}");
    let recs = records(&dir.path().join("s"));
    let skipped: Vec<u64> = recs
        .iter()
        .filter(|r| r["skipped"] == true)
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(skipped, [3]);
    let mut two = skip.clone();
    two.push("train.max_steps=2");
    let (code, err) = run(&cfg, "--run-dir", &dir.path().join("two"), &two, None);
    assert_eq!(code, 0, "{err}");
    // BN running statistics do move in a skipped step's forward pass; the parameters must not.
    let params = |run: &Path| {
        let last = checkpoint::latest(run).unwrap().unwrap();
        let mut v = checkpoint::read_vectors(&last.join(checkpoint::MODEL)).unwrap();
        v.retain(|name, _| !name.contains("running"));
        v
    };
    assert_eq!(params(&dir.path().join("s")), params(&dir.path().join("two")));
}

#[test]
fn finite_gradients_that_overflow_when_summed_are_never_applied() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let sets = ["sparse.method=gtopk", "sparse.density=0.01", "train.max_steps=3"];
    let fault = Some("huge-grad:0:2,huge-grad:1:2");
    let (code, err) = run(&cfg, "--run-dir", &dir.path().join("e"), &sets, fault);
    assert_ne!(code, 0);
    assert!(
        err.contains("step 2: the aggregated update is not finite") && err.contains("not applied"),
        "{err}"
    );
    let mut skip = sets.to_vec();
    skip.push("train.on_nonfinite=skip-step");
    let (code, err) = run(&cfg, "--run-dir", &dir.path().join("s"), &skip, fault);
    assert_eq!(code, 0, "{err}");
    let recs = records(&dir.path().join("s"));
    let skipped: Vec<&serde_json::Value> = recs.iter().filter(|r| r["skipped"] == true).collect();
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0]["step"], 2);
    // The weights stayed finite: the final evaluation's loss is a number.
    let last = recs.iter().rfind(|r| r["kind"] == "epoch").unwrap();
    assert!(last["test_loss"].as_f64().unwrap().is_finite(), "{last}");
}

#[test]
fn the_conservation_check_catches_a_leak_and_names_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let sets = [
        "sparse.method=gtopk",
        "sparse.density=0.01",
        "train.max_steps=4",
        "debug.check_conservation=true",
    ];
    let (code, err) = run(&cfg, "--run-dir", &dir.path().join("a"), &sets, Some("leak-mass:1:3"));
    assert_ne!(code, 0);
    assert!(
        err.contains("step 3: mass not conserved") && err.contains("rank"),
        "{err}"
    );
    // Without the check the same leak goes unnoticed: it is the check that caught it.
    let (code, err) = run(
        &cfg,
        "--run-dir",
        &dir.path().join("b"),
        &sets[..3],
        Some("leak-mass:1:3"),
    );
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_read_only_run_directory_is_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path());
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let mut perm = std::fs::metadata(&ro).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o555);
    std::fs::set_permissions(&ro, perm).unwrap();
    if std::fs::write(ro.join("probe"), b"x").is_ok() {
        // Root ignores permission bits; the bad_input table covers a run directory that cannot be
        // created (below a regular file) instead.
        eprintln!("skipped: this user can write into a 0o555 directory (root?)");
        return;
    }
    let (code, err) = run(&cfg, "--run-dir", &ro.join("run"), &["train.max_steps=1"], None);
    assert_ne!(code, 0);
    assert!(
        err.contains("cannot create run directory") && err.contains("ro/run"),
        "{err}"
    );
    let (code, err) = run(&cfg, "--run-dir", &ro, &["train.max_steps=1"], None);
    assert_ne!(code, 0);
    assert!(err.contains("is not writable"), "{err}");
}
