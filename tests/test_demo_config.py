"""configs/demo.yaml through the real CLI on the embedded model, at tiny sizes: the whole pipeline and the
held-out check that ends it (the full-size run and its numbers are in docs/demo.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prism_lightning.bootstrap.verifiers import fact_sheet
from prism_lightning.contexts import ContextLibrary

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
@pytest.mark.second_tier
def test_demo_config_runs_and_ends_with_the_heldout_check(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    small = {
        "--data.bootstrap.queries_per_persona": "32",
        "--data.bootstrap.query_max_new_tokens": "24",
        "--data.bootstrap.answer_max_new_tokens": "40",
        "--data.bootstrap.batch_size": "16",
        "--trainer.max_epochs": "1",
        "--data.run_dir": str(tmp_path / "run"),
        "--export_dir": str(tmp_path / "ckpt"),
        "--sanity_check": "false",
        "--heldout_check": "6",
    }
    args = [x for kv in small.items() for x in kv]
    result = subprocess.run(
        [sys.executable, "-m", "prism_lightning", "fit", "--config", str(ROOT / "configs/demo.yaml"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out check:" in result.stdout and "gate AUROC" in result.stdout

    report = json.loads((tmp_path / "run" / "heldout.json").read_text())
    rows, summary = report["rows"], report["summary"]
    trained = {
        json.loads(line)["query"]
        for line in next((tmp_path / "run").glob("bootstrap/queries-*/rows.jsonl")).open()
    }
    sheet = ContextLibrary.from_config(["examples/fact_sheet.yaml"]).select(["fact_sheet"])[0]
    assert rows and summary["queries"] == len(rows)
    for row in rows:
        assert row["query"] not in trained and row["query"] not in sheet.example_queries
        answers = row["answers"]
        # the label is the verifier's verdict on the base and the context answers
        verdict = fact_sheet(row["query"], answers["base"], answers["context"], sheet.text("short"))
        assert row["label"] == int(verdict == "persona")
        if not row["routed"]:  # single-pass routing: a row routed off is the base model's answer
            assert answers["routed"] == answers["base"]
        else:
            assert answers["routed"] == answers["adapter"]
    assert summary["routed_off_equal_to_base"] == summary["routed_off"]
