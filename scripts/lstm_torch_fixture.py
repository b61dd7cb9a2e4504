#!/usr/bin/env python3
"""PyTorch's nn.LSTM on random weights and data, written as a fixture our LSTM is checked against.

Two layers (input 3, hidden 4), T = 5, B = 2, a random initial state, float64 arithmetic (so
the reference itself carries no float32 rounding), loss = sum(out^2) + sum(c_n) + sum(h_n).
The file holds the weights under PyTorch's names, the input, the initial state, the outputs, the
final state and the gradients of every weight, both biases per layer, and the input
(`grad.<name>`). src/models/lstm.rs's test `matches_pytorch_outputs_and_gradients` reads it.

Run through scripts/torch-fixtures.sh (which makes the venv).
"""
import sys

import torch
from torch_fixture_io import save_safetensors


def main(path):
    torch.manual_seed(14)
    inp, hid, layers, t_len, batch = 3, 4, 2, 5, 2
    lstm = torch.nn.LSTM(inp, hid, layers).double()
    # Biases far from the default init, and b_ih != b_hh, so a model that ignores either shows it.
    with torch.no_grad():
        for name, p in lstm.named_parameters():
            if name.startswith("bias"):
                p.uniform_(-1.0, 1.0)
    x = torch.randn(t_len, batch, inp, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(layers, batch, hid, dtype=torch.float64) * 0.5
    c0 = torch.randn(layers, batch, hid, dtype=torch.float64) * 0.5
    # The fixture stores float32: run torch on the float32-rounded values so both sides start equal.
    with torch.no_grad():
        for p in lstm.parameters():
            p.copy_(p.float().double())
        x.copy_(x.float().double())
    h0, c0 = h0.float().double(), c0.float().double()
    out, (hn, cn) = lstm(x, (h0, c0))
    loss = out.pow(2).sum() + cn.sum() + hn.sum()
    loss.backward()
    t = {name: p for name, p in lstm.named_parameters()}
    t.update({"x": x, "h0": h0, "c0": c0, "out": out, "h_n": hn, "c_n": cn, "loss": loss.reshape(1)})
    t.update({f"grad.{name}": p.grad for name, p in lstm.named_parameters()})
    t["grad.x"] = x.grad
    save_safetensors(path, t)
    print(f"wrote {path}: loss {loss.item():.6f}, torch {torch.__version__}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/lstm_torch.safetensors")
