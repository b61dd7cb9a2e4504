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
                    summary-resnet20 summary-resnet20-host train-dense train-dense-host summary-dense \
                    bench-select";

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
    for step in [
        "info",
        "train-resnet20",
        "train-resnet20-host",
        "train-dense",
        "train-dense-host",
    ] {
        assert!(
            summary.contains(&format!("| {step} | ok |")),
            "{step}:\n{summary}\n{text}"
        );
    }
    // A few steps on 8x8 noise need not lower the loss: the summaries ran, whatever they found.
    for step in ["summary-resnet20", "summary-resnet20-host", "summary-dense"] {
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
    // The device-vs-host comparison of another method, and the wait split out of aggregation.
    assert!(summary.contains("against dense-host"), "{summary}");
    // A method pair is judged on its comparison, not on a loss that a few steps need not lower.
    assert!(summary.contains("| summary-dense | ok |"), "{summary}");
    assert!(summary.contains("- wait "), "{summary}");
    assert!(summary.contains("NCCL (dist.backend = nccl) is not run"), "{summary}");
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

/// The steps' shares fit the default budget (8 minutes with the margin for packing), every step
/// the script runs has one, and they run in order of value: kernels, ResNet-20 against PyTorch,
/// VGG-16 against PyTorch, torch.topk, then the rest.
#[test]
fn the_gpu_check_plan_fits_the_budget_in_order_of_value() {
    let o = Command::new("bash")
        .arg(repo().join("scripts/gpu-check.sh"))
        .arg("--plan")
        .output()
        .unwrap();
    let (code, text) = outcome(&o);
    assert_eq!(code, 0, "{text}");
    let mut plan: Vec<(String, u32)> = Vec::new();
    let mut total = None;
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["total", t, "of", budget] => total = Some((t.parse::<u32>().unwrap(), budget.parse::<u32>().unwrap())),
            [name, secs] => plan.push((name.to_string(), secs.parse().unwrap())),
            _ => panic!("unexpected plan line {line:?}"),
        }
    }
    let (said, budget) = total.expect("a total line");
    let sum: u32 = plan.iter().map(|(_, s)| s).sum();
    assert_eq!(said, sum);
    assert!(
        sum <= budget && budget <= 450,
        "{sum} s of shares against a {budget} s budget"
    );
    assert!(plan.iter().all(|(_, s)| *s > 0), "{plan:?}");
    let at = |name: &str| {
        plan.iter()
            .position(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} not in the plan {plan:?}"))
    };
    let order = [
        "info",
        "kernels",
        "train-resnet20",
        "torch-resnet20",
        "train-vgg16",
        "torch-vgg16",
        "torch-topk",
        "train-dense",
        "train-rd-host",
        "bench-select",
    ];
    for w in order.windows(2) {
        assert!(at(w[0]) < at(w[1]), "{} should run before {}: {plan:?}", w[0], w[1]);
    }

    // Every step the script can run, read from its calls, has a share.
    let script = std::fs::read_to_string(repo().join("scripts/gpu-check.sh")).unwrap();
    let mut named = Vec::new();
    for line in script.lines().map(str::trim_start) {
        let words: Vec<&str> = line.split_whitespace().map(|w| w.trim_matches('"')).collect();
        match words.as_slice() {
            ["step" | "gpu_step" | "torch_step", name, ..] => named.push(name.to_string()),
            ["train_once", _, name, ..] => named.push(format!("train-{name}")),
            ["method_pair", name, ..] => named.extend([
                format!("train-{name}"),
                format!("train-{name}-host"),
                format!("summary-{name}"),
            ]),
            ["torch_run", model, ..] => named.push(format!("torch-{model}")),
            ["summarize", name, ..] => named.push(format!("summary-{name}")),
            _ => {}
        }
    }
    named.retain(|n| !n.contains('$'));
    named.extend(["bench-merge".to_string(), "bench-scatter".to_string()]);
    assert!(named.len() > 15, "{named:?}");
    for n in &named {
        at(n);
    }
}

/// The bundle lives in git-ignored dist/: a device machine gets it only when the tool's carry names
/// it. Without it the check says so, records it, and stops with 2.
#[test]
fn a_missing_bundle_fails_with_the_carry_hint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    let o = Command::new("bash")
        .arg(repo().join("scripts/gpu-check.sh"))
        .arg(&out)
        .arg(dir.path().join("dist/gpu/gtopk"))
        .output()
        .unwrap();
    let (code, text) = outcome(&o);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("carry") && text.contains("git-ignored"), "{text}");
    assert!(text.contains("scripts/build-cuda.sh --bundle dist/gpu"), "{text}");
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(summary.contains("| binary | FAILED: no executable"), "{summary}");
}

/// Stand-ins for torch_topk.py on a machine without numpy or PyTorch: the calls it makes, on lists.
const FAKE_NUMPY: &str = r#"import array
def fromfile(path, dtype):
    a = array.array('f')
    a.frombytes(open(path, 'rb').read())
    return list(a)
"#;
const FAKE_TORCH: &str = r#"__version__ = 'stand-in'
class cuda:
    @staticmethod
    def is_available():
        return False
class T:
    def __init__(self, v):
        self.v = v
    def to(self, dev):
        return self
    def numel(self):
        return len(self.v)
    def abs(self):
        return T([abs(x) for x in self.v])
def from_numpy(v):
    return T(v)
def topk(t, k, sorted=True):
    return sorted_(t.v)[-k:]
sorted_ = sorted
"#;

/// torch_topk.py's two rows (|x| precomputed, and the abs pass in each call), batched as
/// gpu-check times ours, beside gpu-check's numbers: run on the CPU against stand-in `torch` and
/// `numpy` modules (neither is installed here). What it measures on a GPU is for the GPU run.
#[test]
fn torch_topk_times_both_ways_in_batches_beside_ours() {
    let dir = tempfile::tempdir().unwrap();
    let fakes = dir.path().join("fakes");
    std::fs::create_dir_all(fakes.join("torch")).unwrap();
    std::fs::write(fakes.join("numpy.py"), FAKE_NUMPY).unwrap();
    std::fs::write(fakes.join("torch/__init__.py"), FAKE_TORCH).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let x: Vec<u8> = (0..3000).flat_map(|i| ((i as f32) - 1500.0).to_le_bytes()).collect();
    std::fs::write(data.join("x_3000.f32"), x).unwrap();
    let kernels = dir.path().join("kernels.json");
    std::fs::write(
        &kernels,
        r#"{"timings": [{"kernel": "select (density 0.001)", "n": 3000, "median_us": 40.0, "graph_us": 12.5}]}"#,
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = Command::new("python3")
        .arg(repo().join("scripts/torch_topk.py"))
        .args(["--reps", "3", "--data"])
        .arg(&data)
        .arg("--gtopk")
        .arg(&kernels)
        .arg("--out")
        .arg(&out)
        .env("PYTHONPATH", &fakes)
        .output()
        .unwrap();
    let (code, text) = outcome(&o);
    assert_eq!(code, 0, "{text}");
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("torch-topk.json")).unwrap()).unwrap();
    let r = &rows[0];
    assert_eq!((r["n"].as_u64(), r["k"].as_u64()), (Some(3000), Some(3)));
    assert_eq!(r["gtopk_select_us"].as_f64(), Some(40.0));
    assert_eq!(r["gtopk_select_graph_us"].as_f64(), Some(12.5));
    for key in ["torch_topk_us", "torch_abs_topk_us"] {
        assert!(r[key].as_f64().unwrap() > 0.0, "{key}: {r}");
    }
    for key in ["torch_topk_batch", "torch_abs_topk_batch"] {
        assert!((1..=1000).contains(&r[key].as_u64().unwrap()), "{key}: {r}");
    }
    let md = std::fs::read_to_string(out.join("torch-topk.md")).unwrap();
    assert!(md.contains("abs + topk") && md.contains("| 3000 | 3 |"), "{md}");
    assert!(md.contains("| 40.0 | 12.5 |"), "{md}");
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
