#!/usr/bin/env python3
"""One line per run directory from its metrics.jsonl: loss at the first and last logged step,
whether it went down, median samples/s, and the median step split (seconds per step per worker:
compute, aggregation and its communication part, optimizer, and wait: blocked on other ranks outside
aggregation), beside a torch_step.py JSON line when given. Used by scripts/gpu-check.sh; plain Python, no deps.

    summarize_run.py RUN_DIR [--torch TORCH_JSON_FILE] [--reference RUN_DIR] [--comparison] [--out FILE.md]

--reference: another run of the same job (the host engine beside the device engine): the largest
difference of their losses over the steps both logged. The exit status is 1 when the loss did not
go down, unless --comparison (a run too short for that, kept for the comparison alone).
"""
import argparse
import json
import pathlib
import statistics
import sys


def step_records(run_dir: pathlib.Path):
    path = run_dir / "metrics.jsonl"
    try:
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        print(f"summarize_run.py: {path}: {e}", file=sys.stderr)
        return None
    return [r for r in recs if r.get("kind") == "step" and "loss" in r]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir", type=pathlib.Path)
    ap.add_argument("--torch", type=pathlib.Path, help="a file whose last line is torch_step.py's JSON")
    ap.add_argument("--reference", type=pathlib.Path, help="a run of the same job to compare losses with")
    ap.add_argument("--out", type=pathlib.Path)
    ap.add_argument("--comparison", action="store_true",
                    help="a short run kept for its comparison with --reference: exit 0 whether or not the loss went down")
    a = ap.parse_args()
    steps = step_records(a.run_dir)
    if steps is None:
        return 1
    if len(steps) < 2:
        print(f"summarize_run.py: {a.run_dir}: fewer than two step records", file=sys.stderr)
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
    if "wait" in split:
        lines.append(
            f"- wait {split['wait']:.4f}: blocked on the other ranks outside aggregation (their turns "
            "on a shared GPU, the agreement before each aggregation); not counted in aggregation or communication"
        )
    else:
        lines.append("- no wait field in these records (written before it existed): aggregation may include it")
    if a.reference:
        ref = step_records(a.reference) or []
        theirs = {r["step"]: r["loss"] for r in ref}
        common = [(r["step"], r["loss"], theirs[r["step"]]) for r in steps if r["step"] in theirs]
        if common:
            worst = max(common, key=lambda c: abs(c[1] - c[2]))
            lines.append(
                f"- against {a.reference.name}: {len(common)} common logged steps, largest loss difference "
                f"{abs(worst[1] - worst[2]):.3g} at step {worst[0]} ({worst[1]:.5f} vs {worst[2]:.5f})"
            )
        else:
            lines.append(f"- against {a.reference.name}: no common logged steps")
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
    return 0 if a.comparison or last["loss"] < first["loss"] else 1


if __name__ == "__main__":
    sys.exit(main())
