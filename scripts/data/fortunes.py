#!/usr/bin/env python3
"""Debian's fortune quotations as a word-level corpus in Penn Treebank's format.

Input: the `%`-separated fortune files (default every plain file in /usr/share/games/fortunes,
from Debian's `fortunes` and `fortunes-min` packages; the `.dat` indexes and `.u8` links are
skipped), or --input FILE/DIR (repeatable; the tests use it). Standard library only.

Text as Mikolov's PTB (simple-examples) looks: one quotation per line (its lines joined), lower
case, ASCII (accents dropped), punctuation removed, contractions split the way the Treebank splits
them (`don't` -> `do n't`, `it's` -> `it 's`, `we're` -> `we 're`), every number as `N`, and words
outside the vocabulary as `<unk>`. The vocabulary: training words seen at least --min-count times
(default 2), the most frequent first, at most --vocab (default 10,000) counting `<unk>` and the
loader's `<eos>`, as PTB's. Terminal overstrike (`_\\bX`) is undone; a quotation that is mostly not
letters (ASCII art) or has fewer than 3 words is dropped, and so is a repeat of a quotation already
taken.

Split: each quotation's place is decided by sha256(seed, its text): the quotations sorted by that key
give the first 10% to test, the next 10% to valid and the rest to train, each kept in input order
(files by name, then position). Same input, same bytes; SHA256SUMS lists the three files and is
checked after writing.
"""

import argparse
import os
import re
import sys
import unicodedata

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import die, key, write_sums  # noqa: E402

DEFAULT_DIR = "/usr/share/games/fortunes"
FILES = ["ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"]
UNK = "<unk>"
EOS = "<eos>"
WORD = re.compile(r"[a-z0-9]+(?:['.,][a-z0-9]+)*(?:')?|'[a-z]+")
CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")


def input_files(paths):
    out = []
    for p in paths:
        if os.path.isdir(p):
            for name in sorted(os.listdir(p)):
                f = os.path.join(p, name)
                if name.endswith((".dat", ".u8")) or os.path.islink(f) or not os.path.isfile(f):
                    continue
                out.append(f)
        elif os.path.isfile(p):
            out.append(p)
        else:
            die("%s is neither a file nor a folder" % p)
    return out


def quotations(path):
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    text = re.sub(r".\x08", "", text)  # overstrike: `_\bX` and `X\bX` print as X
    return re.split(r"(?m)^%[ \t]*\r?$\n?", text)


def words(quote):
    """PTB-style tokens of one quotation, or [] when it should be dropped."""
    t = unicodedata.normalize("NFKD", quote).encode("ascii", "ignore").decode("ascii").lower()
    t = t.replace("`", "'")
    visible = [c for c in t if not c.isspace()]
    if not visible or sum(c.isalpha() for c in visible) < 0.6 * len(visible):
        return []
    out = []
    for w in WORD.findall(t):
        w = w.strip("'")
        if not w:
            continue
        if any(c.isdigit() for c in w):
            out.append("N")
            continue
        w = re.sub(r"[.,]", "", w)
        for c in CLITICS:
            if w.endswith(c) and len(w) > len(c):
                out += [w[: -len(c)], c]  # can't -> ca n't, won't -> wo n't: the Treebank's way
                break
        else:
            out.append(w)
    return out if len(out) >= 3 else []


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output folder (data.dir of configs/lstm_ptb_fortunes.toml)")
    ap.add_argument("--input", action="append", help="fortune file or folder (default %s)" % DEFAULT_DIR)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--min-count", type=int, default=2)
    a = ap.parse_args()

    paths = input_files(a.input or [DEFAULT_DIR])
    if not paths:
        die("no fortune files in %s (Debian: apt-get install fortunes fortunes-min)" % (a.input or [DEFAULT_DIR]))
    quotes, seen, dropped, dupes = [], set(), 0, 0
    for p in paths:
        for q in quotations(p):
            if not q.strip():
                continue
            w = words(q)
            if not w:
                dropped += 1
                continue
            line = " ".join(w)
            if line in seen:
                dupes += 1
                continue
            seen.add(line)
            quotes.append(w)
    if len(quotes) < 10:
        die("%d usable quotations: at least 10 are needed for a train/valid/test split" % len(quotes))

    order = sorted(range(len(quotes)), key=lambda i: key(a.seed, "fortunes", " ".join(quotes[i])))
    n_test = n_valid = max(1, len(quotes) // 10)
    split_of = {}
    for rank, i in enumerate(order):
        split_of[i] = 2 if rank < n_test else 1 if rank < n_test + n_valid else 0
    splits = [[quotes[i] for i in range(len(quotes)) if split_of[i] == s] for s in range(3)]

    counts = {}
    for q in splits[0]:
        for w in q:
            counts[w] = counts.get(w, 0) + 1
    ranked = sorted((w for w, c in counts.items() if c >= a.min_count and w != UNK), key=lambda w: (-counts[w], w))
    keep = set(ranked[: max(0, a.vocab - 2)])  # room for <unk> and the loader's <eos>
    lines = [[" ".join(w if w in keep else UNK for w in q) for q in s] for s in splits]
    if not any(UNK in l.split() for l in lines[0]):
        die("no training word fell out of the vocabulary, so <unk> is not a training word "
            "(valid/test words outside it would have no id): raise --min-count or lower --vocab")

    os.makedirs(a.out, exist_ok=True)
    for name, ls in zip(FILES, lines):
        # PTB's files start every line with a space and end it with " \n".
        with open(os.path.join(a.out, name), "w", encoding="ascii", newline="\n") as f:
            f.writelines(" %s \n" % l for l in ls)

    # Verify: every split has words, and every valid/test word is a training word (the loader's rule).
    vocab = set()
    for name, ls in zip(FILES, lines):
        with open(os.path.join(a.out, name), encoding="ascii") as f:
            got = f.read().split("\n")[:-1]
        if len(got) != len(ls) or not got:
            die("%s holds %d lines, expected %d" % (name, len(got), len(ls)))
        toks = {w for l in got for w in l.split()}
        if name == FILES[0]:
            vocab = toks
        elif not toks <= vocab:
            die("%s has words that are not training words: %s" % (name, sorted(toks - vocab)[:5]))
    write_sums(a.out, FILES)
    ntok = [sum(len(l.split()) + 1 for l in ls) for ls in lines]
    print("fortunes: %d files, %d quotations (%d dropped as art/short, %d repeats) -> "
          "train %d lines / %d tokens, valid %d / %d, test %d / %d (with <eos>); vocabulary %d "
          "with <unk> and <eos>; SHA256SUMS checked, in %s"
          % (len(paths), len(quotes), dropped, dupes, len(lines[0]), ntok[0], len(lines[1]), ntok[1],
             len(lines[2]), ntok[2], len(vocab) + 1, a.out))


if __name__ == "__main__":
    main()
