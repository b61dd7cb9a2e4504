#!/usr/bin/env python3
"""One rank of torch.distributed's Gloo all_reduce, timed as `gtopk bench comm-rank` times dense:
fresh normal float32 values, one warm-up, then per step a barrier and the all_reduce alone; a
step's time is its slowest rank's. Rank 0 prints one JSON line per size.

Run with torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) in a Python that has
torch (scripts/netbench.sh makes .torch-venv as bench-vs-torch.sh does). In the network lab set
GLOO_SOCKET_IFNAME=eth0: Gloo must use the host's shaped link.
"""

import argparse
import json
import os
import statistics
import time


def parse_size(s):
    s = s.strip().lower()
    mult = {"k": 1e3, "m": 1e6, "g": 1e9}.get(s[-1:], 1)
    n = float(s[:-1] if s[-1:] in "kmg" else s) * mult
    if n < 1 or n != int(n):
        raise argparse.ArgumentTypeError(f"{s!r} is not a whole count like 270k or 14.7m")
    return int(n)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=lambda s: [parse_size(x) for x in s.split(",")], required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rate", type=float, default=None, help="link bytes per second: adds the floor")
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(rank)
    for d in args.sizes:
        x = torch.randn(d, generator=gen)
        dist.all_reduce(x)  # warm-up: Gloo sets up its pairs and buffers on first use
        times = []
        for _ in range(args.steps):
            x.normal_(generator=gen)
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t)
        slowest = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if rank == 0:
            comm_s = statistics.median(slowest.tolist())
            critical = 2 * (world - 1) / world * 4 * d
            row = {
                "scheme": "gloo-dense",
                "workers": world,
                "d": d,
                "k": d,
                "critical_bytes": critical,
                "comm_s": comm_s,
                "torch": torch.__version__,
            }
            if args.rate:
                row["floor_s"] = critical / args.rate
            print(json.dumps(row), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
