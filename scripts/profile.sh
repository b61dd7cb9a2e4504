#!/usr/bin/env bash
# Profiles a gtopk command with Nsight Systems: CUDA kernels, NVTX ranges (fwd, bwd, aggregate,
# opt.step) and OS runtime calls, then prints the NVTX and kernel summaries.
#
#   scripts/profile.sh OUTPUT [GTOPK_BINARY] -- ARGS...
#   scripts/profile.sh prof/resnet20 -- train configs/resnet20.toml --set device=cuda --set train.max_steps=50
#
# OUTPUT gets .nsys-rep (open it in nsys-ui) and .sqlite; the binary defaults to
# target/cuda/release/gtopk, then dist/gpu/gtopk.
set -euo pipefail

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
if [[ -z $bin ]]; then
    for b in target/cuda/release/gtopk dist/gpu/gtopk; do
        [[ -x $b ]] && bin=$b && break
    done
fi
[[ -x ${bin:-} ]] || { echo "profile.sh: no gtopk binary (build one with scripts/build-cuda.sh)" >&2; exit 2; }
command -v nsys >/dev/null || { echo "profile.sh: nsys (Nsight Systems) is not on PATH" >&2; exit 2; }

mkdir -p "$(dirname "$out")"
# Sampling off and no memory tracing: both add overhead that distorts short steps.
nsys profile --trace=cuda,nvtx,osrt --sample=none --cpuctxsw=none --cuda-memory-usage=false \
    --force-overwrite=true --export=sqlite -o "$out" "$bin" "$@"
nsys stats --force-export=true --report nvtx_sum,cuda_gpu_kern_sum "$out.nsys-rep"
