#!/usr/bin/env bash
# The device command of benchmarks/gpu_check.py: one GPU, one call of at most ~6 minutes, no network.
# A session's device time is ~15 minutes in all, machine start included: this call, and one rerun.
#
# Here, first:   benchmarks/prepare_gpu_wheels.sh          (fills the git-ignored carry folder .whl/)
#                python3 benchmarks/gpu_check_plan.py        (the step-by-step GPU time estimate, <= 360 s)
# Device call:   run(command="PRISM_COMMIT=<git rev-parse HEAD here> bash benchmarks/gpu_check.sh",
#                    carry=[".whl"], timeout_s=390)
# The steps end by 330 s from the Python start (--deadline; a step whose budget does not fit is skipped
# and recorded so), Python is killed at 350 s, and the report of the finished steps is on disk either way.
# The report comes back as $OUT/gpu_check-<card>.json (and the log as $OUT/gpu_check.log), ending with one
# "target ... measured ... PASS/MISS" line per performance target; copy it to benchmarks/results/ and
# commit it. Extra arguments go to gpu_check.py: a rerun (at once, on the warm machine) names only the
# steps that failed or were skipped, e.g. ... bash benchmarks/gpu_check.sh --steps fit_fsdp,eval_limit1
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then  # only if prepare_gpu_wheels.sh was given wheels to carry
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 WANDB_MODE=disabled timeout -k 5 350 python3 benchmarks/gpu_check.py --out "$OUT" \
  --deadline 330 "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
