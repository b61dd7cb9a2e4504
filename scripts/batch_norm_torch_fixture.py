#!/usr/bin/env python3
"""PyTorch's BatchNorm2d and BatchNorm1d in training mode on random data, written as a fixture our
fused BatchNorm (src/models/batch_norm/) is checked against.

Per case: the input `x`, a random weight and bias (far from 1 and 0), the running statistics after
one forward from PyTorch's initial ones, the output (ReLU'd in the `relu` cases), and the gradients
of the input, weight and bias for loss = sum(out * r) with a random `r`. float64 arithmetic on
float32-rounded values, so the reference itself carries no float32 rounding. The test
`models::batch_norm::tests::matches_pytorch` reads it.

Run through scripts/torch-fixtures.sh (which makes the venv).
"""
import sys

import torch
from torch_fixture_io import save_safetensors

CASES = {
    # name: (input shape, ReLU after)
    "bn2d": ((4, 3, 5, 3), False),
    "bn2d_relu": ((2, 5, 3, 4), True),
    "bn1d": ((7, 6), False),
}


def rounded(t):
    return t.float().double()


def main(path):
    torch.manual_seed(15)
    out = {}
    for name, (shape, relu) in CASES.items():
        c = shape[1]
        bn = (torch.nn.BatchNorm2d(c) if len(shape) == 4 else torch.nn.BatchNorm1d(c)).double().train()
        with torch.no_grad():
            bn.weight.copy_(rounded(torch.rand(c, dtype=torch.float64) * 2 + 0.5))
            bn.bias.copy_(rounded(torch.randn(c, dtype=torch.float64)))
        # An offset per channel, so a variance that cancels would show.
        x = rounded(torch.randn(shape, dtype=torch.float64) * 2 + 3).requires_grad_(True)
        r = rounded(torch.randn(shape, dtype=torch.float64))
        y = bn(x)
        if relu:
            y = torch.relu(y)
        (y * r).sum().backward()
        out.update({
            f"{name}.x": x, f"{name}.r": r, f"{name}.weight": bn.weight, f"{name}.bias": bn.bias,
            f"{name}.y": y, f"{name}.running_mean": bn.running_mean, f"{name}.running_var": bn.running_var,
            f"{name}.grad.x": x.grad, f"{name}.grad.weight": bn.weight.grad, f"{name}.grad.bias": bn.bias.grad,
        })
    save_safetensors(path, out)
    print(f"wrote {path}: {len(CASES)} cases, torch {torch.__version__}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/batch_norm_torch.safetensors")
