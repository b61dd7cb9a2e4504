#!/usr/bin/env python3
"""Tables of a scripts/netbench.sh run: usage: netbench_report.py OUT_DIR [OUT_DIR ...].

Per rate and size: each scheme's communication seconds per step (median over steps of the
slowest rank, timed from a barrier) beside its floor (the critical path's bytes over the rate)
and beside the alpha-beta model fitted to the same links; then which scheme is fastest at each
P. Plain Python, no packages.
"""

import json
import re
import sys
from pathlib import Path

SCHEMES = ["dense", "gloo-dense", "topk", "gtopk-tree", "gtopk-rd"]
NAMES = {269722: "ResNet-20", 14728266: "VGG-16", 6182672: "fortunes LM"}


def rate_bytes(rate):
    """Bytes per second of a tc rate (100mbit, 1gbit, 2.5gbit) or of a plain number of bytes/s."""
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)(tbit|gbit|mbit|kbit|bit)?", rate.strip().lower())
    if not m:
        raise ValueError(f"{rate!r} is not a rate like 100mbit or 1gbit")
    mult = {"tbit": 1e12, "gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1, None: 8}[m.group(2)]
    return float(m.group(1)) * mult / 8


def load(dirs):
    rows, fits, hosts = [], {}, []
    for d in dirs:
        d = Path(d)
        rows += [json.loads(l) for l in (d / "comm.jsonl").read_text().splitlines() if l.strip()]
        for l in (d / "p2p.jsonl").read_text().splitlines():
            r = json.loads(l)
            if "fit" in r:
                fits[r["rate"]] = r["fit"]
        if (d / "host.txt").exists():
            hosts.append((d.name, (d / "host.txt").read_text().strip()))
    return rows, fits, hosts


def ms(x):
    return "-" if x is None else (f"{x * 1e3:.1f}" if x >= 0.01 else f"{x * 1e3:.2f}")


def cell(r, key):
    if r is None:
        return "-"
    ref = r.get(key)
    return f"{ms(r['comm_s'])} ({r['comm_s'] / ref:.2f}x)" if ref else ms(r["comm_s"])


def main(dirs):
    rows, fits, hosts = load(dirs)
    out = []
    for name, h in hosts:
        out.append(f"Run `{name}`:\n\n```\n{h}\n```\n")
    rates = sorted({r["rate"] for r in rows}, key=rate_bytes)
    sizes = sorted({r["d"] for r in rows})
    for rate in rates:
        fit = fits.get(rate)
        fit_s = (f"; fitted alpha = {fit['alpha'] * 1e6:.0f} us, 1/beta = {1 / fit['beta'] / 1e6:.1f} MB/s"
                 if fit and fit["beta"] > 0 else "")
        for d in sizes:
            sel = [r for r in rows if r["rate"] == rate and r["d"] == d]
            if not sel:
                continue
            k = next((r["k"] for r in sel if r["scheme"] != "dense" and r["scheme"] != "gloo-dense"), None)
            out.append(f"#### {rate}, d = {d:,} ({NAMES.get(d, 'custom')}), k = {k}{fit_s}\n")
            out.append("Communication ms per step (x its floor: critical-path bytes / rate):\n")
            out.append("| P | " + " | ".join(SCHEMES) + " | fastest |")
            out.append("|---:|" + "---:|" * len(SCHEMES) + "---|")
            ps = sorted({r["workers"] for r in sel})
            model_lines = []
            for p in ps:
                by = {r["scheme"]: r for r in sel if r["workers"] == p}
                cand = {s: by[s]["comm_s"] for s in SCHEMES if s in by}
                best = min(cand, key=cand.get) if cand else "-"
                out.append(f"| {p} | " + " | ".join(cell(by.get(s), "floor_s") for s in SCHEMES) + f" | {best} |")
                model_lines.append(
                    f"| {p} | " + " | ".join(cell(by.get(s), "model_s") for s in SCHEMES if s != "gloo-dense") + " |")
            out.append("")
            if any("model_s" in r for r in sel):
                out.append("Measured ms per step (x the fitted alpha-beta model's prediction):\n")
                cols = [s for s in SCHEMES if s != "gloo-dense"]
                out.append("| P | " + " | ".join(cols) + " |")
                out.append("|---:|" + "---:|" * len(cols))
                out += model_lines
                out.append("")
    print("\n".join(out))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
