"""Shared by the data makers in scripts/data/: deterministic ordering, checksums. Stdlib only."""

import hashlib
import os
import sys


def key(seed, *parts):
    """A sort key that is the same on every machine and Python version (no RNG involved)."""
    text = "\x1f".join(str(p) for p in (seed,) + parts)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Rng:
    """splitmix64: a tiny generator whose sequence is fixed by this code, not by Python's version."""

    def __init__(self, seed):
        self.state = seed & 0xFFFFFFFFFFFFFFFF

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return z ^ (z >> 31)

    def below(self, n):
        return self.next() % n

    def choice(self, items):
        return items[self.below(len(items))]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_sums(out_dir, rel_paths):
    """Writes OUT/SHA256SUMS (sha256sum's format, sorted by path) over `rel_paths`, then checks it."""
    rel_paths = sorted(rel_paths)
    lines = ["%s  %s\n" % (sha256_file(os.path.join(out_dir, p)), p) for p in rel_paths]
    with open(os.path.join(out_dir, "SHA256SUMS"), "w", encoding="ascii", newline="\n") as f:
        f.writelines(lines)
    check_sums(out_dir)
    return len(lines)


def check_sums(out_dir):
    """Re-reads every file named in OUT/SHA256SUMS; exits non-zero on the first mismatch."""
    with open(os.path.join(out_dir, "SHA256SUMS"), encoding="ascii") as f:
        for line in f:
            want, rel = line.rstrip("\n").split("  ", 1)
            got = sha256_file(os.path.join(out_dir, rel))
            if got != want:
                die("checksum mismatch for %s: SHA256SUMS says %s, the file is %s" % (rel, want, got))


def die(msg):
    print("error: " + msg, file=sys.stderr)
    sys.exit(1)
