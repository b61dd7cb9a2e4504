//! The scripts that run on the GPU machine, dry-run here: `scripts/gpu-check.sh` (what comes back
//! from that machine is at most 8 files, at most two folders deep, from one command of at most 10
//! minutes) and `scripts/profile.sh` (nsys when present, else ncu, and it says which).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every file under `dir` with its depth in folders below `dir` (0: directly in it).
fn files(dir: &Path, depth: usize, out: &mut Vec<(PathBuf, usize)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, depth + 1, out);
        } else {
            out.push((p, depth));
        }
    }
}

/// Exit code and everything the command printed.
fn outcome(o: &std::process::Output) -> (i32, String) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code().unwrap_or(-1), text)
}

fn tar_list(archive: &Path) -> Vec<String> {
    let out = Command::new("tar").arg("-tzf").arg(archive).output().unwrap();
    assert!(out.status.success(), "{archive:?} is not a readable tar.gz");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// ResNet-20 on 8x8 images, 8 samples a step: the dry run's training takes seconds.
const ONLY: &str = "nvidia-smi info kernels train-resnet20 train-resnet20-host torch-resnet20 \
                    summary-resnet20 summary-resnet20-host bench-select";

fn gpu_check(out: &Path, budget_s: u32, python: &Path) -> (i32, String, Duration) {
    let t = Instant::now();
    let o = Command::new("bash")
        .arg(repo().join("scripts/gpu-check.sh"))
        .arg(out)
        .arg(env!("CARGO_BIN_EXE_gtopk"))
        .env("QUICK", "1")
        .env("DEVICE", "cpu")
        .env("BUDGET_S", budget_s.to_string())
        .env("ONLY", ONLY)
        .env(
            "EXTRA_SETS",
            "data.synthetic_side=8 train.batch_size=8 data.synthetic_train=64 data.synthetic_test=16",
        )
        // No PyTorch here (and none is wanted in the tests): its steps are skipped.
        .env("PYTHON", python)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let (code, text) = outcome(&o);
    (code, text, t.elapsed())
}

/// The machine's limits on what comes back, and what the check promises to put there.
fn check_packaging(out: &Path) -> (String, Vec<String>) {
    let mut all = Vec::new();
    files(out, 0, &mut all);
    assert!(all.len() <= 8, "{} files come back: {all:?}", all.len());
    assert!(all.iter().all(|(_, d)| *d <= 2), "deeper than two folders: {all:?}");
    let names: Vec<String> = all
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    assert!(names.contains(&"summary.md".to_string()), "{names:?}");
    assert!(names.contains(&"results.tar.gz".to_string()), "{names:?}");
    for (p, _) in &all {
        assert!(std::fs::metadata(p).unwrap().len() <= 16 << 20, "{p:?} is over 16 MiB");
    }
    let listed = tar_list(&out.join("results.tar.gz"));
    assert!(
        listed
            .iter()
            .all(|f| !f.contains("checkpoints") && !f.ends_with(".safetensors")),
        "a checkpoint in the results: {listed:?}"
    );
    (std::fs::read_to_string(out.join("summary.md")).unwrap(), listed)
}

#[test]
fn the_gpu_check_dry_run_packs_every_step_into_two_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    let (code, text, _) = gpu_check(&out, 300, Path::new("python3"));
    let (summary, listed) = check_packaging(&out);
    // A binary without `cuda` on the CPU: the GPU-only steps are skipped, the training runs and
    // their summaries are real.
    for step in ["info", "train-resnet20", "train-resnet20-host"] {
        assert!(
            summary.contains(&format!("| {step} | ok |")),
            "{step}:\n{summary}\n{text}"
        );
    }
    // A few steps on 8x8 noise need not lower the loss: the summaries ran, whatever they found.
    for step in ["summary-resnet20", "summary-resnet20-host"] {
        assert!(summary.contains(&format!("| {step} | ")), "{step}:\n{summary}");
    }
    assert!(summary.contains("| train-vgg16 | skipped (not in ONLY) |"), "{summary}");
    for step in ["kernels", "bench-select"] {
        assert!(
            summary.contains(&format!("| {step} | skipped (binary without cuda) |")),
            "{step}:\n{summary}"
        );
    }
    assert!(summary.contains("largest loss difference"), "{summary}");
    for f in [
        "results/logs/train-resnet20.err",
        "results/runs/resnet20/metrics.jsonl",
        "results/runs/resnet20-host/config.toml",
        "results/training.md",
    ] {
        assert!(listed.iter().any(|l| l == f), "{f} not in the tarball: {listed:?}");
    }
    // 0, or 1 when a summary found the loss not going down; never a usage error.
    assert!(code == 0 || code == 1, "exit {code}\n{text}");
}

/// Cut off by its budget, the check still hands back every step that finished, and ends in time.
#[test]
fn a_gpu_check_cut_off_by_its_budget_returns_what_finished() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    // A PyTorch step that never ends (a stand-in python that "has torch" and hangs in
    // torch_step.py) spends the budget whatever the machine's speed: it is cut off at its limit,
    // and the steps after it are not run.
    let fake = dir.path().join("python-hangs");
    std::fs::write(
        &fake,
        "#!/usr/bin/env bash\n\
         [[ $1 == -c && $2 == 'import torch' ]] && exit 0\n\
         [[ $1 == scripts/torch_step.py ]] && exec sleep 120\n\
         exec python3 \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (_, text, took) = gpu_check(&out, 18, &fake);
    let (summary, listed) = check_packaging(&out);
    assert!(
        took < Duration::from_secs(18 + 15),
        "took {took:?} on an 18 s budget\n{text}"
    );
    assert!(summary.contains("| info | ok |"), "{summary}");
    assert!(listed.iter().any(|l| l == "results/logs/info.log"), "{listed:?}");
    assert!(summary.contains("not run (time budget)"), "{summary}\n{text}");
}

/// A fake profiler on PATH records how it was called.
fn fake_tool(bin: &Path, name: &str) {
    let p = bin.join(name);
    std::fs::write(&p, format!("#!/bin/sh\necho \"{name} $*\" >> \"$FAKE_LOG\"\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn profile(tools: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for t in tools {
        fake_tool(&bin, t);
    }
    // Only the bundle exists: the script must unpack it. The fake profilers never start it, so a
    // small executable stands in for the (large, unstripped) test build.
    let bundle = dir.path().join("gtopk");
    std::fs::copy("/bin/true", &bundle).unwrap();
    assert!(Command::new("gzip").arg(&bundle).status().unwrap().success());
    let log = dir.path().join("calls.log");
    let o = Command::new("bash")
        .arg(repo().join("scripts/profile.sh"))
        .arg(dir.path().join("prof/run"))
        .arg(&bundle)
        .args(["--", "info"])
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .env("FAKE_LOG", &log)
        .output()
        .unwrap();
    let (code, said) = outcome(&o);
    (code, said, std::fs::read_to_string(&log).unwrap_or_default())
}

#[test]
fn profile_uses_nsys_when_present_else_ncu_and_says_which() {
    let (code, said, calls) = profile(&["nsys", "ncu"]);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("Nsight Systems (nsys)"), "{said}");
    assert!(calls.starts_with("nsys profile") && !calls.contains("ncu "), "{calls}");
    assert!(calls.contains("--trace=cuda,nvtx,osrt"), "{calls}");

    let (code, said, calls) = profile(&["ncu"]);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("no nsys here, so Nsight Compute (ncu)"), "{said}");
    assert!(calls.contains("--nvtx") && calls.contains("regex:^gtopk_"), "{calls}");
    // The unpacked bundle is what gets profiled, with the arguments after --.
    assert!(
        calls.lines().next().unwrap().trim_end().ends_with("/gtopk info"),
        "{calls}"
    );

    let (code, said, _) = profile(&[]);
    assert_eq!(code, 2);
    assert!(said.contains("neither nsys"), "{said}");
}
