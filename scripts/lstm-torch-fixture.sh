#!/usr/bin/env bash
# Regenerates tests/fixtures/lstm_torch.safetensors from PyTorch's nn.LSTM, in a venv of its own
# (CPU torch from PyPI; never part of cargo test, which only reads the committed file).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${TORCH_VENV:-.venv-torch}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet torch --index-url https://download.pytorch.org/whl/cpu || "$venv/bin/pip" install --quiet torch
fi
OMP_WAIT_POLICY=PASSIVE "$venv/bin/python" scripts/lstm_torch_fixture.py tests/fixtures/lstm_torch.safetensors
