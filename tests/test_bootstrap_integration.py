"""The whole bootstrap on the embedded SmolLM2 model, at tiny sizes, plus a cached rerun."""

from __future__ import annotations

import pytest

from prism_lightning.backbone import BackboneConfig
from prism_lightning.bootstrap import BootstrapConfig, run_bootstrap
from prism_lightning.bootstrap.teacher import load_teacher_targets


@pytest.mark.integration
@pytest.mark.second_tier
def test_embedded_bootstrap_end_to_end(tmp_path, monkeypatch):
    config = BootstrapConfig(
        personas=["math", "writing"],
        queries_per_persona=2,
        query_max_new_tokens=24,
        answer_max_new_tokens=24,
        batch_size=4,
    )
    trainer = {"accelerator": "cpu", "enable_progress_bar": False}
    result = run_bootstrap(config, BackboneConfig(), tmp_path / "run", trainer)
    summary = result.summary
    assert summary["queries"]["kept"] >= 1
    verdicts = result.rows("verdicts")
    assert len(verdicts) == summary["queries"]["kept"]
    for row in verdicts:  # the log-prob verdict always exists, the free text may not parse
        for order in ("order_persona_first", "order_base_first"):
            assert set(row[order]["logprobs"]) == {"A", "B", "TIE"}
    teacher = result.rows("teacher")
    assert len(teacher) == sum(r["gate_target"] for r in verdicts)
    if teacher:
        targets = load_teacher_targets(result.stage_dirs["teacher"], teacher)
        assert targets[teacher[0]["id"]]["values"].shape[-1] == 64

    monkeypatch.setattr(BackboneConfig, "load", lambda *a, **k: pytest.fail("cached rerun loaded a model"))
    again = run_bootstrap(config, BackboneConfig(), tmp_path / "run", trainer)
    assert all(stage["cached"] for stage in again.summary["stages"].values())
