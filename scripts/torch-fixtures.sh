#!/usr/bin/env bash
# Regenerates the PyTorch fixtures in tests/fixtures/ (nn.LSTM; BatchNorm2d/1d in training;
# F.cross_entropy) in a venv of its own (torch from PyPI; never part of cargo test, which only reads the committed files).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${TORCH_VENV:-.venv-torch}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet torch numpy
fi
export OMP_WAIT_POLICY=PASSIVE
"$venv/bin/python" scripts/lstm_torch_fixture.py tests/fixtures/lstm_torch.safetensors
"$venv/bin/python" scripts/batch_norm_torch_fixture.py tests/fixtures/batch_norm_torch.safetensors
"$venv/bin/python" scripts/cross_entropy_torch_fixture.py tests/fixtures/cross_entropy_torch.safetensors
