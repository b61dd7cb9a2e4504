//! A rank's candle device, our kernels and NCCL must queue on one stream, made in one place
//! (`src/gpu/rank.rs`, `RankGpu::open`). The `cuda` code cannot run here, so this reads the sources:
//! no other file may make a stream or a device, or touch the context's event tracking, and every
//! component that opens a GPU (trainer, NCCL check, gpu-check, bench) opens it through `RankGpu`.
//! The types do the rest: `Gpu::new` and `NcclComm::connect` take a `RankGpu`, and
//! `RankGpu::adopt` refuses a device on the per-thread or null stream.

use std::path::{Path, PathBuf};

const HOME: &str = "src/gpu/rank.rs";

/// Calls that make a stream, a CUDA device with one, or change how streams synchronise.
const ONLY_IN_HOME: &[&str] = &[
    "new_stream(",
    "new_stream_with_priority(",
    "per_thread_stream(",
    "default_stream(",
    "wrap_borrowed_stream(",
    ".fork()",
    "new_cuda(",
    "new_cuda_with_stream(",
    "CudaDevice::new",
    "disable_event_tracking(",
    "enable_event_tracking(",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// (file relative to the crate, line number, code with comments removed) for every source line.
fn code_lines() -> Vec<(String, usize, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for d in ["src", "benches"] {
        if root.join(d).is_dir() {
            rust_files(&root.join(d), &mut files);
        }
    }
    files.sort();
    let mut lines = Vec::new();
    for f in files {
        let rel = f.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
        for (i, l) in std::fs::read_to_string(&f).unwrap().lines().enumerate() {
            let code = l.split("//").next().unwrap_or("").to_string();
            lines.push((rel.clone(), i + 1, code));
        }
    }
    lines
}

#[test]
fn streams_are_made_only_by_rank_gpu() {
    let lines = code_lines();
    assert!(
        lines.iter().any(|(f, _, _)| f == HOME),
        "{HOME} is missing: where is the rank's stream made now?"
    );
    let mut offenders = Vec::new();
    for (f, n, code) in &lines {
        if f == HOME {
            continue;
        }
        for pat in ONLY_IN_HOME {
            if code.contains(pat) {
                offenders.push(format!("{f}:{n}: {pat}"));
            }
        }
        // A context object of its own (the primary context is shared, its stream flags are not):
        // only `gtopk info`, which reads names and makes no stream, may open one directly.
        if code.contains("CudaContext::new(") && f != "src/info.rs" {
            offenders.push(format!("{f}:{n}: CudaContext::new("));
        }
    }
    assert!(
        offenders.is_empty(),
        "streams or devices made outside {HOME} (use gpu::RankGpu::open / adopt):\n{}",
        offenders.join("\n")
    );
}

#[test]
fn every_component_that_opens_a_gpu_goes_through_rank_gpu() {
    let lines = code_lines();
    let uses = |file: &str, pat: &str| lines.iter().any(|(f, _, c)| f == file && c.contains(pat));
    // The trainer, the NCCL check (which must build its devices exactly as the trainer does),
    // `gtopk gpu-check` and `gtopk bench --device cuda` open through the one function.
    for file in [
        "src/train/device.rs",
        "src/comm/nccl.rs",
        "src/gpu/check.rs",
        "src/bench/cuda.rs",
    ] {
        assert!(
            uses(file, "RankGpu::open("),
            "{file} does not open its GPU with RankGpu::open"
        );
    }
    // Those that get the device from a model take it back through the check.
    for file in ["src/train/device_engine/cuda.rs", "src/train/mod.rs"] {
        assert!(
            uses(file, "RankGpu::adopt("),
            "{file} does not take its GPU through RankGpu::adopt"
        );
    }
    // The kernels and NCCL take the rank's GPU, not a bare stream.
    assert!(uses("src/gpu/kernels.rs", "pub fn new(rank: &RankGpu)"));
    assert!(uses("src/comm/nccl.rs", "gpu: &RankGpu"));
}
