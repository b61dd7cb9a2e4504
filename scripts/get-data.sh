#!/usr/bin/env bash
# Fetches the data sets of the paper's workloads from their official sources into data/, or makes
# real stand-ins from what the package registries give a fresh machine.
# Usage: scripts/get-data.sh cifar10|ptb|an4|digits|fortunes|spoken [DEST]   (DEST defaults to ./data)
set -euo pipefail

usage() {
  sed -n '4p' "$0" | sed 's/^# \{0,1\}//'
  echo "The paper's sets, from their official sources:"
  echo "  cifar10   CIFAR-10 binary -> DEST/cifar-10-batches-bin"
  echo "  ptb       Mikolov's PTB text -> DEST/ptb"
  echo "  an4       CMU AN4 as 16 kHz WAVs with deepspeech.pytorch's manifests (needs sox) -> DEST/an4"
  echo "Real stand-ins in the same formats, for machines that reach only PyPI and Debian:"
  echo "  digits    scikit-learn's 1,797 8x8 digits as CIFAR-10 binary (32x32, 1,497 train / 300 test;"
  echo "            scikit-learn goes into DEST/.venv-digits) -> DEST/digits"
  echo "  fortunes  Debian's fortunes quotations as PTB text (apt-get install fortunes fortunes-min"
  echo "            when root) -> DEST/fortunes"
  echo "  spoken    AN4-style utterances spoken by espeak-ng (apt-get install espeak-ng sox when root),"
  echo "            1000 train (8 voices) / 130 test (2 other voices) -> DEST/spoken"
}

maker() { # the Python maker of a stand-in set
  printf '%s/data/%s.py' "$(cd "$(dirname "$0")" && pwd)" "$1"
}

# apt_need PACKAGE... : installs the Debian packages when root, else says what to run.
apt_need() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" || {
      apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"; }
  else
    echo "error: $what needs the Debian packages $* (as root: apt-get install $*)" >&2
    exit 1
  fi
}

need_python() {
  command -v python3 >/dev/null || { echo "error: $what needs python3" >&2; exit 1; }
}

[ $# -ge 1 ] || { usage; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; esac
what=$1
dest=${2:-data}
mkdir -p "$dest"

fetch() { # url file
  if command -v curl >/dev/null; then curl -fL --retry 3 -o "$2" "$1"; else wget -O "$2" "$1"; fi
}

case "$what" in
  cifar10)
    url=https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz
    md5=c32a1d4ab5d03f1284b67883e8d87530
    tmp="$dest/cifar-10-binary.tar.gz"
    fetch "$url" "$tmp"
    echo "$md5  $tmp" | md5sum -c -
    tar -xzf "$tmp" -C "$dest"
    rm -f "$tmp"
    echo "CIFAR-10 is in $dest/cifar-10-batches-bin (data.dir in configs/resnet20.toml)"
    ;;
  ptb)
    url=http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz
    tmp="$dest/simple-examples.tgz"
    fetch "$url" "$tmp"
    mkdir -p "$dest/ptb"
    tar -xzf "$tmp" -C "$dest" ./simple-examples/data/ptb.train.txt ./simple-examples/data/ptb.valid.txt \
      ./simple-examples/data/ptb.test.txt
    mv "$dest"/simple-examples/data/ptb.*.txt "$dest/ptb/"
    rm -rf "$tmp" "$dest/simple-examples"
    echo "PTB is in $dest/ptb (data.dir in configs/lstm_ptb.toml)"
    ;;
  an4)
    command -v sox >/dev/null || { echo "an4 needs sox (apt-get install sox) to turn the raw audio into WAV" >&2; exit 1; }
    url=http://www.speech.cs.cmu.edu/databases/an4/an4_raw.bigendian.tar.gz
    tmp="$dest/an4_raw.bigendian.tar.gz"
    fetch "$url" "$tmp"
    tar -xzf "$tmp" -C "$dest"
    out="$dest/an4"
    # As deepspeech.pytorch's an4 script: 16-bit big-endian raw -> WAV, transcripts without the
    # <s> </s> tags and the utterance id, one manifest row per utterance (wav_path,txt_path).
    for split in train test; do
      case $split in train) wavdir=an4_clstk; manifest=an4_train_manifest.csv ;;
                     test) wavdir=an4test_clstk; manifest=an4_val_manifest.csv ;; esac
      mkdir -p "$out/$split/wav" "$out/$split/txt"
      : > "$out/$manifest"
      while IFS= read -r line; do
        id=$(sed -E 's/.*\(([^)]*)\).*/\1/' <<<"$line")
        text=$(sed -E 's/\([^)]*\)//; s#</?s>##g; s/^ +//; s/ +$//' <<<"$line")
        speaker=$(cut -d- -f2 <<<"$id")
        sox -t raw -r 16000 -b 16 -e signed-integer -B -c 1 "$dest/an4/wav/$wavdir/$speaker/$id.raw" \
          "$out/$split/wav/$id.wav"
        printf '%s\n' "$text" > "$out/$split/txt/$id.txt"
        echo "$split/wav/$id.wav,$split/txt/$id.txt" >> "$out/$manifest"
      done < "$dest/an4/etc/an4_$split.transcription"
    done
    rm -f "$tmp"
    echo "AN4 is in $out (data.dir in configs/lstm_an4.toml)"
    ;;
  digits)
    need_python
    venv="$dest/.venv-digits"
    if ! "$venv/bin/python" -c 'import sklearn' 2>/dev/null; then
      python3 -m venv "$venv" || { echo "error: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 1; }
      "$venv/bin/pip" install -q "scikit-learn>=1.0"
    fi
    "$venv/bin/python" "$(maker digits)" "$dest/digits"
    (cd "$dest/digits" && sha256sum -c --quiet SHA256SUMS)
    echo "Run: gtopk train configs/resnet20_digits.toml   (or vgg16_digits.toml; data.dir = $dest/digits)"
    ;;
  fortunes)
    need_python
    [ -f /usr/share/games/fortunes/fortunes ] || apt_need fortunes fortunes-min
    python3 "$(maker fortunes)" "$dest/fortunes"
    (cd "$dest/fortunes" && sha256sum -c --quiet SHA256SUMS)
    echo "Run: gtopk train configs/lstm_ptb_fortunes.toml   (data.dir = $dest/fortunes)"
    ;;
  spoken)
    need_python
    missing=()
    espeak=${ESPEAK:-espeak-ng}
    command -v "${espeak%% *}" >/dev/null || missing+=(espeak-ng)
    command -v sox >/dev/null || missing+=(sox)
    if [ ${#missing[@]} -gt 0 ]; then
      if [ "${missing[*]}" = sox ] && [ "$(id -u)" != 0 ]; then
        echo "note: no sox; resampling 22050 -> 16000 Hz by linear interpolation instead" >&2
      else
        apt_need "${missing[@]}"
      fi
    fi
    python3 "$(maker spoken)" "$dest/spoken"
    (cd "$dest/spoken" && sha256sum -c --quiet SHA256SUMS)
    echo "Run: gtopk train configs/lstm_an4_spoken.toml   (data.dir = $dest/spoken)"
    ;;
  *)
    echo "unknown data set '$what'" >&2; usage >&2; exit 2 ;;
esac
