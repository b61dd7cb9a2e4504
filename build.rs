//! CPU builds need nothing from here. With the `cuda` feature, every `kernels/*.cu` is compiled to
//! PTX by nvcc twice, for `compute_$CUDA_COMPUTE_CAP` (default 90: H100/H200) and for compute_75
//! (the oldest architecture CUDA 13 targets; the driver JITs it for any newer GPU), and embedded
//! through `$OUT_DIR/kernels.rs` (src/gpu/kernels.rs).
use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

const COMPAT_CAP: u32 = 75;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    git_commit();
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = compute_cap();
    let nvcc = nvcc();
    println!("cargo:rustc-env=GTOPK_NVCC_VERSION={}", nvcc_version(&nvcc));
    let mut sources: Vec<PathBuf> = fs::read_dir("kernels")
        .expect("kernels/ is part of the crate")
        .map(|e| e.expect("reading kernels/").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();

    let mut table = String::from("/// (module, PTX for the build's compute capability, PTX for compute_75)\n");
    table.push_str(&format!("pub const COMPUTE_CAP: u32 = {cap};\n"));
    table.push_str("pub const MODULES: &[(&str, &str, &str)] = &[\n");
    for src in &sources {
        let name = src.file_stem().unwrap().to_str().expect("kernel file names are ASCII");
        let main = out.join(format!("{name}.ptx"));
        let compat = out.join(format!("{name}.compat.ptx"));
        compile(&nvcc, src, cap, &main);
        compile(&nvcc, src, COMPAT_CAP.min(cap), &compat);
        table.push_str(&format!(
            "    ({name:?}, include_str!({:?}), include_str!({:?})),\n",
            main.display().to_string(),
            compat.display().to_string()
        ));
    }
    table.push_str("];\n");
    fs::write(out.join("kernels.rs"), table).expect("writing $OUT_DIR/kernels.rs");
}

/// `GTOPK_GIT_COMMIT` for `gtopk --version`: the commit HEAD was at when this was built;
/// "unknown" outside a git checkout (a source tarball, a copy) or without git. Never a build
/// failure.
fn git_commit() {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]);
    if commit.is_some() {
        // A commit or checkout moves HEAD's log (a worktree's own): rebuild then, not every time.
        for path in ["HEAD", "logs/HEAD"] {
            if let Some(p) = git(&["rev-parse", "--git-path", path]) {
                println!("cargo:rerun-if-changed={p}");
            }
        }
    }
    println!(
        "cargo:rustc-env=GTOPK_GIT_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
}

fn compute_cap() -> u32 {
    match env::var("CUDA_COMPUTE_CAP") {
        Ok(v) => v
            .replace('.', "")
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("CUDA_COMPUTE_CAP={v:?}: expected a compute capability such as 90 or 8.0")),
        Err(_) => 90,
    }
}

fn nvcc() -> PathBuf {
    let from_home = env::var_os("CUDA_HOME").map(|h| Path::new(&h).join("bin/nvcc"));
    match from_home {
        Some(p) if p.exists() => p,
        _ => PathBuf::from("nvcc"),
    }
}

/// "13.0, V13.0.88" from nvcc's banner, for `gtopk info`.
fn nvcc_version(nvcc: &Path) -> String {
    let out = Command::new(nvcc).arg("--version").output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.split_once("release ").map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "of unknown version".into())
}

fn compile(nvcc: &Path, src: &Path, cap: u32, out: &Path) {
    let result = Command::new(nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(out)
        .arg(src)
        .output();
    match result {
        Ok(o) if o.status.success() => {}
        // nvcc's own messages carry the file and line; show them unchanged.
        Ok(o) => panic!(
            "nvcc failed on {} (compute_{cap}):\n{}{}",
            src.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!(
            "cannot run {} ({e}); install the CUDA toolchain or `source scripts/cuda-env.sh`",
            nvcc.display()
        ),
    }
}
