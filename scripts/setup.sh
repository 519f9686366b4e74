#!/usr/bin/env bash
# Install prism_lightning into the current Python environment.
#   bash scripts/setup.sh         the package with the notebook tools (jupyter)
#   bash scripts/setup.sh --dev   plus the test tools (pytest, ruff, nbclient)
# torch comes first: a CPU build on machines without an NVIDIA GPU, so pip never pulls the
# multi-GB CUDA wheels there; an existing torch install is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
extras="[notebooks]"
[ "${1:-}" = "--dev" ] && extras="[notebooks,dev]"

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install "torch>=2.4,<=2.14.1"
  else
    "$PY" -m pip install --retries 1 --timeout 30 "torch==2.13.0" \
      --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
  fi
fi
"$PY" -m pip install -e ".${extras}"
