# shellcheck shell=bash
# Shared by scripts/reproduce-fig1.sh and reproduce-fig2.sh (sourced, not run).
#
# Parses [--quick] [--full] [--dry-run] [--steps N] [--workloads LIST] [--delta-every N] [OUT_DIR],
# picks the binary ($GTOPK, else `cargo run --release`), and maps each workload to its config: the
# paper's config when its data is under $DATA_DIR (default data/; scripts/get-data.sh
# cifar10|ptb|an4), else the config of its real stand-in when that is there (scripts/get-data.sh
# digits|fortunes|spoken), else a synthetic one.

usage() {
    sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'
}

quick=0
full=0
dry_run=0
steps=""
workloads=""
delta_every=""
out=""
# value OPTION "$@": the option's argument, or an error naming the option.
value() {
    [ $# -ge 2 ] && [ -n "$2" ] || { echo "error: $1 needs a value" >&2; usage >&2; exit 2; }
    printf '%s' "$2"
}
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --full) full=1 ;;
        --dry-run) dry_run=1 ;;
        --steps) steps=$(value "$@"); shift ;;
        --workloads) workloads=$(value "$@"); shift ;;
        --delta-every) delta_every=$(value "$@"); shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) out=$1 ;;
    esac
    shift
done
out=${out:-$default_out}
data=${DATA_DIR:-data}
[ "$dry_run" = 1 ] || mkdir -p "$out"
# --quick: the one workload that trains in about a minute on a laptop CPU.
if [ -z "$workloads" ]; then
    if [ "$quick" = 1 ]; then workloads=resnet20
    else workloads=${default_workloads:-resnet20,vgg16,lstm-ptb,lstm-an4}; fi
fi
# Every workload is checked before the first run starts: a typo ends the script at once.
IFS=, read -ra list <<< "$workloads"
for w in "${list[@]}"; do
    case "$w" in
        resnet20|vgg16|lstm-ptb|lstm-an4) ;;
        *) echo "error: --workloads: unknown workload '$w' (resnet20, vgg16, lstm-ptb, lstm-an4)" >&2; exit 2 ;;
    esac
done
delta_every=${delta_every:-$([ "$quick" = 1 ] && echo 4 || echo 50)}

if [ -n "${GTOPK:-}" ]; then
    gtopk() { "$GTOPK" "$@"; }
else
    gtopk() { cargo run --release --quiet -- "$@"; }
fi

# Sets `config` and `sets` (extra --set arguments) for workload $1. The first that is there wins:
# the paper's data set under $data (scripts/get-data.sh cifar10|ptb|an4), else its real stand-in
# (scripts/get-data.sh digits|fortunes|spoken: $data/digits, $data/fortunes, $data/spoken), else the
# synthetic stand-in generated from the seed. The configs read data/...: another $DATA_DIR is
# passed on as data.dir.
pick_config() {
    sets=()
    local dir=""
    case "$1" in
        resnet20|vgg16)
            if [ -f "$data/cifar-10-batches-bin/data_batch_1.bin" ]; then
                config=configs/$1.toml dir=$data/cifar-10-batches-bin
            elif [ -f "$data/digits/data_batch_1.bin" ]; then
                config=configs/$1_digits.toml dir=$data/digits
            else
                config=configs/quickstart.toml
                # VGG-16's five poolings need CIFAR's 32x32 shape.
                [ "$1" = vgg16 ] && sets+=(--set model.arch=vgg16 --set data.synthetic_side=32)
            fi ;;
        lstm-ptb)
            if [ -d "$data/ptb" ]; then config=configs/lstm_ptb.toml dir=$data/ptb
            elif [ -f "$data/fortunes/ptb.train.txt" ]; then config=configs/lstm_ptb_fortunes.toml dir=$data/fortunes
            else config=configs/lstm_ptb_synthetic.toml; fi ;;
        lstm-an4)
            if [ -d "$data/an4" ]; then config=configs/lstm_an4.toml dir=$data/an4
            elif [ -f "$data/spoken/an4_train_manifest.csv" ]; then config=configs/lstm_an4_spoken.toml dir=$data/spoken
            else config=configs/lstm_an4_synthetic.toml; fi ;;
        *) echo "error: --workloads: unknown workload $1 (resnet20, vgg16, lstm-ptb, lstm-an4)" >&2; exit 2 ;;
    esac
    [ -n "$dir" ] && [ "$data" != data ] && sets+=(--set "data.dir=$dir")
    echo "== $1: $config ${sets[*]}" >&2
    # The stand-ins' configs are sized so that Fig. 2's four runs fit an hour on 2 cores. Fig. 1
    # (a script that sets fig1=1) has two runs, so it gets twice the steps where that fits the hour
    # too: ResNet-20 on the digits the paper's 140 epochs and schedule (the config's 60 leave
    # gTop-k's loss short of dense's, docs/RESULTS.md); the spoken set 22 epochs. The fortunes
    # keep their 10 and VGG-16 on the digits its 36 (both figures fit the hour at those). --full:
    # the paper's epochs on every stand-in.
    local long=""
    if [ "$full" = 1 ]; then
        case "$config" in
            configs/resnet20_digits.toml | configs/vgg16_digits.toml) long=paper ;;
            configs/lstm_ptb_fortunes.toml) long=40 ;;
            configs/lstm_an4_spoken.toml) long=80 ;;
            *) echo "== $1: --full changes nothing ($config is already the full run or synthetic)" ;;
        esac
    elif [ "${fig1:-0}" = 1 ] && [ "$quick" = 0 ]; then
        case "$config:$1" in
            configs/resnet20_digits.toml:resnet20) long=paper ;;
            configs/lstm_an4_spoken.toml:*) long=22 ;;
        esac
    fi
    case "$long" in
        "") ;;
        paper) sets+=(--set train.epochs=140 --set train.warmup_epochs=10 --set 'train.lr_decay_epochs=[81,122]') ;;
        *) sets+=(--set "train.epochs=$long") ;;
    esac
    [ -n "$steps" ] && sets+=(--set "train.max_steps=$steps")
    sets+=(--set dist.workers=4 --set "sparse.delta_every=$delta_every")
}

# train NAME CONFIG ARGS...: one run into $out/NAME. A run that finished is kept: its summary,
# which gtopk train prints when the run has ended, names the run directory. A run cut short after a
# checkpoint (Ctrl-C, a lost machine) resumes from its newest one; anything else starts afresh. A
# run cut short must never be drawn as if it had finished.
train() {
    local name=$1 config=$2; shift 2
    local dir=$out/$name summary=$out/$name.summary.json
    if grep -qs '"run_dir"' "$summary"; then
        echo "== $name: done before, kept"
        return
    fi
    local where=(--run-dir "$dir")
    compgen -G "$dir/checkpoints/step-*" >/dev/null && where=(--resume "$dir")
    echo "== $name: gtopk train $config $* ${where[*]}"
    [ "$dry_run" = 1 ] && return
    [ "${where[0]}" = --run-dir ] && rm -rf "${dir:?}"
    gtopk train "$config" "$@" "${where[@]}" --plain > "$summary"
    cat "$summary"
}

# figure OUT.svg RUN_DIR... [plot options]: the SVG, and a PNG beside it where rsvg-convert is
# installed (Debian: librsvg2-bin); where it is not, says so rather than leave the PNG missing
# without a word.
figure() {
    local svg=$1; shift
    echo "== figure: gtopk plot $* --out $svg"
    [ "$dry_run" = 1 ] && return
    gtopk plot "$@" --out "$svg"
    if command -v rsvg-convert >/dev/null; then
        rsvg-convert -w 1200 -b white "$svg" -o "${svg%.svg}.png"
    else
        echo "note: no PNG of $svg: rsvg-convert is not installed (Debian/Ubuntu: apt install librsvg2-bin); the SVG opens in any browser" >&2
    fi
}
