#!/usr/bin/env python3
"""scikit-learn's 1,797 handwritten 8x8 digits as CIFAR-10 binary files.

Each record: one label byte (0..9), then 3x32x32 pixel bytes, channel-major, as the CIFAR-10 binary
version (src/data/cifar.rs reads it unchanged): every 8x8 grey value (0..16) is scaled to 0..255
((v * 255 + 8) // 16), upsampled 4x by nearest neighbour (each pixel a 4x4 block) and copied into
the three channels.

Split: stratified and seeded without an RNG: within each class the images are ordered by
sha256(seed, index) and the first --test-per-class (default 30, so 300 of 1,797) go to
test_batch.bin; the remaining 1,497 are ordered by the same key and cut into data_batch_1..5.bin
(299, 299, 300, 299, 300). The output is the same bytes on every run; SHA256SUMS lists them and is
checked after writing.

Input: sklearn.datasets.load_digits() (the data ship inside the scikit-learn wheel, no download),
or --input CSV with rows `label,v0,...,v63` (values 0..16, row-major 8x8), which needs only the
standard library (the tests use it).
"""

import argparse
import csv
import os
import sys

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import die, key, write_sums  # noqa: E402

SIDE_IN = 8
SCALE = 4
SIDE = SIDE_IN * SCALE
CHANNELS = 3
RECORD = 1 + CHANNELS * SIDE * SIDE
TRAIN_FILES = ["data_batch_%d.bin" % i for i in range(1, 6)]
TEST_FILE = "test_batch.bin"


def from_sklearn():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        die("scikit-learn is not importable from %s (scripts/get-data.sh digits makes a venv with it; "
            "or pass --input CSV)" % sys.executable)
    d = load_digits()
    return [(int(y), [int(v) for v in x]) for x, y in zip(d.data, d.target)]


def from_csv(path):
    rows = []
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row:
                continue
            if len(row) != 1 + SIDE_IN * SIDE_IN:
                die("%s line %d: %d fields, expected a label and 64 values" % (path, n, len(row)))
            try:
                vals = [int(float(v)) for v in row]
            except ValueError:
                die("%s line %d: not a number" % (path, n))
            rows.append((vals[0], vals[1:]))
    return rows


def record(label, pixels):
    """The CIFAR-10 record of one 8x8 image: label byte, then 3 channels of the 32x32 upsampling."""
    grey = [(v * 255 + 8) // 16 for v in pixels]
    plane = bytearray()
    for r in range(SIDE):
        src = grey[(r // SCALE) * SIDE_IN:(r // SCALE + 1) * SIDE_IN]
        for v in src:
            plane.extend(bytes([v]) * SCALE)
    return bytes([label]) + bytes(plane) * CHANNELS


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output folder (data.dir of configs/resnet20_digits.toml and vgg16_digits.toml)")
    ap.add_argument("--input", help="CSV of label,64 values instead of scikit-learn")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--test-per-class", type=int, default=30)
    a = ap.parse_args()

    data = from_csv(a.input) if a.input else from_sklearn()
    if not data:
        die("no images in the input")
    for i, (y, px) in enumerate(data):
        if not 0 <= y <= 9:
            die("image %d has label %d, expected 0..9" % (i, y))
        if len(px) != 64 or any(not 0 <= v <= 16 for v in px):
            die("image %d: expected 64 values in 0..16" % i)

    by_class = {}
    for i, (y, _) in enumerate(data):
        by_class.setdefault(y, []).append(i)
    test, train = [], []
    for y in sorted(by_class):
        idx = sorted(by_class[y], key=lambda i: key(a.seed, "digits", i))
        if len(idx) <= a.test_per_class:
            die("class %d has %d images: not more than --test-per-class %d" % (y, len(idx), a.test_per_class))
        test += idx[:a.test_per_class]
        train += idx[a.test_per_class:]
    test.sort(key=lambda i: key(a.seed, "digits", i))
    train.sort(key=lambda i: key(a.seed, "digits", i))
    if len(train) < len(TRAIN_FILES):
        die("%d training images cannot fill %d files" % (len(train), len(TRAIN_FILES)))

    os.makedirs(a.out, exist_ok=True)
    chunks = [train[k * len(train) // 5:(k + 1) * len(train) // 5] for k in range(5)]
    written = {}
    for name, idx in list(zip(TRAIN_FILES, chunks)) + [(TEST_FILE, test)]:
        with open(os.path.join(a.out, name), "wb") as f:
            for i in idx:
                f.write(record(*data[i]))
        written[name] = len(idx)

    # Verify: sizes are whole records, the counts add up, every label is a digit.
    for name, n in written.items():
        with open(os.path.join(a.out, name), "rb") as f:
            b = f.read()
        if len(b) != n * RECORD or any(b[k * RECORD] > 9 for k in range(n)):
            die("%s does not hold %d records of %d bytes" % (name, n, RECORD))
    if sum(written.values()) != len(data):
        die("wrote %d records of %d images" % (sum(written.values()), len(data)))
    write_sums(a.out, list(written))
    print("digits: %d images -> %d train (%s) + %d test, %d bytes each, SHA256SUMS checked, in %s"
          % (len(data), len(train), " + ".join(str(written[f]) for f in TRAIN_FILES), len(test),
             RECORD, a.out))


if __name__ == "__main__":
    main()
