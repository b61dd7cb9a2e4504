#!/usr/bin/env python3
"""One line per run directory from its metrics.jsonl: loss at the first and last logged step,
whether it went down, median samples/s, and the median step split (seconds per step per worker),
beside a torch_step.py JSON line when given. Used by scripts/gpu-check.sh; plain Python, no deps.

    summarize_run.py RUN_DIR [--torch TORCH_JSON_FILE] [--out FILE.md]
"""
import argparse
import json
import pathlib
import statistics
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir", type=pathlib.Path)
    ap.add_argument("--torch", type=pathlib.Path, help="a file whose last line is torch_step.py's JSON")
    ap.add_argument("--out", type=pathlib.Path)
    a = ap.parse_args()
    path = a.run_dir / "metrics.jsonl"
    try:
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        print(f"summarize_run.py: {path}: {e}", file=sys.stderr)
        return 1
    steps = [r for r in recs if r.get("kind") == "step" and "loss" in r]
    if len(steps) < 2:
        print(f"summarize_run.py: {path}: fewer than two step records", file=sys.stderr)
        return 1
    first, last = steps[0], steps[-1]
    # The first window includes start-up (CUDA context, cuDNN autotuning); leave it out of speeds.
    steady = steps[1:]
    sps = statistics.median(r["samples_per_s"] for r in steady)
    split = {}
    for key in steady[-1].get("time", {}):
        vals = [r["time"][key] for r in steady if isinstance(r.get("time", {}).get(key), (int, float))]
        if vals:
            split[key] = statistics.median(vals)
    lines = [
        f"## {a.run_dir.name}",
        "",
        f"- loss: {first['loss']:.4f} at step {first['step']} -> {last['loss']:.4f} at step {last['step']}"
        f" ({'down' if last['loss'] < first['loss'] else 'NOT down'})",
        f"- samples/s (median over logged windows after the first): {sps:.0f}",
        "- step split, median seconds per step per worker: "
        + ", ".join(f"{k} {v:.4f}" for k, v in split.items()),
    ]
    if a.torch and a.torch.exists():
        try:
            t = json.loads(a.torch.read_text().strip().splitlines()[-1])
            lines.append(f"- PyTorch eager, same model, batch and workers: {json.dumps(t)}")
        except (IndexError, json.JSONDecodeError) as e:
            lines.append(f"- PyTorch result unreadable: {e}")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with a.out.open("a") as f:
            f.write(text + "\n")
    return 0 if last["loss"] < first["loss"] else 1


if __name__ == "__main__":
    sys.exit(main())
