"""The GPU check's CPU dry run: every step of benchmarks/gpu_check.py runs on a tiny shape, in a fresh
process with wandb, jsonargparse and gguf blocked as on the bare GPU image, so the script that GPU
sessions run once in a while cannot rot between them. Also: its printed time estimate for the GPU
shapes fits the ~6-minute device call, a step whose budget does not fit before the deadline is
skipped with the reason, and every performance target gets a PASS / MISS line."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "benchmarks" / "gpu_check.py")


@pytest.fixture(scope="module")
def plan(load_benchmark):
    """benchmarks/gpu_check_plan.py (standard library only), loaded without the check's import blocking."""
    return load_benchmark("gpu_check_plan")


def _run(args: list[str], out: Path, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("PRISM_CACHE", None)
    cmd = [sys.executable, SCRIPT, "--device", "cpu", "--out", str(out), "--bench-files", "tiny"]
    proc = subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, json.loads((out / "gpu_check-cpu.json").read_text())


def test_gpu_check_dry_run_on_cpu(plan, tmp_path):
    proc, report = _run(["--threads", "1"], tmp_path, timeout=900)
    steps = report["steps"]
    failed = {k: v["error"] for k, v in steps.items() if v["status"] == "FAIL"}
    assert proc.returncode == 0 and not failed, f"{failed}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    # every step, in priority order, ran or was skipped with a reason
    assert list(steps) == list(plan.STEPS)
    assert list(plan.STEPS[:4]) == ["fit_bf16_mixed", "speed_routing", "speed_training", "speed_generation"]
    for name, entry in steps.items():
        assert entry["status"] in ("PASS", "SKIP"), name
        assert entry["status"] == "PASS" or entry["error"], f"{name} skipped without a reason"
        assert entry["budget_s"] >= 1 and entry["seconds"] >= 0
    assert steps["bootstrap_vllm"]["status"] == "SKIP"
    assert all(s["status"] == "PASS" for k, s in steps.items() if k != "bootstrap_vllm")

    # the estimate of the GPU shapes, printed first, fits the device call
    totals = re.findall(r"total estimate (\d+) s", proc.stdout)
    assert totals and int(totals[0]) <= 360, proc.stdout[:3000]
    for name in plan.STEPS:
        assert re.search(rf"\[gpu_check\]\s+{name}\s+[\d.]+ s\s+budget", proc.stdout), name
    assert report["gpu_estimate"]["total_s"] <= 360

    # one PASS / MISS (or N/A with the reason) line per target, printed and stored
    lines = report["target_lines"]
    assert len(lines) == len(plan.TARGETS)
    for line, target in zip(lines, plan.TARGETS, strict=True):
        assert line.startswith(f"target {target.name}: ") and " measured " in line
        assert line.endswith(("PASS", "MISS")) or " N/A (" in line
        assert f"[gpu_check] {line}" in proc.stdout
    measured = {t["key"]: t for t in report["targets"] if t["measured"] is not None}
    assert set(measured) == {t.key for t in plan.TARGETS} - {"train_peak_mem_ours_vs_plain_same_rows"}

    # report fields: commit, date, machine with load averages, card facts, repeats
    assert report["date"] and "commit" in report and report["versions"]["torch"]
    assert len(report["machine"]["load_average_at_start"]) == 3 and report["machine"]["load_average_at_end"]
    assert report["card_facts"]["card"] == "cpu" and report["card"] == "cpu"
    assert report["leaked_blocked_imports"] == [] and report["blocked_imports"]
    assert report["shape"] == "tiny" and report["imports_s"] > 0
    for name in ("fit_bf16_mixed", "speed_routing", "speed_training", "speed_generation", "fit_fsdp"):
        assert steps[name]["numbers"]["repeats"], name
    for name in ("speed_routing", "speed_training", "speed_generation"):
        machine = steps[name]["numbers"]["machine"]
        assert machine["commit"] is not None or report["commit"] is None
        assert len(machine["load_average_at_start"]) == 3

    # the steps' own checks
    for fit in ("fit_bf16_mixed", "fit_fsdp"):
        numbers = steps[fit]["numbers"]
        assert numbers["global_step"] == 3 and all(math.isfinite(x) for x in numbers["losses"])
    assert steps["fit_fsdp"]["numbers"]["strategy"] != steps["fit_bf16_mixed"]["numbers"]["strategy"]
    assert steps["fit_fsdp"]["numbers"]["built_on"] == "cpu"
    boot = steps["bootstrap_hf"]["numbers"]
    assert boot["rows"]["queries"] > 0 and boot["verdict_rule"] == "strict"  # the 7B presets' free-text rule
    assert boot["verdicts"]["pairs"] == boot["rows"]["verdicts"] > 0
    gen = steps["routed_generation"]["numbers"]
    half = gen["rows"] // 2
    assert gen["off_rows_equal_base"] == half and gen["on_rows_equal_always_on"] == half
    assert gen["always_on_rows_differing_from_base"] > 0
    ev = steps["eval_limit1"]["numbers"]
    assert ev["benchmark_files"] == "tiny local files" and ev["judge_mode"] == "generate"
    assert {name.split("__")[0] for name in ev["items_scored"]} == {"mtbench", "mmlu", "safety"}
    assert "prefill_routed_on_merged_vs_base" in steps["speed_routing"]["numbers"]["ratios"]
    assert "train_tokens_per_s_ours_mixed_vs_reference_style" in steps["speed_training"]["numbers"]["ratios"]
    sg = steps["speed_generation"]["numbers"]
    assert sg["args"]["ignore_eos"] and {"ours/plain_sorted", "ours/static_compiled"} <= set(sg["ratios"])
    assert "error" not in sg["static_compile"] and sg["static_compile"]["first_call_seconds_with_compile"] > 0
    tokens = {r["new_tokens"] for r in sg["results"].values() if r["rows"] == sg["args"]["prompts"]}
    assert tokens == {sg["args"]["prompts"] * sg["args"]["max_new_tokens"]}  # fixed length for all methods


def test_a_step_whose_budget_does_not_fit_is_skipped(tmp_path):
    proc, report = _run(["--steps", "fit_bf16_mixed,speed_routing", "--deadline", "2"], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("fit_bf16_mixed", "speed_routing"):
        entry = report["steps"][name]
        assert entry["status"] == "SKIP" and "does not fit in the" in entry["error"], entry
    lines = report["target_lines"]
    assert sum("N/A (step SKIP: budget" in line for line in lines) == 2  # the two routing targets
    assert sum("N/A (step not run)" in line for line in lines) == len(lines) - 3
    assert sum("N/A (not in the check" in line for line in lines) == 1


def test_estimate_budgets_and_target_verdicts(plan):
    assert plan.total_estimate() <= 360
    budgets = plan.budgets()
    assert set(budgets) == set(plan.STEPS)
    # on estimate, every step starts within the deadline
    elapsed = plan.H200.imports_s
    for name, seconds, _ in plan.estimate()[1:]:
        assert plan.skip_reason(budgets[name], elapsed, plan.DEADLINE_S) is None, name
        elapsed += seconds
    assert plan.skip_reason(30, 310, 330).startswith("budget 30 s does not fit in the 20 s left")
    assert plan.skip_reason(30, 310, None) is None
    steps = {
        "speed_training": {"status": "PASS", "numbers": {"ratios": {
            "train_tokens_per_s_ours_vs_plain_same_rows": 2.1,
            "train_peak_mem_ours_vs_plain_same_rows": 1.02}}},
        "speed_routing": {"status": "SKIP", "error": "budget 43 s does not fit"},
    }  # fmt: skip
    verdicts = {r["target"]: r["verdict"] for r in plan.target_results(steps)}
    assert verdicts["training tokens/s"] == "PASS"
    assert verdicts["training peak memory"] == "MISS"
    assert verdicts["prefill with the adapter"] == "N/A (step SKIP: budget 43 s does not fit)"
    assert verdicts["batched generation"] == "N/A (step not run)"
    assert verdicts["training tokens/s, batch 8 x 2048, gradient checkpointing"].startswith("N/A (not in the")
