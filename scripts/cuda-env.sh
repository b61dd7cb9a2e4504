#!/usr/bin/env bash
# Prepares a CUDA 13.0 build environment on a machine with no GPU and no system CUDA, then prints
# (or, when sourced, exports) the variables a `--features cuda` build needs.
#
#   source scripts/cuda-env.sh          # install if needed, export PATH/CUDA_HOME/RUSTFLAGS/...
#   scripts/cuda-env.sh                 # same, but print the exports
#
# The toolchain (nvcc, headers) comes from the Python package index; no library is downloaded:
# every library the binary links (libcuda, libcublas, libnccl, ...) is a generated stub carrying the
# real soname, made of empty functions named after cudarc's declarations. The real libraries replace
# the stubs at run time (LD_LIBRARY_PATH on the GPU machine; see scripts/gpu-check.sh).
#
# GTOPK_CUDA_DIR (default ~/.cache/gtopk-cuda) is a cache: reused when present, rebuilt when not.

_gtopk_cuda_main() {
    local dir="${GTOPK_CUDA_DIR:-$HOME/.cache/gtopk-cuda}"
    local repo
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    mkdir -p "$dir"

    if [[ ! -x "$dir/venv/bin/python" ]]; then
        python3 -m venv "$dir/venv" >&2
    fi
    local cu13
    cu13="$("$dir/venv/bin/python" -c 'import pathlib,sys; print(pathlib.Path(sys.prefix, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}", "site-packages", "nvidia", "cu13"))')"
    if [[ ! -x "$cu13/bin/nvcc" ]]; then
        echo "cuda-env: installing the CUDA 13.0 compiler and headers into $dir/venv" >&2
        "$dir/venv/bin/pip" install -q --disable-pip-version-check \
            "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" \
            "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" >&2
    fi

    local link="$dir/link"
    if [[ ! -f "$link/.complete" ]]; then
        _gtopk_make_stubs "$repo" "$link" "$cu13/lib" >&2
    fi

    cat <<EOF
export CUDA_HOME="$cu13"
export CUDA_PATH="$cu13"
export PATH="$cu13/bin:\$PATH"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export GTOPK_CUDA_LINK_DIR="$link"
export RUSTFLAGS="\${RUSTFLAGS:-} -L native=$link"
EOF
}

# One stub per library cudarc links, with the soname of the real CUDA 13 library. The runtime is
# the exception: candle's kernels are compiled with nvcc and call its internal registration entry
# points, so the real libcudart (small, part of nvidia-cuda-runtime) is linked instead.
_gtopk_make_stubs() {
    local repo="$1" link="$2" cuda_lib="$3"
    (cd "$repo" && cargo fetch --quiet)
    local cudarc
    cudarc="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d -name 'cudarc-0.19.*' | sort -V | tail -1)"
    if [[ -z "$cudarc" ]]; then
        echo "cuda-env: cudarc 0.19 sources not found under ${CARGO_HOME:-$HOME/.cargo}/registry/src" >&2
        return 1
    fi
    rm -rf "$link" && mkdir -p "$link"
    local spec module lib soname
    for spec in driver:cuda:libcuda.so.1 nccl:nccl:libnccl.so.2 nvrtc:nvrtc:libnvrtc.so.13 \
        curand:curand:libcurand.so.10 cublas:cublas:libcublas.so.13 cublaslt:cublasLt:libcublasLt.so.13; do
        IFS=: read -r module lib soname <<<"$spec"
        grep -oE '^\s+fn [A-Za-z_0-9]+\(' "$cudarc/src/$module/sys/mod.rs" |
            sed -E 's/^\s+fn ([A-Za-z_0-9]+)\(/void \1(void) {}/' | sort -u >"$link/$lib.c"
        gcc -shared -fPIC -Wl,-soname,"$soname" -o "$link/$soname" "$link/$lib.c"
        ln -sf "$soname" "$link/lib$lib.so"
    done
    if [[ ! -f "$cuda_lib/libcudart.so.13" ]]; then
        echo "cuda-env: $cuda_lib/libcudart.so.13 is missing (nvidia-cuda-runtime)" >&2
        return 1
    fi
    ln -sf "$cuda_lib/libcudart.so.13" "$link/libcudart.so"
    touch "$link/.complete"
    echo "cuda-env: stub libraries in $link"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    _gtopk_cuda_main
else
    # Sourced: run the work in a child shell so `set -e` never reaches the caller's shell.
    _gtopk_cuda_exports="$(bash "${BASH_SOURCE[0]}")" && eval "$_gtopk_cuda_exports"
fi
