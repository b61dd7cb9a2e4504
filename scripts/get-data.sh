#!/usr/bin/env bash
# Fetches the data sets of the paper's workloads from their official sources into data/.
# Usage: scripts/get-data.sh cifar10|ptb|an4 [DEST]      (DEST defaults to ./data)
set -euo pipefail

usage() {
  sed -n '2,3p' "$0" | sed 's/^# \{0,1\}//'
  echo "Data sets: cifar10 (CIFAR-10 binary), ptb (Mikolov's PTB text), an4 (CMU AN4 as 16 kHz WAVs"
  echo "with deepspeech.pytorch's manifests; needs sox)"
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
  *)
    echo "unknown data set '$what'" >&2; usage >&2; exit 2 ;;
esac
