#!/usr/bin/env python3
"""torch.topk on the vectors `gtopk gpu-check --dump DIR` timed, beside gtopk's own numbers.

Each DIR/x_<n>.f32 is n little-endian floats; k = max(1, floor(0.001 n)), the density gtopk's
timing uses. torch.topk runs on |x| (selection by magnitude, as ours), timed with CUDA events after
three warm-up calls; the abs is included, as our key transform is. Writes torch-topk.md/.json.
"""
import argparse
import json
import pathlib
import statistics
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", required=True, type=pathlib.Path)
    ap.add_argument("--gtopk", type=pathlib.Path, help="kernels.json from gtopk gpu-check")
    ap.add_argument("--out", required=True, type=pathlib.Path)
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    try:
        import numpy as np
        import torch
    except ImportError as e:
        print(f"torch_topk.py: {e}; nothing to compare", file=sys.stderr)
        return 1
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ours = {}
    if a.gtopk and a.gtopk.exists():
        for row in json.loads(a.gtopk.read_text())["timings"]:
            if row["kernel"].startswith("select"):
                ours[row["n"]] = row["median_us"]
    files = sorted(a.data.glob("x_*.f32"), key=lambda p: int(p.stem[2:]))
    if not files:
        print(f"torch_topk.py: no x_<n>.f32 files in {a.data}", file=sys.stderr)
        return 1
    rows = []
    for f in files:
        x = torch.from_numpy(np.fromfile(f, dtype="<f4")).to(dev)
        n = x.numel()
        k = max(1, int(0.001 * n))
        times = []
        for i in range(3 + a.reps):
            if dev == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                torch.topk(x.abs(), k, sorted=False)
                e.record()
                e.synchronize()
                us = s.elapsed_time(e) * 1e3
            else:
                import time
                t0 = time.perf_counter()
                torch.topk(x.abs(), k, sorted=False)
                us = (time.perf_counter() - t0) * 1e6
            if i >= 3:
                times.append(us)
        med = statistics.median(times)
        rows.append({"n": n, "k": k, "device": dev, "torch_topk_us": med, "gtopk_select_us": ours.get(n)})
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    md = [f"## torch.topk(|x|, k) vs gtopk select, density 0.001 ({name}, torch {torch.__version__})", "",
          "| n | k | torch.topk us | gtopk select us | speedup |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        g = r["gtopk_select_us"]
        speed = f"{r['torch_topk_us'] / g:.2f}x" if g else "-"
        gs = f"{g:.1f}" if g else "-"
        md.append(f"| {r['n']} | {r['k']} | {r['torch_topk_us']:.1f} | {gs} | {speed} |")
    text = "\n".join(md) + "\n"
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "torch-topk.md").write_text(text)
    (a.out / "torch-topk.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
