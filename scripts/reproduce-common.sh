# shellcheck shell=bash
# Shared by scripts/reproduce-fig1.sh and reproduce-fig2.sh (sourced, not run).
#
# Parses [--quick] [--full] [--steps N] [--workloads LIST] [--delta-every N] [OUT_DIR], picks the binary
# ($GTOPK, else `cargo run --release`), and maps each workload to its config: the paper's config
# when its data is under data/ (scripts/get-data.sh cifar10|ptb|an4), else the config of its real
# stand-in when that is there (scripts/get-data.sh digits|fortunes|spoken), else a synthetic one.

usage() {
    sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'
}

quick=0
full=0
steps=""
workloads=""
delta_every=""
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --full) full=1 ;;
        --steps) steps=$2; shift ;;
        --workloads) workloads=$2; shift ;;
        --delta-every) delta_every=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) out=$1 ;;
    esac
    shift
done
out=${out:-$default_out}
# --quick: the one workload that trains in about a minute on a laptop CPU.
if [ -z "$workloads" ]; then
    if [ "$quick" = 1 ]; then workloads=resnet20; else workloads=resnet20,vgg16,lstm-ptb,lstm-an4; fi
fi
delta_every=${delta_every:-$([ "$quick" = 1 ] && echo 4 || echo 50)}

if [ -n "${GTOPK:-}" ]; then
    gtopk() { "$GTOPK" "$@"; }
else
    gtopk() { cargo run --release --quiet -- "$@"; }
fi

# Sets `config` and `sets` (extra --set arguments) for workload $1. The first that is there wins:
# the paper's data set under data/ (scripts/get-data.sh cifar10|ptb|an4), else its real stand-in
# (scripts/get-data.sh digits|fortunes|spoken: data/digits, data/fortunes, data/spoken), else the
# synthetic stand-in generated from the seed.
pick_config() {
    sets=()
    case "$1" in
        resnet20|vgg16)
            if [ -f data/cifar-10-batches-bin/data_batch_1.bin ]; then
                config=configs/$1.toml
            elif [ -f data/digits/data_batch_1.bin ]; then
                config=configs/resnet20_digits.toml
                [ "$1" = vgg16 ] && sets+=(--set model.arch=vgg16)
            else
                config=configs/quickstart.toml
                # VGG-16's five poolings need CIFAR's 32x32 shape.
                [ "$1" = vgg16 ] && sets+=(--set model.arch=vgg16 --set data.synthetic_side=32)
            fi ;;
        lstm-ptb)
            if [ -d data/ptb ]; then config=configs/lstm_ptb.toml
            elif [ -f data/fortunes/ptb.train.txt ]; then config=configs/lstm_ptb_fortunes.toml
            else config=configs/lstm_ptb_synthetic.toml; fi ;;
        lstm-an4)
            if [ -d data/an4 ]; then config=configs/lstm_an4.toml
            elif [ -f data/spoken/an4_train_manifest.csv ]; then config=configs/lstm_an4_spoken.toml
            else config=configs/lstm_an4_synthetic.toml; fi ;;
        *) echo "error: --workloads: unknown workload $1 (resnet20, vgg16, lstm-ptb, lstm-an4)" >&2; exit 2 ;;
    esac
    echo "== $1: $config ${sets[*]}" >&2
    # --full: the paper's epochs on the stand-ins, whose configs are sized to fit an hour. A script
    # that sets paper_digits=1 (Fig. 1) gets them for ResNet-20 on the digits by default: its two
    # runs fit the hour there too, and the config's 60 epochs leave gTop-k's loss short of dense's
    # (docs/RESULTS.md). VGG-16 trains 6x slower, so it keeps the config's length.
    local paper=$full
    if [ "${paper_digits:-0}" = 1 ] && [ "$quick" = 0 ] && [ "$1" = resnet20 ] \
        && [ "$config" = configs/resnet20_digits.toml ]; then
        paper=1
    fi
    if [ "$paper" = 1 ]; then
        case "$config" in
            configs/resnet20_digits.toml)
                sets+=(--set train.epochs=140 --set train.warmup_epochs=10 --set 'train.lr_decay_epochs=[81,122]') ;;
            configs/lstm_ptb_fortunes.toml) sets+=(--set train.epochs=40) ;;
            configs/lstm_an4_spoken.toml) sets+=(--set train.epochs=80) ;;
            *) echo "== $1: --full changes nothing ($config is already the full run or synthetic)" ;;
        esac
    fi
    [ -n "$steps" ] && sets+=(--set "train.max_steps=$steps")
    sets+=(--set dist.workers=4 --set "sparse.delta_every=$delta_every")
}

# train NAME CONFIG ARGS...: one run into $out/NAME (skipped when it already finished).
train() {
    local name=$1; shift
    if [ -f "$out/$name/metrics.jsonl" ] && grep -q '"test_loss"' "$out/$name/metrics.jsonl"; then
        echo "== $name: done before, kept"
        return
    fi
    rm -rf "${out:?}/$name"
    echo "== $name: gtopk train $*"
    gtopk train "$@" --run-dir "$out/$name" --plain > "$out/$name.summary.json"
    cat "$out/$name.summary.json"
}

# figure OUT.svg RUN_DIR... [plot options]: the SVG, and a PNG beside it where rsvg-convert is
# installed (Debian: librsvg2-bin).
figure() {
    local svg=$1; shift
    gtopk plot "$@" --out "$svg"
    if command -v rsvg-convert >/dev/null; then
        rsvg-convert -w 1200 -b white "$svg" -o "${svg%.svg}.png"
    fi
}

