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
#
# What it installs, in one pip resolve: the pinned torch / torchvision / torch-xla, this project (editable,
# with its trainer dependencies: no extras) and the test runner. Most of the time is torch 2.9.0's CUDA
# libraries (PyPI has no CPU-only torch wheel for Linux; `import torch` needs them). To add a package the
# XLA tests need, append it to TEST_TOOLS (or EXTRA="pkg ..." from outside).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-xla}"
TORCH_VERSION=2.9.0
TORCH_XLA_VERSION=2.9.0
TORCHVISION_VERSION=0.24.0   # the torchvision of torch 2.9.0 (timm imports it)
TEST_TOOLS=("pytest>=7" "pytest-timeout>=2" "pytest-xdist>=3.5")
started=$SECONDS
python3 -m venv "$VENV"   # its bundled pip resolves this set; upgrading pip first only costs time
xla_pkg="torch-xla==$TORCH_XLA_VERSION"
[ "${TPU:-0}" = "1" ] && xla_pkg="torch-xla[tpu]==$TORCH_XLA_VERSION"
# shellcheck disable=SC2086  # EXTRA is a space-separated list of requirements
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "$xla_pkg" -e . "${TEST_TOOLS[@]}" ${EXTRA:-}
PJRT_DEVICE=CPU "$VENV/bin/python" -c "import torch, torch_xla; print('xla env ready:', '$VENV', 'torch', torch.__version__, 'torch_xla', torch_xla.__version__)"
echo "setup_xla_env: $(( SECONDS - started )) s"
