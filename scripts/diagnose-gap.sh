#!/usr/bin/env bash
# Why gTop-k trails dense S-SGD on a workload: Fig. 1's two runs (dense; gTop-k at c = 1000 after
# the authors' density warm-up) and runs that each change one thing in that gTop-k run, at the
# config's own length, then one table of training loss, test loss and the task's test metric after
# the last epoch every run reached. docs/RESULTS.md ("What holds gTop-k back on the spoken set")
# reads the lstm-an4 table.
#
# Usage: scripts/diagnose-gap.sh [--dry-run] [--steps N] [--workloads LIST] [--delta-every N] [OUT_DIR]
#   --dry-run        print the runs without running them
#   --steps N        stop every run after N steps (train.max_steps)
#   --workloads L    comma list of resnet20, vgg16, lstm-ptb, lstm-an4 (default: lstm-an4)
#   --delta-every N  measure delta every N steps (default 50)
#   OUT_DIR          default runs/diagnose; finished runs in it are kept, an interrupted one
#                    resumes from its newest checkpoint
# The suspects, one run each (a name, then what it changes in the gTop-k run):
#   gtopk-c100        density 0.01 from the start: ten times the coordinates a step
#   gtopk-c1000       density 0.001 from the start: no warm-up
#   dense-m0, gtopk-m0   momentum 0 with lr / (1 - momentum): the same steady-state step
#                    (only where the config has momentum)
#   gtopk-c1000-mc    DGC's momentum correction (sparse.momentum_correction)
#   gtopk-layer       top-k of each tensor instead of the whole model (sparse.scope = "layer")
#   topk              Top-k S-SGD: the union of the workers' top k, nothing lost in merges
#   gtopk-origin      the authors' residual policy (sparse.residual_policy = "origin-index")
#   gtopk-noclip      no max-norm clip of the update (only where the config clips)
# The binary is $GTOPK if set, else `cargo run --release`. Data as scripts/reproduce-fig1.sh.

set -euo pipefail
cd "$(dirname "$0")/.."
default_out=runs/diagnose
default_workloads=lstm-an4
source scripts/reproduce-common.sh

# toml_value FILE SECTION KEY: a scalar of a flat config (the configs/ files), empty when absent.
toml_value() {
    awk -v want="[$2]" -v key="$3" '
        /^\[/ { section = $0 }
        section == want && $1 == key && $2 == "=" { print $3; exit }' "$1"
}

for w in "${list[@]}"; do
    pick_config "$w"
    lr=$(toml_value "$config" train lr)
    momentum=$(toml_value "$config" train momentum)
    clip=$(toml_value "$config" train clip_norm)
    dense=(--set sparse.method=dense)
    g=(--set sparse.method=gtopk)
    gtopk=("${g[@]}" --set sparse.density=authors)
    train "$w-dense" "$config" "${sets[@]}" "${dense[@]}"
    train "$w-gtopk" "$config" "${sets[@]}" "${gtopk[@]}"
    train "$w-gtopk-c100" "$config" "${sets[@]}" "${g[@]}" --set sparse.density=0.01
    train "$w-gtopk-c1000" "$config" "${sets[@]}" "${g[@]}" --set sparse.density=0.001
    dirs=("$w-dense" "$w-gtopk" "$w-gtopk-c100" "$w-gtopk-c1000")
    if awk -v m="${momentum:-0}" 'BEGIN { exit !(m > 0 && m < 1) }'; then
        m0=(--set train.momentum=0 --set "train.lr=$(awk -v lr="$lr" -v m="$momentum" 'BEGIN { printf "%.6g", lr / (1 - m) }')")
        train "$w-dense-m0" "$config" "${sets[@]}" "${dense[@]}" "${m0[@]}"
        train "$w-gtopk-m0" "$config" "${sets[@]}" "${gtopk[@]}" "${m0[@]}"
        dirs+=("$w-dense-m0" "$w-gtopk-m0")
    fi
    train "$w-gtopk-c1000-mc" "$config" "${sets[@]}" "${g[@]}" --set sparse.density=0.001 \
        --set sparse.momentum_correction=true
    train "$w-gtopk-layer" "$config" "${sets[@]}" "${gtopk[@]}" --set sparse.scope=layer
    train "$w-topk" "$config" "${sets[@]}" --set sparse.method=topk --set sparse.density=authors
    train "$w-gtopk-origin" "$config" "${sets[@]}" "${gtopk[@]}" --set sparse.residual_policy=origin-index
    dirs+=("$w-gtopk-c1000-mc" "$w-gtopk-layer" "$w-topk" "$w-gtopk-origin")
    if awk -v c="${clip:-0}" 'BEGIN { exit !(c > 0) }'; then
        train "$w-gtopk-noclip" "$config" "${sets[@]}" "${gtopk[@]}" --set train.clip_norm=0
        dirs+=("$w-gtopk-noclip")
    fi
    echo "== table: scripts/compare_runs.py ${dirs[*]/#/$out/}"
    [ "$dry_run" = 1 ] && continue
    python3 scripts/compare_runs.py "${dirs[@]/#/$out/}" | tee "$out/$w.md"
done
