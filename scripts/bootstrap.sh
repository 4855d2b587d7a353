#!/usr/bin/env bash
# Create .venv and install mxserve with its pinned dependencies (idempotent).
# Without a GPU it installs the CPU build of torch first (pip takes it from the
# local file on these machines); otherwise pip would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
if ! $py -c "import torch" 2>/dev/null; then
  $py -m pip install -q --upgrade pip
  if command -v nvidia-smi >/dev/null 2>&1; then
    $py -m pip install -q "torch>=2.11,<2.14"
  else
    $py -m pip install -q torch==2.13.0 || $py -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  fi
fi
$py -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
$py -c "import mxserve, torch, pulp; print('mxserve ready: torch', torch.__version__)"
