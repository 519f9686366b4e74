"""The GPU check's CPU dry run: every step of benchmarks/gpu_check.py runs on a tiny shape, in a fresh
process with wandb, jsonargparse and gguf blocked as on the bare GPU image, so the script that GPU
sessions run once in a while cannot rot between them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_on_cpu(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("PRISM_CACHE", None)
    script = str(ROOT / "benchmarks" / "gpu_check.py")
    cmd = [sys.executable, script, "--device", "cpu", "--out", str(tmp_path), "--bench-files", "tiny"]
    cmd += ["--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    report = json.loads((tmp_path / "gpu_check-cpu.json").read_text())
    steps = report["steps"]
    failed = {k: v["error"] for k, v in steps.items() if v["status"] == "FAIL"}
    assert proc.returncode == 0 and not failed, f"{failed}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert list(steps) == [
        "fit_bf16_mixed", "fit_fsdp", "bootstrap_hf", "bootstrap_vllm", "routed_generation", "eval_limit1",
        "speed_routing", "speed_training", "speed_generation",
    ]  # fmt: skip
    assert steps["bootstrap_vllm"]["status"] in ("PASS", "SKIP")
    assert all(s["status"] == "PASS" for k, s in steps.items() if k != "bootstrap_vllm")
    assert report["leaked_blocked_imports"] == [] and report["blocked_imports"]
    assert report["versions"]["torch"] and report["shape"] == "tiny"

    for fit in ("fit_bf16_mixed", "fit_fsdp"):
        numbers = steps[fit]["numbers"]
        assert numbers["global_step"] == 3 and all(math.isfinite(x) for x in numbers["losses"])
    assert steps["fit_fsdp"]["numbers"]["strategy"] != steps["fit_bf16_mixed"]["numbers"]["strategy"]
    assert steps["bootstrap_hf"]["numbers"]["rows"]["queries"] > 0
    gen = steps["routed_generation"]["numbers"]
    half = gen["rows"] // 2
    assert gen["off_rows_equal_base"] == half and gen["on_rows_equal_always_on"] == half
    assert gen["always_on_rows_differing_from_base"] > 0
    ev = steps["eval_limit1"]["numbers"]
    assert ev["benchmark_files"] == "tiny local files"
    assert {name.split("__")[0] for name in ev["items_scored"]} == {"mtbench", "mmlu", "safety"}
    assert "prefill_routed_on_vs_base" in steps["speed_routing"]["numbers"]["ratios"]
    assert "train_tokens_per_s_ours_vs_plain_same_rows" in steps["speed_training"]["numbers"]["ratios"]
    assert "ours/plain_sorted" in steps["speed_generation"]["numbers"]["ratios"]
