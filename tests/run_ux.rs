//! A run as a user meets it, through the binary: Ctrl-C and resume, run directories, the lines a
//! run starts and ends with, each task's own metric, plots of what exists, eval of a run directory.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn gtopk(args: &[&str], cwd: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gtopk"))
        .args(args)
        .current_dir(cwd)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn train_args<'a>(cfg: &'a str, how: &'a str, run: &'a str, sets: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["train", cfg, "--plain", how, run];
    for s in sets {
        a.extend(["--set", s]);
    }
    a
}

/// metrics.jsonl's lines with the timing fields removed, compared as exact values (floats are
/// read back exactly: equal values print identically).
fn deterministic_lines(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| gtopk::train::metrics::deterministic_part(&serde_json::from_str(l).unwrap()))
        .collect()
}

fn step_logged(run: &Path, at_least: u64) -> bool {
    std::fs::read_to_string(run.join("metrics.jsonl")).is_ok_and(|t| {
        t.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|r| r["kind"] == "step" && r["step"].as_u64().unwrap_or(0) >= at_least)
    })
}

/// Starts `train`, sends SIGINT once step `at` is logged, and returns (exit code, stderr).
fn interrupt_at(cfg: &str, run: &Path, sets: &[&str], at: u64, cwd: &Path) -> (i32, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_gtopk"))
        .args(train_args(cfg, "--run-dir", run.to_str().unwrap(), sets))
        .current_dir(cwd)
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = common::Rank(child);
    let start = Instant::now();
    while !step_logged(run, at) {
        assert!(start.elapsed() < Duration::from_secs(120), "step {at} never logged");
        std::thread::sleep(Duration::from_millis(2));
    }
    let pid = guard.0.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let status = loop {
        if let Some(s) = guard.0.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "still running after SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(guard.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    (status.code().unwrap_or(-1), err)
}

/// A step to interrupt at, different from run to run.
fn random_step(lo: u64, span: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    lo + nanos % span
}

const LONG: &[&str] = &[
    "train.epochs=8",
    "train.log_every=1",
    "sparse.method=gtopk",
    "sparse.density=0.05",
];

/// A scratch folder with the test config and the uninterrupted `LONG` run that an interrupted
/// one is compared with: (folder, config, that run's directory).
fn uninterrupted_run() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = common::write_config(d);
    let whole = d.join("whole");
    let (code, _, err) = gtopk(
        &train_args(cfg.to_str().unwrap(), "--run-dir", whole.to_str().unwrap(), LONG),
        d,
    );
    assert_eq!(code, 0, "{err}");
    (tmp, cfg, whole)
}

#[test]
fn ctrl_c_checkpoints_and_resume_gives_the_uninterrupted_metrics_byte_for_byte() {
    let (tmp, cfg, whole) = uninterrupted_run();
    let d = tmp.path();
    let c = cfg.to_str().unwrap();

    let at = random_step(3, 30);
    let part = d.join("part");
    let (code, err) = interrupt_at(c, &part, LONG, at, d);
    assert_eq!(code, 130, "SIGINT after step {at}: {err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("interrupted at step "))
        .unwrap_or_else(|| panic!("{err}"));
    let step: u64 = line["interrupted at step ".len()..]
        .split(';')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(step >= at, "{line}");
    // The command as it was run (argv[0]), not a `gtopk` that may not be on PATH.
    let want = format!(
        "; resume with: {} train {c} --resume {}",
        env!("CARGO_BIN_EXE_gtopk"),
        part.display()
    );
    assert!(line.contains(&want), "{line}");
    assert!(part.join(format!("checkpoints/step-{step:08}")).is_dir(), "{err}");

    let before = std::fs::read(part.join("metrics.jsonl")).unwrap();
    let mut sets = LONG.to_vec();
    sets.push("train.lr=0.05"); // the same value: no key differs
    let (code, _, err) = gtopk(&train_args(c, "--resume", part.to_str().unwrap(), &sets), d);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("from step {step}")), "{err}");
    assert_eq!(deterministic_lines(&whole), deterministic_lines(&part));
    // What the first part wrote up to its checkpoint is still there byte for byte.
    let after = std::fs::read(part.join("metrics.jsonl")).unwrap();
    let kept = before
        .split_inclusive(|&b| b == b'\n')
        .take_while(|l| {
            let r: Value = serde_json::from_slice(l).unwrap();
            r["kind"] == "step" && r["step"].as_u64().unwrap() <= step
        })
        .flatten()
        .copied()
        .collect::<Vec<u8>>();
    assert!(!kept.is_empty() && after.starts_with(&kept));
}

#[test]
fn ctrl_c_on_spawned_ranks_stops_them_all_at_one_step() {
    let (tmp, cfg, whole) = uninterrupted_run();
    let d = tmp.path();
    let c = cfg.to_str().unwrap();
    let mut sets = LONG.to_vec();
    sets.push("dist.backend=tcp");
    let part = d.join("part");
    // Only the parent is signalled (as `kill PID` does): it passes the request on to its ranks.
    let (code, err) = interrupt_at(c, &part, &sets, random_step(3, 20), d);
    assert_eq!(code, 130, "{err}");
    assert!(err.contains("interrupted at step"), "{err}");
    let (code, _, err) = gtopk(&train_args(c, "--resume", part.to_str().unwrap(), &sets), d);
    assert_eq!(code, 0, "{err}");
    assert_eq!(deterministic_lines(&whole), deterministic_lines(&part));
}

#[test]
fn resume_names_changed_keys_and_restarts_a_run_without_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = common::write_config(d);
    let c = cfg.to_str().unwrap();
    let run = d.join("run");
    let r = run.to_str().unwrap();
    let (code, _, err) = gtopk(&train_args(c, "--run-dir", r, &["train.max_steps=3"]), d);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = gtopk(&train_args(c, "--resume", r, &["train.max_steps=5"]), d);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("from step 3") && err.contains("train.max_steps: 3 -> 5"),
        "{err}"
    );
    // The steps this process ran, not the run's step count.
    assert!(err.contains("done: step 5, 2 steps in"), "{err}");

    let empty = d.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (code, out, err) = gtopk(
        &train_args(c, "--resume", empty.to_str().unwrap(), &["train.max_steps=2"]),
        d,
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("no checkpoint") && err.contains("from step 0"), "{err}");
    assert!(out.contains("\"steps\":2"), "{out}");
}

#[test]
fn two_runs_started_together_get_two_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = common::write_config(d);
    let c = cfg.to_str().unwrap().to_string();
    let start = || {
        Command::new(env!("CARGO_BIN_EXE_gtopk"))
            .args(["train", &c, "--plain", "--set", "train.max_steps=2"])
            .current_dir(d)
            .env("RAYON_NUM_THREADS", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (start(), start());
    let mut dirs = Vec::new();
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        let s: Value = serde_json::from_slice(&out.stdout).unwrap();
        dirs.push(s["run_dir"].as_str().unwrap().to_string());
    }
    assert_ne!(dirs[0], dirs[1]);
    for dir in &dirs {
        assert!(d.join(dir).join("metrics.jsonl").exists(), "{dir}");
    }
}

#[test]
fn a_run_that_cannot_start_creates_nothing_and_says_only_why() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = common::write_config(d);
    let c = cfg.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["data.source=cifar10", "data.dir=no-such-data"], "no-such-data"),
        (&["device=cuda"], "device = \"cuda\""),
        (&["model.init_from=no-such-weights.safetensors"], "no-such-weights"),
    ];
    for (sets, want) in cases {
        let mut args = vec!["train", c, "--plain"];
        for s in *sets {
            args.extend(["--set", s]);
        }
        let (code, _, err) = gtopk(&args, d);
        assert_eq!(code, 1, "{sets:?}: {err}");
        assert!(err.contains(want), "{sets:?}: {err}");
        assert!(!err.contains("training ") && !err.contains("GPU 0"), "{sets:?}: {err}");
        let left: Vec<_> = std::fs::read_dir(d.join("runs"))
            .map(|r| r.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{sets:?} left {left:?}");
    }
    let ghost = d.join("ghost");
    let (code, _, err) = gtopk(&["train", c, "--resume", ghost.to_str().unwrap()], d);
    assert_eq!(code, 1);
    assert!(err.contains("no such run directory"), "{err}");
    assert!(!ghost.exists());
}

#[test]
fn a_run_starts_and_ends_with_lines_a_person_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = common::write_config(d);
    let c = cfg.to_str().unwrap();
    let run = d.join("run");
    let r = run.to_str().unwrap();
    let sets = ["sparse.method=gtopk", "sparse.density=0.01", "train.csv=true"];
    let (code, out, err) = gtopk(&train_args(c, "--run-dir", r, &sets), d);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    serde_json::from_str::<Value>(&out).unwrap();
    for want in [
        "training tiny (resnet20 on synthetic, 2 workers",
        "aggregation: gtopk (binomial tree",
        "compression 100x in values, 50x in bytes: a pair is 8 bytes",
        "50x fewer bytes (a pair is 8 bytes",
        "images/s",
        "done: 12 steps in",
        "test accuracy: final ",
        "sent per worker: ",
        "dense would have sent",
        "last checkpoint: ",
        "step-00000012",
        &format!("plot: gtopk plot {r} --out {r}/curves.svg"),
    ] {
        assert!(err.contains(want), "missing {want:?} in\n{err}");
    }
    assert!(!err.contains("Resnet20") && !err.contains("Gtopk"), "{err}");
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let jsonl = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(csv.starts_with("kind,step,epoch,"), "{csv}");
    assert_eq!(csv.lines().count(), jsonl.lines().count() + 1);

    // The plot of the run with default metrics, and eval of the run directory alone.
    let svg = d.join("f.svg");
    let (code, _, err) = gtopk(&["plot", r, "--out", svg.to_str().unwrap()], d);
    assert_eq!(code, 0, "{err}");
    // The defaults are whichever metrics exist: no note for those that do not.
    assert!(!err.contains("no run has"), "{err}");
    let (code, out, err) = gtopk(&["eval", r], d);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("step-00000012") && err.contains("(step 12)"), "{err}");
    let e: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(e["samples"], 60);
}

#[test]
fn a_dense_run_plots_with_the_default_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = common::write_config(d);
    let run = d.join("dense");
    let r = run.to_str().unwrap();
    let (code, _, err) = gtopk(
        &train_args(cfg.to_str().unwrap(), "--run-dir", r, &["train.max_steps=4"]),
        d,
    );
    assert_eq!(code, 0, "{err}");
    let svg = d.join("dense.svg");
    for extra in [&[][..], &["--log-y", "--clip"][..]] {
        let mut args = vec!["plot", r, "--out", svg.to_str().unwrap()];
        args.extend(extra);
        let (code, _, err) = gtopk(&args, d);
        assert_eq!(code, 0, "{extra:?}: {err}");
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("loss") && text.contains("accuracy"), "{extra:?}");
    }
    // The figure scripts' helper, where rsvg-convert is not installed: the SVG, and a word on the
    // missing PNG. PATH holds only what the sourced script needs besides `gtopk`.
    let bin = d.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let mkdir = ["/bin/mkdir", "/usr/bin/mkdir"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    std::os::unix::fs::symlink(mkdir.unwrap(), bin.join("mkdir")).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/reproduce-common.sh");
    let fig = d.join("fig.svg");
    let out = Command::new("/bin/bash")
        // Sourced without arguments (it parses and shifts the caller's), so the figure's come by name.
        .args(["-c", "source \"$SCRIPT\" && figure \"$FIG\" \"$RUN\""])
        .env_clear()
        .env("SCRIPT", &script)
        .env("FIG", &fig)
        .env("RUN", r)
        .env("PATH", &bin)
        .env("GTOPK", env!("CARGO_BIN_EXE_gtopk"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && fig.exists(), "{err}");
    assert!(
        err.contains("no PNG of") && err.contains("rsvg-convert is not installed"),
        "{err}"
    );
    // A metric named explicitly and missing is still an error.
    let (code, _, err) = gtopk(&["plot", r, "--out", svg.to_str().unwrap(), "--metrics", "delta"], d);
    assert_eq!(code, 1);
    assert!(err.contains("no run has \"delta\""), "{err}");
}

#[test]
fn each_task_logs_its_own_metric() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = common::write_config(d);
    let c = cfg.to_str().unwrap();
    let lm = [
        "model.arch=lstm-ptb",
        "model.hidden=8",
        "model.layers=1",
        "data.source=synthetic-text",
        "data.synthetic_vocab=20",
        "data.synthetic_train=16",
        "data.synthetic_test=4",
        "data.seq_len=4",
        "train.batch_size=4",
        "train.epochs=1",
    ];
    let speech = [
        "model.arch=lstm-an4",
        "model.hidden=8",
        "model.layers=1",
        "model.conv_channels=2",
        "data.source=synthetic-audio",
        "data.synthetic_train=4",
        "data.synthetic_test=2",
        "train.batch_size=4",
        "train.epochs=1",
        "train.log_every=1",
    ];
    for (name, sets, want) in [
        (
            "lm",
            &lm[..],
            &["perplexity", "tokens/s", "ppl ", "test perplexity: final"][..],
        ),
        (
            "speech",
            &speech[..],
            &["WER ", "CER ", "utterances/s", "test WER: final"][..],
        ),
    ] {
        let run = d.join(name);
        let (code, _, err) = gtopk(&train_args(c, "--run-dir", run.to_str().unwrap(), sets), d);
        assert_eq!(code, 0, "{name}: {err}");
        for w in want {
            assert!(err.contains(w), "{name}: missing {w:?} in\n{err}");
        }
        assert!(
            !err.contains("accuracy 0.0000") && !err.contains("samples/s"),
            "{name}: {err}"
        );
    }
}

#[test]
fn an_override_at_fault_is_named_not_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = common::write_config(d);
    let (code, _, err) = gtopk(&["train", cfg.to_str().unwrap(), "--set", "train.lrr=1"], d);
    assert_eq!(code, 1);
    assert!(
        err.contains("--set train.lrr=1") && err.contains("did you mean `lr`?"),
        "{err}"
    );
    assert!(!err.contains("invalid config"), "{err}");
}

#[test]
fn version_names_the_commit_and_completions_cover_the_subcommands() {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (code, out, err) = gtopk(&["--version"], d);
    assert_eq!(code, 0, "{err}");
    // "gtopk 0.1.0 (commit 0123456789ab)", or "unknown" when built outside a git checkout.
    let commit = out
        .trim()
        .strip_prefix(&format!("gtopk {} (commit ", env!("CARGO_PKG_VERSION")))
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        commit == "unknown" || (commit.len() == 12 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "{out}"
    );
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = gtopk(&["completions", shell], d);
        assert_eq!(code, 0, "{shell}: {err}");
        for sub in ["train", "eval", "plot", "simulate"] {
            assert!(out.contains(sub), "{shell}: no {sub}");
        }
    }
    let (code, _, err) = gtopk(&["completions", "tcsh"], d);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("tcsh"), "{err}");
}
