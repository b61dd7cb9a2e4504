#!/usr/bin/env bash
# Fetches the data sets of the paper's workloads from their official sources into data/.
# Usage: scripts/get-data.sh cifar10 [DEST]      (DEST defaults to ./data)
set -euo pipefail

usage() {
  sed -n '2,3p' "$0" | sed 's/^# \{0,1\}//'
  echo "Data sets: cifar10"
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
  *)
    echo "unknown data set '$what'" >&2; usage >&2; exit 2 ;;
esac
