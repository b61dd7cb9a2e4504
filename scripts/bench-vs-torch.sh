#!/usr/bin/env bash
# gtopk beside PyTorch on the CPU, one training step (forward, backward, SGD) of the same model and
# batch with the same thread count, in interleaved rounds; prints the medians of samples/s of both
# and their ratio as a markdown table (docs/PERFORMANCE.md has the numbers and how they were taken).
#
#   scripts/bench-vs-torch.sh                 # creates .torch-venv with torch from PyPI (once)
#   TORCH_PYTHON=/path/to/venv/bin/python scripts/bench-vs-torch.sh
#   GTOPK=/path/to/gtopk scripts/bench-vs-torch.sh   # another build (else: cargo build --release)
#
# Environment: THREADS (default: all cores), ROUNDS (3), STEPS (timed steps per run, 5),
# ROWS (space-separated subset of: resnet20-32 resnet20-128 vgg16-16 ptb-20 an4-16), OUT (a
# directory for the raw JSON lines; default: a fresh temporary one).
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS=${THREADS:-$(nproc)}
ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-5}
ROWS=${ROWS:-"resnet20-32 resnet20-128 vgg16-16 ptb-20 an4-16"}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"

if [[ -z "${TORCH_PYTHON:-}" ]]; then
    venv=.torch-venv
    if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
        echo "bench-vs-torch: installing torch into $venv (PyPI; a few GB)" >&2
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet torch numpy
    fi
    TORCH_PYTHON=$venv/bin/python
fi
"$TORCH_PYTHON" -c "import torch" || { echo "bench-vs-torch: $TORCH_PYTHON cannot import torch" >&2; exit 1; }

if [[ -z "${GTOPK:-}" ]]; then
    cargo build --release --quiet
    GTOPK=target/release/gtopk
fi

# Per row: batch, gtopk config and overrides, torch_step.py arguments.
row() {
    case "$1" in
        resnet20-32) echo "32|configs/quickstart.toml --set data.synthetic_side=32|--model resnet20" ;;
        resnet20-128) echo "128|configs/quickstart.toml --set data.synthetic_side=32|--model resnet20" ;;
        vgg16-16) echo "16|configs/quickstart.toml --set model.arch=vgg16 --set data.synthetic_side=32|--model vgg16" ;;
        ptb-20) echo "20|configs/lstm_ptb_synthetic.toml --set model.hidden=256|--model lstm-ptb --hidden 256 --layers 2 --vocab 1000 --seq-len 35 --dropout 0.2" ;;
        an4-16) echo "16|configs/lstm_an4_synthetic.toml|--model lstm-an4 --hidden 64 --layers 2 --conv-channels 8 --frames 100 --labels 10" ;;
        *) echo "bench-vs-torch: unknown row '$1'" >&2; exit 2 ;;
    esac
}

echo "bench-vs-torch: $ROUNDS rounds, $STEPS steps, $THREADS threads, load: $(uptime | sed 's/.*load/load/')" >&2
for round in $(seq "$ROUNDS"); do
    for r in $ROWS; do
        IFS='|' read -r batch gcfg targs < <(row "$r")
        # shellcheck disable=SC2086
        RAYON_NUM_THREADS=$THREADS "$GTOPK" bench step $gcfg --steps "$STEPS" \
            --set dist.workers=1 --set "train.batch_size=$batch" --json \
            | sed "s/^{/{\"row\":\"$r\",\"side\":\"gtopk\",\"batch\":$batch,/" >>"$OUT/gtopk.jsonl"
        # shellcheck disable=SC2086
        OMP_WAIT_POLICY=PASSIVE "$TORCH_PYTHON" scripts/torch_step.py $targs --device cpu --batch "$batch" \
            --steps "$STEPS" --warmup 2 --threads "$THREADS" 2>/dev/null \
            | sed "s/^{/{\"row\":\"$r\",\"side\":\"torch\",/" >>"$OUT/torch.jsonl"
        echo "round $round: $r done" >&2
    done
done

python3 - "$OUT" "$ROWS" <<'EOF'
import json, statistics, sys, pathlib
out, rows = pathlib.Path(sys.argv[1]), sys.argv[2].split()
recs = [json.loads(l) for f in ("gtopk.jsonl", "torch.jsonl") for l in (out / f).read_text().splitlines() if l.strip()]
def rate(r):
    return r["batch"] / r["total_s"] if r["side"] == "gtopk" else r["samples_per_s"]
print("| row | batch | gtopk samples/s | PyTorch samples/s | gtopk / PyTorch | rounds |")
print("|---|---:|---:|---:|---:|---:|")
for row in rows:
    g = [rate(r) for r in recs if r["row"] == row and r["side"] == "gtopk"]
    t = [rate(r) for r in recs if r["row"] == row and r["side"] == "torch"]
    if not g or not t:
        print(f"| {row} | - | missing | missing | - | 0 |")
        continue
    batch = next(r["batch"] for r in recs if r["row"] == row)
    mg, mt = statistics.median(g), statistics.median(t)
    print(f"| {row} | {batch} | {mg:.1f} | {mt:.1f} | {mg / mt:.2f}x | {min(len(g), len(t))} |")
print(f"\nraw JSON lines in {out}", file=sys.stderr)
EOF
