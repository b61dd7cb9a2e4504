#!/usr/bin/env bash
# Communication alone, measured on the network lab (scripts/netlab.sh): every scheme at every P,
# rate and size, each rank on a host of its own, beside its floor and the alpha-beta model fitted
# to the same links; dense also through torch.distributed's Gloo.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/netbench.sh [options] [OUT_DIR]

  --workers LIST   numbers of hosts P (default 2,3,4,8,16)
  --rates LIST     link rates, tc's words (default 100mbit,1gbit)
  --sizes LIST     vector sizes d (default 269722,14728266,6182672: ResNet-20, VGG-16, the
                   fortunes LM)
  --density X      k = floor(X d) (default 0.001)
  --steps N        timed steps per row after one warm-up (default 5)
  --gloo           dense through torch.distributed's Gloo too (a venv with torch: .torch-venv,
                   made on first use as bench-vs-torch.sh does, or TORCH_PYTHON)
  --burst BYTES    the tbf bucket (default: netlab.sh's, 2 ms of line rate)

Writes OUT_DIR (default runs/netbench-<UTC time>): comm.jsonl (one row per scheme, P, rate and
size), p2p.jsonl (the ping-pong and the fitted alpha and beta per rate), checks.txt (the lab's
shaping checks), host.txt (CPU, load, commit), and report.md (the tables,
scripts/netbench_report.py). Needs root (the lab) and a release build (cargo build --release).
EOF
}

die() {
    echo "netbench.sh: $*" >&2
    exit 2
}

cd "$(dirname "$0")/.."
workers=2,3,4,8,16
rates=100mbit,1gbit
sizes=269722,14728266,6182672
density=0.001
steps=5
gloo=0
burst=()
out=""
while (($# > 0)); do
    case "$1" in
        --workers) workers=${2:?--workers needs a list}; shift 2 ;;
        --rates) rates=${2:?--rates needs a list}; shift 2 ;;
        --sizes) sizes=${2:?--sizes needs a list}; shift 2 ;;
        --density) density=${2:?--density needs a number}; shift 2 ;;
        --steps) steps=${2:?--steps needs a number}; shift 2 ;;
        --gloo) gloo=1; shift ;;
        --burst) burst=(--burst "${2:?--burst needs bytes}"); shift 2 ;;
        -h | --help) usage; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) out=$1; shift ;;
    esac
done
[[ $workers =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--workers '$workers': expected numbers like 2,4,8"
IFS=, read -ra P_LIST <<<"$workers"
IFS=, read -ra RATE_LIST <<<"$rates"
maxp=0
for p in "${P_LIST[@]}"; do
    ((p >= 2)) || die "--workers: P = $p, at least 2 hosts"
    ((p > maxp)) && maxp=$p
done
bin=target/release/gtopk
[[ -x $bin ]] || die "no $bin: cargo build --release first"
out=${out:-runs/netbench-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$out"
out=$(cd "$out" && pwd)

py=""
if ((gloo)); then
    py=${TORCH_PYTHON:-.torch-venv/bin/python}
    if ! "$py" -c "import torch" 2>/dev/null; then
        [[ -z ${TORCH_PYTHON:-} ]] || die "TORCH_PYTHON=$TORCH_PYTHON has no torch"
        echo "netbench: installing torch into .torch-venv (PyPI; a few GB)" >&2
        python3 -m venv .torch-venv
        .torch-venv/bin/pip install --quiet torch numpy
    fi
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores"
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$out/host.txt"
: >"$out/comm.jsonl"
: >"$out/p2p.jsonl"
: >"$out/checks.txt"

lab=scripts/netlab.sh
trap '$lab down; exit 130' INT TERM
trap '$lab down' EXIT
$lab up "$maxp" "${RATE_LIST[0]}" "${burst[@]}" 2>&1 | tee -a "$out/checks.txt"

port=29600
# The ranks run at a higher priority than anything else on the machine (a build beside them would
# otherwise add scheduling delays of milliseconds to every message): NETBENCH_NICE, default -10.
prio=${NETBENCH_NICE:--10}
# Runs one job of P ranks, rank H on host H; rank 0's stdout goes to $1, every rank's stderr to
# $out/last-err.H. Fails naming the first rank that failed.
job() {
    local dest=$1 p=$2
    shift 2
    port=$((port + 1))
    local pids=() h
    for ((h = 0; h < p; h++)); do
        nice -n "$prio" $lab run "$h" env RANK="$h" WORLD_SIZE="$p" LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 \
            MASTER_ADDR="$($lab addr 0)" MASTER_PORT="$port" RAYON_NUM_THREADS=1 OMP_NUM_THREADS=1 \
            GLOO_SOCKET_IFNAME=eth0 "$@" >"$out/last-out.$h" 2>"$out/last-err.$h" &
        pids+=($!)
    done
    local failed=""
    for ((h = 0; h < p; h++)); do
        wait "${pids[$h]}" || failed=${failed:-$h}
    done
    if [[ -n $failed ]]; then
        echo "netbench: rank $failed of $p failed running: $*" >&2
        sed 's/^/  /' "$out/last-err.$failed" >&2
        return 1
    fi
    cat "$out/last-out.0" >"$dest"
}

# Adds the run's context to each JSON line.
tag() {
    python3 -c '
import json, sys
extra = json.loads(sys.argv[1])
for line in open(sys.argv[2]):
    line = line.strip()
    if line:
        print(json.dumps({**json.loads(line), **extra}))
' "$1" "$2"
}

for rate in "${RATE_LIST[@]}"; do
    $lab rate "$rate" "${burst[@]}"
    $lab check 2>&1 | tee -a "$out/checks.txt"
    bps=$(python3 -c "import sys; sys.path.insert(0, 'scripts'); from netbench_report import rate_bytes; print(rate_bytes(sys.argv[1]))" "$rate")
    job "$out/p2p.tmp" 2 "$bin" bench p2p-rank --sizes 8,1k,10k,100k,1m,10m --reps 10
    tag "{\"rate\": \"$rate\"}" "$out/p2p.tmp" >>"$out/p2p.jsonl"
    read -r alpha beta < <(python3 -c '
import json, sys
fit = [json.loads(l)["fit"] for l in open(sys.argv[1]) if "fit" in l][-1]
print(fit["alpha"], fit["beta"])' "$out/p2p.tmp")
    echo "netbench: $rate: fitted alpha $alpha s, beta $beta s/byte" >&2
    for p in "${P_LIST[@]}"; do
        echo "netbench: $rate, P = $p: gtopk's schemes ($(cut -d' ' -f1 /proc/loadavg) load)" >&2
        job "$out/rows.tmp" "$p" "$bin" bench comm-rank --sizes "$sizes" --density "$density" \
            --steps "$steps" --rate "$bps" --alpha "$alpha" --beta "$beta"
        tag "{\"rate\": \"$rate\", \"load\": $(cut -d' ' -f1 /proc/loadavg)}" "$out/rows.tmp" >>"$out/comm.jsonl"
        if ((gloo)); then
            echo "netbench: $rate, P = $p: Gloo all_reduce" >&2
            job "$out/rows.tmp" "$p" "$py" scripts/gloo_allreduce.py --sizes "$sizes" --steps "$steps" --rate "$bps"
            tag "{\"rate\": \"$rate\", \"load\": $(cut -d' ' -f1 /proc/loadavg)}" "$out/rows.tmp" >>"$out/comm.jsonl"
        fi
    done
done
rm -f "$out"/rows.tmp "$out"/p2p.tmp "$out"/last-out.* "$out"/last-err.*
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$out/host.txt"
python3 scripts/netbench_report.py "$out" | tee "$out/report.md"
