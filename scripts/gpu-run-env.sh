#!/usr/bin/env bash
# Sourced by the scripts that run the cuda binary on a GPU machine (gpu-check.sh, profile.sh):
#   gtopk_find_binary [CANDIDATE...]  prints the first executable candidate; a CANDIDATE.gz (the
#                                      bundle of scripts/build-cuda.sh --bundle) is unpacked into
#                                      $GTOPK_UNPACK_DIR first
#   gtopk_cuda_libs [PYTHON]          puts the CUDA 13 libraries of the `nvidia` Python packages
#                                      (beside PyTorch) on LD_LIBRARY_PATH; libcuda comes with the
#                                      driver. Returns 1 when there is no such package.

gtopk_find_binary() {
    local c
    for c in "$@"; do
        if [[ -x $c && ! -d $c ]]; then
            echo "$c"
            return 0
        fi
        if [[ -f $c.gz ]]; then
            local dir="${GTOPK_UNPACK_DIR:?set GTOPK_UNPACK_DIR to a scratch folder}"
            gunzip -c "$c.gz" >"$dir/gtopk" && chmod +x "$dir/gtopk" && echo "$dir/gtopk" && return 0
        fi
    done
    return 1
}

gtopk_cuda_libs() {
    local nv
    nv="$("${1:-python3}" -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null)" || return 1
    [[ -n $nv ]] || return 1
    export LD_LIBRARY_PATH="$nv/cu13/lib:$nv/nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}
