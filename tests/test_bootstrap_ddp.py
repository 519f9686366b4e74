"""Two CPU processes (Lightning DDP) split each stage and produce the same rows as one process."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prism_lightning.backbone import BackboneConfig
from prism_lightning.bootstrap import BootstrapConfig, run_bootstrap
from prism_lightning.testing import TINY_BOOTSTRAP_SETTINGS

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {**TINY_BOOTSTRAP_SETTINGS, "personas": "math,writing"}


def close(a, b, path="") -> bool:
    """Equal, except floats (judge log-probs) may differ by kernel rounding between batch layouts."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], f"{path}.{k}") for k in a if k != "tensor_file")
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, path) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tiny_model_dir, tmp_path):
    cmd = [sys.executable, "-m", "prism_lightning", "bootstrap", "--data.run_dir", str(tmp_path / "ddp")]
    cmd += [
        "--model.backbone.model",
        str(tiny_model_dir),
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
    ]
    for key, value in SETTINGS.items():
        cmd += [f"--data.bootstrap.{key}", str(value)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "NODE_RANK"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("bootstrap summary") == 1  # only rank 0 prints

    config = BootstrapConfig(**{**SETTINGS, "personas": SETTINGS["personas"].split(",")})
    backbone = BackboneConfig(model=str(tiny_model_dir))
    single = run_bootstrap(
        config, backbone, tmp_path / "single", {"accelerator": "cpu", "enable_progress_bar": False}
    )
    ddp = run_bootstrap(config, backbone, tmp_path / "ddp", {"accelerator": "cpu"})  # cached: no-op
    assert all(st["cached"] for st in ddp.summary["stages"].values())
    for stage in ("queries", "answers", "verdicts", "teacher"):
        a, b = single.rows(stage), ddp.rows(stage)
        assert close(a, b), stage
    shards = sorted(p.name for p in ddp.stage_dirs["answers"].glob("shard-*.jsonl"))
    assert shards == ["shard-0.jsonl", "shard-1.jsonl"]
