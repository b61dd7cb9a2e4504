#!/usr/bin/env bash
# Why gTop-k trails dense S-SGD on a workload: Fig. 1's two runs (dense; gTop-k at c = 1000 after
# the authors' density warm-up) and runs that each change one thing in that gTop-k run, at the
# config's own length, then one table of training loss, test loss and the task's test metric after
# the last epoch every run reached. docs/RESULTS.md ("What holds gTop-k back on the spoken set")
# reads the lstm-an4 table.
#
# Usage: scripts/diagnose-gap.sh [--dry-run] [--only NAMES] [--steps N] [--workloads LIST]
#                                [--delta-every N] [OUT_DIR]
#   --dry-run        print the runs without running them
#   --only NAMES     comma list of the runs to make (names below, dense and gtopk included);
#                    the table then has just those
#   --steps N        stop every run after N steps (train.max_steps)
#   --workloads L    comma list of resnet20, vgg16, lstm-ptb, lstm-an4 (default: lstm-an4)
#   --delta-every N  measure delta every N steps (default 50)
#   OUT_DIR          default runs/diagnose; finished runs in it are kept, an interrupted one
#                    resumes from its newest checkpoint
# The suspects, one run each (a name, then what it changes in the gTop-k run):
#   gtopk-c10         density 0.1 from the start: a hundred times the coordinates a step
#   gtopk-c100        density 0.01 from the start: ten times the coordinates a step
#   gtopk-c1000       density 0.001 from the start: no warm-up
#   dense-m0, gtopk-m0   momentum 0 with lr / (1 - momentum): the same steady-state step
#                    (only where the config has momentum)
#   gtopk-c1000-mc    DGC's momentum correction (sparse.momentum_correction)
#   gtopk-layer       top-k of each tensor instead of the whole model (sparse.scope = "layer")
#   topk              Top-k S-SGD: the union of the workers' top k, nothing lost in merges
#   gtopk-origin      the authors' residual policy (sparse.residual_policy = "origin-index")
#   gtopk-noclip      no max-norm clip of the update (only where the config clips)
#   dense-lr2, gtopk-lr2, dense-lr4, gtopk-lr4
#                    twice and four times the learning rate: whether the two gain alike
# The binary is $GTOPK if set, else `cargo run --release`. Data as scripts/reproduce-fig1.sh.

set -euo pipefail
cd "$(dirname "$0")/.."
names=(dense gtopk gtopk-c10 gtopk-c100 gtopk-c1000 dense-m0 gtopk-m0 gtopk-c1000-mc gtopk-layer topk
    gtopk-origin gtopk-noclip dense-lr2 gtopk-lr2 dense-lr4 gtopk-lr4)
# --only is this script's own; the other options are reproduce-common.sh's.
only=""
rest=()
while [ $# -gt 0 ]; do
    case "$1" in
        --only)
            [ $# -ge 2 ] && [ -n "$2" ] || { echo "error: --only needs a value" >&2; exit 2; }
            only=$2; shift ;;
        *) rest+=("$1") ;;
    esac
    shift
done
set -- ${rest[@]+"${rest[@]}"}
IFS=, read -ra wanted <<< "$only"
for n in ${wanted[@]+"${wanted[@]}"}; do
    [[ " ${names[*]} " == *" $n "* ]] || {
        echo "error: --only: unknown run '$n' (${names[*]})" >&2; exit 2; }
done
default_out=runs/diagnose
default_workloads=lstm-an4
source scripts/reproduce-common.sh

# run NAME CONFIG ARGS...: trains $w-NAME unless --only leaves it out; the table lists it.
run() {
    local name=$1; shift
    [ -z "$only" ] || [[ ",$only," == *",$name,"* ]] || return 0
    train "$w-$name" "$@"
    dirs+=("$w-$name")
}

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
    dirs=()
    run dense "$config" "${sets[@]}" "${dense[@]}"
    run gtopk "$config" "${sets[@]}" "${gtopk[@]}"
    run gtopk-c10 "$config" "${sets[@]}" "${g[@]}" --set sparse.density=0.1
    run gtopk-c100 "$config" "${sets[@]}" "${g[@]}" --set sparse.density=0.01
    run gtopk-c1000 "$config" "${sets[@]}" "${g[@]}" --set sparse.density=0.001
    if awk -v m="${momentum:-0}" 'BEGIN { exit !(m > 0 && m < 1) }'; then
        m0=(--set train.momentum=0 --set "train.lr=$(awk -v lr="$lr" -v m="$momentum" 'BEGIN { printf "%.6g", lr / (1 - m) }')")
        run dense-m0 "$config" "${sets[@]}" "${dense[@]}" "${m0[@]}"
        run gtopk-m0 "$config" "${sets[@]}" "${gtopk[@]}" "${m0[@]}"
    fi
    run gtopk-c1000-mc "$config" "${sets[@]}" "${g[@]}" --set sparse.density=0.001 \
        --set sparse.momentum_correction=true
    run gtopk-layer "$config" "${sets[@]}" "${gtopk[@]}" --set sparse.scope=layer
    run topk "$config" "${sets[@]}" --set sparse.method=topk --set sparse.density=authors
    run gtopk-origin "$config" "${sets[@]}" "${gtopk[@]}" --set sparse.residual_policy=origin-index
    if awk -v c="${clip:-0}" 'BEGIN { exit !(c > 0) }'; then
        run gtopk-noclip "$config" "${sets[@]}" "${gtopk[@]}" --set train.clip_norm=0
    fi
    for x in 2 4; do
        lrx=(--set "train.lr=$(awk -v lr="$lr" -v x="$x" 'BEGIN { printf "%.6g", x * lr }')")
        run "dense-lr$x" "$config" "${sets[@]}" "${dense[@]}" "${lrx[@]}"
        run "gtopk-lr$x" "$config" "${sets[@]}" "${gtopk[@]}" "${lrx[@]}"
    done
    [ ${#dirs[@]} -gt 0 ] || continue
    echo "== table: scripts/compare_runs.py ${dirs[*]/#/$out/}"
    [ "$dry_run" = 1 ] && continue
    python3 scripts/compare_runs.py "${dirs[@]/#/$out/}" | tee "$out/$w.md"
done
