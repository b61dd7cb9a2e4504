#!/usr/bin/env python3
"""torch.topk on the vectors `gtopk gpu-check --dump DIR` timed, beside gtopk's own numbers, timed
the way gpu-check times ours.

Each DIR/x_<n>.f32 is n little-endian floats; k = max(1, floor(0.001 n)), the density gtopk's
timing uses. Selection is by magnitude, as ours. Two rows per size:

- `topk(|x|)`: torch.topk on |x| computed once beforehand, the selection alone;
- `abs + topk`: x.abs() then torch.topk in each call, the extra pass PyTorch needs (our kernels
  make the magnitude key inside their first pass).

Both are timed as gpu-check times ours: three warm-up calls, then `reps` samples, each a CUDA event
pair around `batch` calls queued back to back (batch chosen from a first call so that a sample holds
at least 200 us of GPU work, at most 1000 calls), the median per call. The comparison with ours is
against gpu-check's queued median (the same clock); its graph time, where there is one, is listed
beside. On a machine without CUDA it times on the CPU with perf_counter (a dry run, not a result).
Writes torch-topk.md/.json.
"""
import argparse
import json
import pathlib
import statistics
import sys
import time

MIN_SAMPLE_US = 200.0
MAX_BATCH = 1000


def timer(torch, dev):
    """us(f, batch): microseconds per call of `batch` calls of f queued back to back."""
    if dev == "cuda":
        def us(f, batch):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(batch):
                f()
            e.record()
            e.synchronize()
            return s.elapsed_time(e) * 1e3 / batch
    else:
        def us(f, batch):
            t0 = time.perf_counter()
            for _ in range(batch):
                f()
            return (time.perf_counter() - t0) * 1e6 / batch
    return us


def median_us(us, f, reps):
    """(median, batch) as gpu-check's queued timing: warm-up, batch from a first call, samples."""
    for _ in range(3):
        f()
    first = us(f, 1)
    batch = max(1, min(MAX_BATCH, int(-(-MIN_SAMPLE_US // max(first, 1e-3)))))
    return statistics.median(us(f, batch) for _ in range(max(1, reps))), batch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=pathlib.Path)
    ap.add_argument("--gtopk", type=pathlib.Path, help="kernels.json from gtopk gpu-check")
    ap.add_argument("--out", required=True, type=pathlib.Path)
    ap.add_argument("--reps", type=int, default=30)
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
                ours[row["n"]] = (row["median_us"], row.get("graph_us"))
    files = sorted(a.data.glob("x_*.f32"), key=lambda p: int(p.stem[2:]))
    if not files:
        print(f"torch_topk.py: no x_<n>.f32 files in {a.data}", file=sys.stderr)
        return 1
    us = timer(torch, dev)
    rows = []
    for f in files:
        x = torch.from_numpy(np.fromfile(f, dtype="<f4")).to(dev)
        n = x.numel()
        k = max(1, int(0.001 * n))
        mag = x.abs()
        plain, batch_plain = median_us(us, lambda: torch.topk(mag, k, sorted=False), a.reps)
        with_abs, batch_abs = median_us(us, lambda: torch.topk(x.abs(), k, sorted=False), a.reps)
        queued, graph = ours.get(n, (None, None))
        rows.append({
            "n": n, "k": k, "device": dev,
            "torch_topk_us": plain, "torch_topk_batch": batch_plain,
            "torch_abs_topk_us": with_abs, "torch_abs_topk_batch": batch_abs,
            "gtopk_select_us": queued, "gtopk_select_graph_us": graph,
        })
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (dry run: not a result)"
    fmt = lambda v: "-" if v is None else f"{v:.1f}"
    ratio = lambda t, g: f"{t / g:.2f}x" if g else "-"
    md = [
        f"## torch.topk vs gtopk select, density 0.001 ({name}, torch {torch.__version__})",
        "",
        "Both queued back to back between CUDA events, median per call, as gpu-check times ours. "
        "`topk(|x|)`: |x| computed once, the selection alone; `abs + topk`: the abs pass in every call. "
        "Ratios are torch over ours (queued); ours as a replayed graph beside.",
        "",
        "| n | k | topk(\\|x\\|) us | abs + topk us | gtopk select us | gtopk graph us | topk(\\|x\\|) / ours "
        "| abs + topk / ours |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        g = r["gtopk_select_us"]
        md.append(
            f"| {r['n']} | {r['k']} | {fmt(r['torch_topk_us'])} | {fmt(r['torch_abs_topk_us'])} | {fmt(g)} "
            f"| {fmt(r['gtopk_select_graph_us'])} | {ratio(r['torch_topk_us'], g)} "
            f"| {ratio(r['torch_abs_topk_us'], g)} |"
        )
    text = "\n".join(md) + "\n"
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "torch-topk.md").write_text(text)
    (a.out / "torch-topk.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
