#!/usr/bin/env bash
# The paper's Fig. 1: delta (Assumption 1) and training loss of gTop-k S-SGD against dense S-SGD,
# 4 workers, density 0.001 after the authors' warm-up (0.004 in epoch 0: sparse.density = "authors"),
# per workload; then one SVG per workload.
#
# Usage: scripts/reproduce-fig1.sh [--quick] [--full] [--dry-run] [--steps N] [--workloads LIST] [--delta-every N] [OUT_DIR]
#   --quick          only resnet20 (on CIFAR-10, else the digits, else synthetic 16x16), delta every 4 steps
#   --full           the paper's epochs on the stand-ins (digits: 140 for both models, with the
#                    paper's warm-up and decays; fortunes: 40; spoken: 80). Without it each
#                    figure fits an hour on 2 cores: ResNet-20 on the digits runs the 140 epochs,
#                    VGG-16 there 36, the spoken set 22, the fortunes 10
#   --dry-run        print the runs and figures (configs, every --set) without running them
#   --steps N        stop every run after N steps (train.max_steps)
#   --workloads L    comma list of resnet20, vgg16, lstm-ptb, lstm-an4 (default: all four)
#   --delta-every N  measure delta every N steps (default 50; 4 with --quick)
#   OUT_DIR          default runs/fig1; finished runs in it are kept, an interrupted one
#                    resumes from its newest checkpoint
# The binary is $GTOPK if set, else `cargo run --release`.
# Data, the first that is under $DATA_DIR (default data/): the paper's set (scripts/get-data.sh
# cifar10|ptb|an4), else a real stand-in a fresh machine can make (scripts/get-data.sh
# digits|fortunes|spoken: configs/resnet20_digits.toml, vgg16_digits.toml,
# lstm_ptb_fortunes.toml, lstm_an4_spoken.toml), else synthetic data.

set -euo pipefail
cd "$(dirname "$0")/.."
default_out=runs/fig1
fig1=1
source scripts/reproduce-common.sh

for w in "${list[@]}"; do
    pick_config "$w"
    train "$w-dense" "$config" "${sets[@]}" --set sparse.method=dense
    train "$w-gtopk" "$config" "${sets[@]}" --set sparse.method=gtopk --set sparse.density=authors
    figure "$out/fig1-$w.svg" "$out/$w-dense" "$out/$w-gtopk" --metrics loss,delta
done
