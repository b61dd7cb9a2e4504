//! The CUDA kernels' logic on every CI run, without a GPU: `kernels/*.cu` compiled as C++ under the
//! fiber emulator in kernels/emulator/ and compared with brute-force references of the spec
//! (kernels/emulator/README.md). Needs a C++17 compiler (`CXX`, default g++).

use std::path::Path;
use std::process::Command;

#[test]
fn kernels_match_the_spec_under_the_cpu_emulator() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("emu");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let built = Command::new(&cxx)
        .args(["-std=c++17", "-O2", "-ffp-contract=off", "-w"])
        .arg(format!("-I{}", root.join("kernels").display()))
        .arg(format!("-I{}", root.join("kernels/emulator").display()))
        .arg("-o")
        .arg(&exe)
        .arg(root.join("kernels/emulator/driver.cpp"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cxx} ({e}): the kernel emulator needs a C++17 compiler (set CXX)"));
    assert!(
        built.status.success(),
        "{cxx} failed on the emulator:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    // Preempting before a tenth of the atomics shuffles the interleavings further.
    let run = Command::new(&exe)
        .args(["all", "10", "7"])
        .env("QUICK", "1")
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stderr),
        String::from_utf8_lossy(&run.stdout)
    );
    assert!(run.status.success(), "the emulated kernels failed:\n{log}");
    assert!(log.contains("TOTAL: 0 failures"), "{log}");
}
