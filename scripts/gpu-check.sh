#!/usr/bin/env bash
# One run on a GPU machine that has the CUDA 13 libraries (in PyTorch's Python environment) and no
# Rust toolchain. It takes a binary built elsewhere (scripts/build-cuda.sh --bundle dist/gpu) and:
#   1. records the machine (nvidia-smi, gtopk info);
#   2. checks every kernel against its CPU twin and times it (gtopk gpu-check);
#   3. times torch.topk on the same vectors (scripts/torch_topk.py);
#   4. trains ResNet-20 and VGG-16 on the synthetic set, 4 workers on one GPU with gTop-k on the
#      device engine, ResNet-20 again on the host engine (the reference) and with recursive
#      doubling, and the same model, batch and workers in PyTorch eager (scripts/torch_step.py),
#      summarised by scripts/summarize_run.py (loss going down, samples/s, the step split);
# and writes everything into RESULTS_DIR. Exits non-zero when any step failed.
#
#   scripts/gpu-check.sh RESULTS_DIR [GTOPK_BINARY]     (binary default: dist/gpu/gtopk)
#   QUICK=1 scripts/gpu-check.sh ...                      smaller sizes, for a dry run
set -uo pipefail
cd "$(dirname "$0")/.."

out="${1:-}"
if [[ -z $out || $out == -* ]]; then
    echo "usage: scripts/gpu-check.sh RESULTS_DIR [GTOPK_BINARY]" >&2
    exit 2
fi
bin="${2:-${GTOPK_BIN:-dist/gpu/gtopk}}"
mkdir -p "$out" || exit 2
work="$(mktemp -d "${TMPDIR:-/tmp}/gtopk-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
data="$work/data"
mkdir -p "$data"
# The bundle carries the binary gzipped (scripts/build-cuda.sh --bundle).
if [[ ! -x $bin && -f $bin.gz ]]; then
    gunzip -c "$bin.gz" >"$work/gtopk" && chmod +x "$work/gtopk" && bin="$work/gtopk"
fi
if [[ ! -x $bin ]]; then
    echo "gpu-check: no executable at $bin (or $bin.gz); build it with scripts/build-cuda.sh --bundle dist/gpu" >&2
    exit 2
fi

# The CUDA 13 libraries the binary links (cuBLAS, cuRAND, NVRTC, NCCL, the runtime) live in the
# `nvidia` Python packages beside PyTorch; libcuda comes with the driver.
nv="$(python3 -c 'import nvidia, sys; print(list(nvidia.__path__)[0])' 2>/dev/null || true)"
if [[ -n $nv ]]; then
    export LD_LIBRARY_PATH="$nv/cu13/lib:$nv/nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
    echo "gpu-check: no 'nvidia' Python package; relying on LD_LIBRARY_PATH for the CUDA libraries" >&2
fi

failed=()
step() {
    local name="$1" limit="$2"
    shift 2
    echo "== $name" | tee -a "$out/gpu-check.log"
    local t0=$SECONDS
    timeout "$limit" "$@" > >(tee "$out/$name.txt") 2> >(tee "$out/$name.err" >&2)
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/gpu-check.log"
    [[ $rc == 0 ]] || failed+=("$name (exit $rc)")
}

if [[ -n ${QUICK:-} ]]; then
    sizes=1,2,1023,4097,270000 merge_ks=1,2,1023,14000 reps=10 steps_r=40 steps_v=20
else
    sizes=1,2,1023,4097,270000,15000000,66000000 merge_ks=1,2,1023,140000 reps=50 steps_r=300 steps_v=150
fi

# ResNet-20 / VGG-16 with their paper batch sizes (128 / 512 in total), 4 workers on GPU 0, gTop-k.
# A run name, and --set arguments after the time limit, make a variant (the host engine).
train_once() {
    local model="$1" name="$2" steps="$3" limit="$4"
    shift 4
    step "train-$name" "$limit" "$bin" train "configs/$model.toml" --plain --run-dir "$out/runs/$name" \
        --set 'device="cuda"' --set 'dist.backend="local"' --set 'data.source="synthetic"' \
        --set data.synthetic_train=20000 --set data.synthetic_test=1000 --set train.max_steps="$steps" \
        --set train.warmup_epochs=0 --set train.checkpoint_every=0 --set train.log_every=10 \
        --set sparse.delta_every=0 "$@"
}

train_run() {
    local model="$1" steps="$2" limit="$3"
    train_once "$model" "$model" "$steps" "$limit"
    local batch
    batch=$(sed -n 's/^batch_size = //p' "configs/$model.toml")
    step "torch-$model" 180 python3 scripts/torch_step.py --model "$model" --batch "$batch" --workers 4 \
        --steps 30 --warmup 5 --device cuda
    step "summary-$model" 30 python3 scripts/summarize_run.py "$out/runs/$model" --torch "$out/torch-$model.txt" \
        --out "$out/training.md"
}

step nvidia-smi 30 nvidia-smi
step info 60 "$bin" info
step kernels 300 "$bin" gpu-check --sizes "$sizes" --merge-ks "$merge_ks" --reps "$reps" --out "$out" --dump "$data"
step torch-topk 120 python3 scripts/torch_topk.py --data "$data" --gtopk "$out/kernels.json" --out "$out" --reps "$reps"
rm -rf "$data"/*
# The same kernels through `gtopk bench` (host-timed, synchronised calls; GB/s beside a copy).
for op in select merge scatter; do
    step "bench-$op" 120 "$bin" bench "$op" --device cuda --sizes 270k,15m,66m --densities 0.001 --reps 20
done
train_run resnet20 "$steps_r" 240
train_once resnet20 resnet20-host "$steps_r" 240 --set debug.host_engine=true
step summary-resnet20-host 30 python3 scripts/summarize_run.py "$out/runs/resnet20-host" --out "$out/training.md"
# Recursive doubling's exchanges on the device engine (4 workers: two rounds, no pre-fold).
train_once resnet20 resnet20-rd "$steps_v" 180 --set 'sparse.gtopk="recursive-doubling"'
step summary-resnet20-rd 30 python3 scripts/summarize_run.py "$out/runs/resnet20-rd" --out "$out/training.md"
train_run vgg16 "$steps_v" 300

if [[ ${#failed[@]} -gt 0 ]]; then
    printf 'gpu-check: FAILED: %s\n' "${failed[@]}" | tee -a "$out/gpu-check.log" >&2
    exit 1
fi
echo "gpu-check: all steps passed; tables in $out (kernels.md, torch-topk.md, training.md)" | tee -a "$out/gpu-check.log"
