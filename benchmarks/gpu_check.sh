#!/usr/bin/env bash
# The device command of benchmarks/gpu_check.py (one GPU, <= 8 minutes, no network).
#
# Here, first:   benchmarks/prepare_gpu_wheels.sh          (fills the git-ignored carry folder .whl/)
# Device call:   run(command="PRISM_COMMIT=<git rev-parse HEAD here> bash benchmarks/gpu_check.sh",
#                    carry=[".whl"], timeout_s=600)
# The report comes back as $OUT/gpu_check-<card>.json (and the log as $OUT/gpu_check.log); copy it to
# benchmarks/results/ and commit it.
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then  # only if prepare_gpu_wheels.sh was given wheels to carry
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 WANDB_MODE=disabled timeout 560 python3 benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 \
  | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
