#!/usr/bin/env bash
# The paper's Fig. 2: gTop-k S-SGD under compression ratios c = d/k in {100, 250, 500, 1000}
# (density 1/c, fixed for the whole run), 4 workers, per workload; then one SVG per workload with
# training loss, accuracy (not for the AN4 model) and delta.
#
# Usage: scripts/reproduce-fig2.sh [--quick] [--full] [--dry-run] [--steps N] [--workloads LIST] [--delta-every N] [OUT_DIR]
#   --quick          only resnet20 (on CIFAR-10, else the digits, else synthetic 16x16), delta every 4 steps
#   --full           the paper's epochs on the stand-ins (digits: 140 for both models, with the
#                    paper's warm-up and decays; fortunes: 40; spoken: 80) instead of their
#                    configs' hour-sized runs
#   --dry-run        print the runs and figures (configs, every --set) without running them
#   --steps N        stop every run after N steps (train.max_steps)
#   --workloads L    comma list of resnet20, vgg16, lstm-ptb, lstm-an4 (default: all four)
#   --delta-every N  measure delta every N steps (default 50; 4 with --quick)
#   OUT_DIR          default runs/fig2; finished runs in it are kept, an interrupted one
#                    resumes from its newest checkpoint
# The binary is $GTOPK if set, else `cargo run --release`. Set RATIOS="100 1000" to change the sweep.
# Data, the first that is under $DATA_DIR (default data/): the paper's set (scripts/get-data.sh
# cifar10|ptb|an4), else a real stand-in a fresh machine can make (scripts/get-data.sh
# digits|fortunes|spoken: configs/resnet20_digits.toml, vgg16_digits.toml,
# lstm_ptb_fortunes.toml, lstm_an4_spoken.toml), else synthetic data.

set -euo pipefail
cd "$(dirname "$0")/.."
default_out=runs/fig2
source scripts/reproduce-common.sh
ratios=${RATIOS:-100 250 500 1000}

for w in "${list[@]}"; do
    pick_config "$w"
    dirs=()
    for c in $ratios; do
        density=$(awk -v c="$c" 'BEGIN { printf "%.6g", 1 / c }')
        train "$w-c$c" "$config" "${sets[@]}" --set sparse.method=gtopk --set "sparse.density=$density"
        dirs+=("$out/$w-c$c")
    done
    # A CTC model logs no accuracy (WER/CER instead), and a metric named in --metrics that no run
    # has is an error in gtopk plot.
    metrics=loss,accuracy,delta
    [ "$w" = lstm-an4 ] && metrics=loss,delta
    figure "$out/fig2-$w.svg" "${dirs[@]}" --metrics "$metrics"
done
