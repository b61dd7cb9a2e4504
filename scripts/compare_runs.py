#!/usr/bin/env python3
"""Runs side by side after the same epoch: a Markdown table of each run's training loss, its ratio
to the first run's, test loss, the task's test metric (accuracy, perplexity, or CER and WER) and
the mean delta, all from the epoch records of metrics.jsonl at the last epoch that every run
reached. Used by scripts/diagnose-gap.sh; plain Python, no deps.

    compare_runs.py RUN_DIR [RUN_DIR ...]

Exits 1, naming the file, when a run has no epoch record or its metrics.jsonl cannot be read.
"""
import json
import pathlib
import statistics
import sys

METRICS = [("test_accuracy", "test accuracy"), ("test_perplexity", "test perplexity"),
           ("test_cer", "test CER"), ("test_wer", "test WER")]


def records(run_dir: pathlib.Path):
    path = run_dir / "metrics.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    epochs = {r["epoch"]: r for r in recs if r.get("kind") == "epoch"}
    if not epochs:
        raise ValueError("no epoch record")
    deltas = {}
    for r in recs:
        if r.get("kind") == "step" and "delta" in r:
            deltas.setdefault(r["epoch"], []).append(r["delta"])
    return epochs, deltas


def main() -> int:
    dirs = [pathlib.Path(a) for a in sys.argv[1:]]
    if not dirs or any(a.startswith("-") for a in sys.argv[1:]):
        print(__doc__, file=sys.stderr)
        return 2
    runs = []
    for d in dirs:
        try:
            runs.append((d, *records(d)))
        except (OSError, ValueError, KeyError) as e:
            print(f"compare_runs.py: {d / 'metrics.jsonl'}: {e}", file=sys.stderr)
            return 1
    epoch = min(max(epochs) for _, epochs, _ in runs)
    shown = [(k, name) for k, name in METRICS if any(k in e[epoch] for _, e, _ in runs)]
    head = ["run", "train loss", "/ first run's", "test loss"] + [n for _, n in shown] + ["delta mean (all steps so far)"]
    print(f"After epoch {epoch} (the last that every run reached):\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    first = runs[0][1][epoch]["train_loss"]
    for d, epochs, deltas in runs:
        e = epochs[epoch]
        so_far = [x for ep, xs in deltas.items() if ep <= epoch for x in xs]
        row = [d.name, f"{e['train_loss']:.4g}", f"{e['train_loss'] / first:.2f}", f"{e['test_loss']:.4g}"]
        row += [f"{e[k]:.4g}" if k in e else "-" for k, _ in shown]
        row.append(f"{statistics.fmean(so_far):.4f}" if so_far else "-")
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
