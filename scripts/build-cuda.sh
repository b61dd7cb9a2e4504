#!/usr/bin/env bash
# Builds gtopk with the `cuda` feature on any x86-64 Linux machine, GPU or not: the CUDA 13.0
# compiler and stub libraries come from scripts/cuda-env.sh (cached in ~/.cache/gtopk-cuda).
#
#   scripts/build-cuda.sh                    # cargo build --release --features cuda
#   scripts/build-cuda.sh --bundle dist/gpu  # and put the stripped, gzipped binary there (gtopk.gz,
#                                            # about 15 MB: what scripts/gpu-check.sh carries)
#   scripts/build-cuda.sh --check            # cargo clippy --features cuda -D warnings (CI)
#
# CARGO_TARGET_DIR defaults to target/cuda, so CPU and CUDA builds do not evict each other.
set -euo pipefail
cd "$(dirname "$0")/.."

bundle="" check=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bundle) bundle="${2:?--bundle needs a directory}"; shift 2 ;;
        --check) check=1; shift ;;
        *) echo "build-cuda.sh: unknown argument $1 (allowed: --bundle DIR, --check)" >&2; exit 2 ;;
    esac
done

source scripts/cuda-env.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}"
nvcc --version | tail -2

if [[ $check == 1 ]]; then
    cargo clippy --release --features cuda --all-targets -- -D warnings
fi
cargo build --release --features cuda
bin="$CARGO_TARGET_DIR/release/gtopk"
echo "built $bin ($(du -h "$bin" | cut -f1)); it needs the CUDA 13 libraries on LD_LIBRARY_PATH to start"
if [[ -n $bundle ]]; then
    mkdir -p "$bundle"
    strip -o "$bundle/gtopk" "$bin"
    gzip -f -6 "$bundle/gtopk"
    echo "bundled $bundle/gtopk.gz ($(du -h "$bundle/gtopk.gz" | cut -f1))"
fi
