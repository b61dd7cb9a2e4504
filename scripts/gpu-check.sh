#!/usr/bin/env bash
# The GPU check: one command on a GPU machine that has the CUDA 13 libraries (in PyTorch's Python
# environment) and no Rust toolchain, sized for a machine lent for one command of at most 10
# minutes that hands back at most 8 files. It takes a binary built elsewhere
# (scripts/build-cuda.sh --bundle dist/gpu) and writes exactly two files into OUT_DIR:
#
#   summary.md        every step's outcome and time, then the result tables
#   results.tar.gz    results/: logs of every step, kernels.json, the runs' metrics.jsonl and
#                     config.toml (never a checkpoint)
#
# Both are rewritten after every step, so a run cut off at its limit still returns every step that
# finished (and `kernels` writes each of its rows as it is made). The steps run most valuable first,
# each within its share of BUDGET_S (default 450 s: the whole check ends within 8 minutes on an
# H100 or H200); the shares (PLAN below, `--plan` prints them) add up to the budget, so every step
# gets its share even when all before it used theirs, and a step that finishes early leaves its
# time to the rest. A step that no longer fits is listed as not run. In order of value:
#   1. the machine (nvidia-smi, gtopk info)
#   2. every kernel against its CPU twin, bit for bit, then timed, queued and as a CUDA graph
#      (gtopk gpu-check)
#   3. ResNet-20, 4 workers on GPU 0, gTop-k tree on the device engine, then on the host engine
#      (the reference its loss curve is compared with), then the same in PyTorch eager
#   4. VGG-16 (15M parameters) on the device engine and its PyTorch twin
#   5. torch.topk on the same vectors as step 2
#   6. the rest: dense, Top-k and gTop-k recursive doubling, each on the device engine against the
#      host engine (dist.backend = local over device buffers), then bench select, merge, scatter
# NCCL is not run: NCCL refuses two ranks on one GPU, and the machines lent have one (docs/GPU.md).
#
#   scripts/gpu-check.sh OUT_DIR [GTOPK_BINARY]     (binary default: dist/gpu/gtopk, or its .gz)
#   scripts/gpu-check.sh --plan                     the steps and their shares, then the total
#   QUICK=1        small sizes and few steps, for a dry run
#   DEVICE=cpu     train on the CPU (a dry run of the packaging on a machine without a GPU; the
#                  GPU-only steps are then skipped)
#   BUDGET_S=N     the time budget in seconds: a step runs within min(its share, what is left)
#   ONLY="a b"     run only the steps named (the others are listed as skipped), e.g. ONLY=kernels
#                  to rerun one step on a still-warm machine; EXTRA_SETS="k=v ..." more --set
#                  arguments for every training run (tests/gpu_scripts.rs uses both to dry-run the
#                  packaging in seconds)
# Exits 0 when no step failed, 1 when one did, 2 on bad usage, a missing bundle or a binary that
# cannot run.
set -uo pipefail
cd "$(dirname "$0")/.."

# The plan: each step and its share in seconds, in the order the steps run, adding up to at most
# the default budget (PLAN_BUDGET; the rest is margin for packing). The summaries (a few seconds of
# Python each) have shares too.
PLAN=(
    nvidia-smi:10 info:10
    kernels:95
    train-resnet20:40 train-resnet20-host:40 torch-resnet20:25 summary-resnet20:5 summary-resnet20-host:5
    train-vgg16:50 torch-vgg16:25 summary-vgg16:5
    torch-topk:20
    train-dense:8 train-dense-host:8 summary-dense:4
    train-topk:8 train-topk-host:8 summary-topk:4
    train-rd:8 train-rd-host:8 summary-rd:4
    bench-select:15 bench-merge:15 bench-scatter:15
)
PLAN_BUDGET=450

if [[ ${1:-} == --plan ]]; then
    total=0
    for entry in "${PLAN[@]}"; do
        echo "${entry%%:*} ${entry##*:}"
        total=$((total + ${entry##*:}))
    done
    echo "total $total of $PLAN_BUDGET"
    exit 0
fi

out="${1:-}"
if [[ -z $out || $out == -* ]]; then
    echo "usage: scripts/gpu-check.sh OUT_DIR [GTOPK_BINARY], or scripts/gpu-check.sh --plan" >&2
    exit 2
fi
bin="${2:-${GTOPK_BIN:-dist/gpu/gtopk}}"
device="${DEVICE:-cuda}"
budget="${BUDGET_S:-$PLAN_BUDGET}"
py="${PYTHON:-python3}"
if [[ $device != cuda && $device != cpu ]] || ! [[ $budget =~ ^[0-9]+$ ]]; then
    echo "gpu-check: DEVICE must be cuda or cpu and BUDGET_S a whole number of seconds" >&2
    exit 2
fi
gpus=0
command -v nvidia-smi >/dev/null && gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')"
mkdir -p "$out" || exit 2
out="$(cd "$out" && pwd)"
start=$SECONDS
started="$(date -u '+%F %T UTC')"
work="$(mktemp -d "${TMPDIR:-/tmp}/gtopk-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
res="$work/results"
data="$work/data"
mkdir -p "$res/logs" "$res/runs" "$data"
steps_file="$work/steps.tsv"
: >"$steps_file"

# ---- packaging: summary.md and results.tar.gz, rebuilt after every step ------------------------
pack() {
    local name outcome secs f
    {
        echo "# gtopk GPU check"
        echo
        echo "- started $started; $((SECONDS - start)) s so far of a ${budget} s budget"
        echo "- host $(hostname), device $device, binary $bin${QUICK:+, QUICK=1 (dry-run sizes)}"
        echo "- NCCL (dist.backend = nccl) is not run: NCCL refuses two ranks on one GPU, and this machine has" \
            "$gpus GPU(s). Every other device path is: the kernels against their CPU twins, and dense, Top-k," \
            "gTop-k tree and recursive doubling on the device engine (dist.backend = local over device buffers)" \
            "against the host engine."
        echo
        echo "| step | outcome | seconds |"
        echo "|---|---|---:|"
        while IFS=$'\t' read -r name outcome secs; do
            echo "| $name | $outcome | $secs |"
        done <"$steps_file"
        for f in kernels.md torch-topk.md training.md; do
            if [[ -s $res/$f ]]; then
                echo
                cat "$res/$f"
            fi
        done
        echo
        echo "Logs, kernels.json and each run's metrics.jsonl: results.tar.gz."
    } >"$out/.summary.md.tmp" && mv -f "$out/.summary.md.tmp" "$out/summary.md"
    tar -czf "$out/.results.tar.gz.tmp" -C "$work" --exclude=checkpoints results &&
        mv -f "$out/.results.tar.gz.tmp" "$out/results.tar.gz"
}

record() {
    printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$steps_file"
    [[ $2 == ok || $2 == skipped* || $2 == "not run"* ]] || failed+=("$1")
    pack
}

failed=()
# A step's share in seconds (PLAN).
share() {
    local entry
    for entry in "${PLAN[@]}"; do
        if [[ ${entry%%:*} == "$1" ]]; then
            echo "${entry##*:}"
            return 0
        fi
    done
    echo "gpu-check: step $1 has no share in PLAN (a bug in this script)" >&2
    return 1
}

# step NAME CMD...: runs CMD within min(its share, what is left of the budget); its stdout goes to
# results/logs/NAME.log, its stderr to NAME.err (their tails to the terminal).
step() {
    local name="$1" limit
    shift
    if [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]]; then
        skip "$name" "not in ONLY"
        return 1
    fi
    if ! limit="$(share "$name")"; then
        record "$name" "FAILED: no share in PLAN" 0
        return 1
    fi
    local left=$((budget - (SECONDS - start) - 5))
    if ((left < 10)); then
        echo "== $name: not run (time budget spent)"
        record "$name" "not run (time budget)" 0
        return 1
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit $limit s)"
    local t0=$SECONDS
    timeout -k 5 "$limit" "$@" >"$res/logs/$name.log" 2>"$res/logs/$name.err"
    local rc=$?
    tail -n 3 "$res/logs/$name.log" "$res/logs/$name.err"
    local outcome=ok
    if ((rc == 124 || rc == 137)); then
        outcome="FAILED: cut off at its $limit s limit"
    elif ((rc != 0)); then
        outcome="FAILED (exit $rc)"
    fi
    echo "== $name: $outcome after $((SECONDS - t0)) s"
    record "$name" "$outcome" $((SECONDS - t0))
    [[ $outcome == ok ]]
}

skip() {
    echo "== $1: skipped ($2)"
    record "$1" "skipped ($2)" 0
}

# ---- the binary and its libraries --------------------------------------------------------------
source scripts/gpu-run-env.sh
if ! bin="$(GTOPK_UNPACK_DIR="$work" gtopk_find_binary "$bin")"; then
    want="${2:-${GTOPK_BIN:-dist/gpu/gtopk}}"
    echo "gpu-check: no executable at $want (nor $want.gz). Build the bundle with" \
        "scripts/build-cuda.sh --bundle dist/gpu; dist/ is git-ignored, and the device tool copies a" \
        "git-ignored path only when its carry names it: carry [\"dist/gpu\"] (docs/GPU.md)" >&2
    record binary "FAILED: no executable at $want (dist/ is git-ignored: name it in the device tool's carry)" 0
    exit 2
fi
# The device engine prints each step's host waits and d-length allocations (docs/GPU.md).
export GTOPK_DEBUG_COSTS=1
gtopk_cuda_libs "$py" || echo "gpu-check: no 'nvidia' Python package; relying on LD_LIBRARY_PATH for the CUDA libraries" >&2

if command -v nvidia-smi >/dev/null; then
    step nvidia-smi nvidia-smi
else
    skip nvidia-smi "not on PATH"
fi
if ! step info "$bin" info; then
    echo "gpu-check: the binary does not start (see results/logs/info.err)" >&2
    exit 2
fi
cuda_build=0
grep -q '^cuda: built with' "$res/logs/info.log" && cuda_build=1
if [[ $device == cuda && $cuda_build == 0 ]]; then
    echo "gpu-check: $bin was built without the cuda feature (scripts/build-cuda.sh --bundle dist/gpu)" >&2
    record cuda "FAILED: binary without the cuda feature" 0
    exit 2
fi
gpu_step() { # a step that needs the cuda build (skipped in a CPU dry run)
    if [[ $cuda_build == 1 ]]; then step "$@"; else skip "$1" "binary without cuda"; fi
}
has_torch=0
"$py" -c 'import torch' 2>/dev/null && has_torch=1
torch_step() { # a step that needs PyTorch
    if [[ $has_torch == 1 ]]; then step "$@"; else skip "$1" "no torch for $py"; fi
}

if [[ -n ${QUICK:-} ]]; then
    sizes=1,2,1023,4097,270000 merge_ks=1,2,1023,14000 reps=10 bench_sizes=270k
    steps_r=6 steps_m=4 steps_v=3 log_every=2 train_n=1024 test_n=64 torch_steps=3 batch_r=32 batch_v=16
else
    sizes=1,2,1023,4097,270000,15000000,66000000 merge_ks=1,2,1023,140000 reps=30 bench_sizes=270k,15m,66m
    steps_r=300 steps_m=20 steps_v=50 log_every=10 train_n=20000 test_n=1000 torch_steps=30 batch_r=128 batch_v=512
fi

extra=()
for kv in ${EXTRA_SETS:-}; do extra+=(--set "$kv"); done

# A training run: MODEL NAME STEPS BATCH [--set ...]. 4 workers on one device, gTop-k tree unless
# the --set says otherwise, the synthetic set; the run directory keeps metrics.jsonl and
# config.toml (its final checkpoint is deleted at once: a VGG-16 model is 59 MB).
train_once() {
    local model="$1" name="$2" steps="$3" batch="$4"
    shift 4
    step "train-$name" "$bin" train "configs/$model.toml" --plain --run-dir "$res/runs/$name" \
        --set "device=\"$device\"" --set 'dist.backend="local"' --set 'data.source="synthetic"' \
        --set data.synthetic_train="$train_n" --set data.synthetic_test="$test_n" \
        --set train.batch_size="$batch" --set train.max_steps="$steps" \
        --set train.warmup_epochs=0 --set train.checkpoint_every=0 --set train.log_every="$log_every" \
        --set sparse.delta_every=0 "${extra[@]}" "$@"
    local rc=$?
    rm -rf "$res/runs/$name/checkpoints"
    return $rc
}
summarize() { # NAME [summarize_run.py options]
    local name="$1"
    shift
    [[ -s $res/runs/$name/metrics.jsonl ]] || return 0
    step "summary-$name" "$py" scripts/summarize_run.py "$res/runs/$name" --out "$res/training.md" "$@"
}
torch_run() { # MODEL BATCH
    torch_step "torch-$1" "$py" scripts/torch_step.py --model "$1" --batch "$2" --workers 4 \
        --steps "$torch_steps" --warmup 3 --device "$device"
}
# A method on the device engine and on the host engine, same job, losses compared: METHOD_NAME SETS...
method_pair() {
    local name="$1"
    shift
    train_once resnet20 "$name" "$steps_m" "$batch_r" "$@"
    train_once resnet20 "$name-host" "$steps_m" "$batch_r" "$@" --set debug.host_engine=true
    summarize "$name" --reference "$res/runs/$name-host" --comparison
}

gpu_step kernels "$bin" gpu-check --sizes "$sizes" --merge-ks "$merge_ks" --reps "$reps" --out "$res" --dump "$data"
train_once resnet20 resnet20 "$steps_r" "$batch_r"
train_once resnet20 resnet20-host "$steps_r" "$batch_r" --set debug.host_engine=true
torch_run resnet20 "$batch_r"
summarize resnet20 --torch "$res/logs/torch-resnet20.log" --reference "$res/runs/resnet20-host"
summarize resnet20-host
train_once vgg16 vgg16 "$steps_v" "$batch_v"
torch_run vgg16 "$batch_v"
summarize vgg16 --torch "$res/logs/torch-vgg16.log"
if [[ -n $(ls -A "$data") ]]; then
    torch_step torch-topk "$py" scripts/torch_topk.py --data "$data" --gtopk "$res/kernels.json" --out "$res" --reps "$reps"
fi
rm -rf "$data"
method_pair dense --set 'sparse.method="dense"'
method_pair topk --set 'sparse.method="topk"'
# Recursive doubling's exchanges (4 workers: two rounds, no pre-fold).
method_pair rd --set 'sparse.gtopk="recursive-doubling"'
gpu_step bench-select "$bin" bench select --device cuda --baselines false --sizes "$bench_sizes" --densities 0.001 --reps 10
for op in merge scatter; do
    gpu_step "bench-$op" "$bin" bench "$op" --device cuda --sizes "$bench_sizes" --densities 0.001 --reps 10
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "gpu-check: FAILED: ${failed[*]} (see $out/summary.md)" >&2
    exit 1
fi
echo "gpu-check: no step failed; $out/summary.md and $out/results.tar.gz"
