#!/usr/bin/env bash
# Profiles a gtopk command with what the machine has, and says which:
#   - Nsight Systems (nsys) when on PATH: the whole timeline, CUDA kernels, NVTX ranges (fwd, bwd,
#     aggregate, sparse.select, comm.*, opt.step) and OS runtime calls; prints the NVTX and kernel
#     summaries. OUTPUT gets .nsys-rep (open it in nsys-ui) and .sqlite.
#   - else Nsight Compute (ncu): our kernels only (gtopk_*), each launch measured alone with the
#     NVTX range it ran in; prints the per-kernel summary. OUTPUT gets .ncu-rep (open it in
#     ncu-ui). NCU_LAUNCHES (default 60) caps the launches measured, NCU_SKIP (default 30) skips
#     the first ones (start-up), NCU_SET (default basic) is ncu's --set.
#
#   scripts/profile.sh OUTPUT [GTOPK_BINARY] -- ARGS...
#   scripts/profile.sh prof/resnet20 -- train configs/resnet20.toml --set 'device="cuda"' --set train.max_steps=50
#
# The binary defaults to target/cuda/release/gtopk, then dist/gpu/gtopk, then the bundle
# dist/gpu/gtopk.gz (scripts/build-cuda.sh --bundle dist/gpu), unpacked into a scratch folder.
# PROFILER=nsys or PROFILER=ncu picks one.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-}"
if [[ -z $out || $out == -- ]]; then
    echo "usage: scripts/profile.sh OUTPUT [GTOPK_BINARY] -- ARGS..." >&2
    exit 2
fi
shift
bin=""
if [[ ${1:-} != -- ]]; then
    bin="${1:-}"
    shift || true
fi
if [[ ${1:-} != -- ]]; then
    echo "profile.sh: expected -- before the gtopk arguments" >&2
    exit 2
fi
shift

source scripts/gpu-run-env.sh
scratch="$(mktemp -d "${TMPDIR:-/tmp}/gtopk-profile.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
candidates=(target/cuda/release/gtopk dist/gpu/gtopk)
[[ -n $bin ]] && candidates=("$bin")
if ! bin="$(GTOPK_UNPACK_DIR="$scratch" gtopk_find_binary "${candidates[@]}")"; then
    echo "profile.sh: no gtopk binary at ${candidates[*]} (nor .gz); build one with scripts/build-cuda.sh --bundle dist/gpu" >&2
    exit 2
fi
gtopk_cuda_libs || true

profiler="${PROFILER:-}"
if [[ -z $profiler ]]; then
    if command -v nsys >/dev/null; then
        profiler=nsys
    elif command -v ncu >/dev/null; then
        profiler=ncu
    else
        echo "profile.sh: neither nsys (Nsight Systems) nor ncu (Nsight Compute) is on PATH" >&2
        exit 2
    fi
fi
command -v "$profiler" >/dev/null || { echo "profile.sh: PROFILER=$profiler is not on PATH" >&2; exit 2; }
mkdir -p "$(dirname "$out")"

case $profiler in
    nsys)
        echo "profile.sh: Nsight Systems (nsys): timeline of $bin $*"
        # Sampling off and no memory tracing: both add overhead that distorts short steps.
        nsys profile --trace=cuda,nvtx,osrt --sample=none --cpuctxsw=none --cuda-memory-usage=false \
            --force-overwrite=true --export=sqlite -o "$out" "$bin" "$@"
        nsys stats --force-export=true --report nvtx_sum,cuda_gpu_kern_sum "$out.nsys-rep"
        echo "profile.sh: wrote $out.nsys-rep and $out.sqlite (Nsight Systems)"
        ;;
    ncu)
        echo "profile.sh: no nsys here, so Nsight Compute (ncu): our kernels (gtopk_*) only, each launch" \
            "replayed and measured alone (not a timeline), with its NVTX range; $bin $*"
        ncu --nvtx --kernel-name 'regex:^gtopk_' --launch-skip "${NCU_SKIP:-30}" --launch-count "${NCU_LAUNCHES:-60}" \
            --set "${NCU_SET:-basic}" --target-processes all --force-overwrite -o "$out" "$bin" "$@"
        ncu --import "$out.ncu-rep" --print-summary per-kernel
        echo "profile.sh: wrote $out.ncu-rep (Nsight Compute)"
        ;;
    *)
        echo "profile.sh: PROFILER must be nsys or ncu, not $profiler" >&2
        exit 2
        ;;
esac
