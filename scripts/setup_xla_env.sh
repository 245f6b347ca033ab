#!/usr/bin/env bash
# A separate virtual environment for the PyTorch/XLA (TPU) path of the reference trainer:
# torch-xla 2.9.0 needs torch 2.9.0 at import, while the main environment may hold a newer torch.
#
#   bash scripts/setup_xla_env.sh [VENV]        # default VENV: .venv-xla (next to this repository's README)
#   PJRT_DEVICE=CPU VENV/bin/python -m pytest -q tests_xla     # the XLA tests, on PJRT's CPU device
#   PJRT_DEVICE=TPU VENV/bin/layerlock-train --set train.device=xla ...   # on a TPU VM
#
# On a TPU VM use the same script: the torch-xla wheel from PyPI carries the TPU runtime (libtpu comes
# with `pip install torch-xla[tpu]==2.9.0`, which TPU=1 adds below).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-xla}"
TORCH_VERSION=2.9.0
TORCH_XLA_VERSION=2.9.0
TORCHVISION_VERSION=0.24.0   # the torchvision of torch 2.9.0 (timm imports it)
started=$(date +%s)
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
xla_pkg="torch-xla==$TORCH_XLA_VERSION"
[ "${TPU:-0}" = "1" ] && xla_pkg="torch-xla[tpu]==$TORCH_XLA_VERSION"
"$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "$xla_pkg"
# the project, its trainer dependencies and the test runner (torch stays at the pin above)
"$VENV/bin/python" -m pip install -q -e . "torch==$TORCH_VERSION" "pytest>=7" "pytest-timeout>=2"
PJRT_DEVICE=CPU "$VENV/bin/python" -c "import torch, torch_xla; print('xla env ready:', '$VENV', 'torch', torch.__version__, 'torch_xla', torch_xla.__version__)"
echo "setup_xla_env: $(( $(date +%s) - started )) s"
