"""configs/demo_card.yaml through the real CLI on the embedded model at a reduced size: the gate, trained on
the model's own program-verified labels, must rank fresh held-out queries better than chance by more than
the run's own 95% interval allows for (the full-size run and its numbers are in docs/demo.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
@pytest.mark.second_tier
def test_demo_card_gate_beats_chance_on_heldout_queries(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    reduced = {
        "--data.bootstrap.queries_per_persona": "48",
        "--data.bootstrap.answer_max_new_tokens": "24",
        "--data.run_dir": str(tmp_path / "run"),
        "--export_dir": str(tmp_path / "ckpt"),
        "--sanity_check": "false",
        "--heldout_check": "40",
    }
    args = [x for kv in reduced.items() for x in kv]
    config = str(ROOT / "configs/demo_card.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "prism_lightning", "fit", "--config", config, *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=2400,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    summary = json.loads((tmp_path / "run" / "heldout.json").read_text())["summary"]
    # enough of both classes for an interval to mean something
    assert summary["positives"] >= 4 and summary["queries"] - summary["positives"] >= 10, summary
    low, _ = summary["gate_auroc_ci95"]
    auroc = summary["gate_auroc"]
    assert low > 0.5, f"held-out gate AUROC {auroc:.2f}, its 95% interval from {low:.2f}: not above chance"
    # single-pass routing: every query the gate routes off is answered exactly as by the base model
    assert summary["routed_off_equal_to_base"] == summary["routed_off"]
