#!/usr/bin/env python3
"""PyTorch's F.cross_entropy (mean over rows) on random logits, written as a fixture our fused
cross-entropy (src/models/cross_entropy.rs) is checked against.

Per case: the logits (a wide range, so that the max shift matters), the labels (as float32
values), a scale `r`, the loss and the gradient of loss * r with respect to the logits. float64
arithmetic on float32-rounded logits, so the reference itself carries no float32 rounding. The
test `models::cross_entropy::tests::matches_pytorch` reads it.

Run through scripts/torch-fixtures.sh (which makes the venv).
"""
import sys

import torch
import torch.nn.functional as F
from torch_fixture_io import save_safetensors

CASES = {
    # name: (rows, classes)
    "small": (37, 10),
    "vocab": (5, 1000),
    "one_row": (1, 3),
}


def main(path):
    torch.manual_seed(23)
    out = {}
    for name, (rows, classes) in CASES.items():
        logits = (torch.randn(rows, classes) * 8).double().requires_grad_(True)
        labels = torch.randint(0, classes, (rows,))
        labels[0] = classes - 1
        r = torch.rand(()).double() + 0.5
        loss = F.cross_entropy(logits, labels)
        (loss * r).backward()
        out[f"{name}.logits"] = logits
        out[f"{name}.labels"] = labels.double()
        out[f"{name}.r"] = r.reshape(1)
        out[f"{name}.loss"] = loss.reshape(1)
        out[f"{name}.grad"] = logits.grad
    save_safetensors(path, out)


if __name__ == "__main__":
    main(sys.argv[1])
