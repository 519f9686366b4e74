"""The exported gate's held-out scores (``model/gate_eval.py``): accuracy and AUROC with bootstrap CIs."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from prism_lightning.model.gate_eval import format_test_scores, gate_scores


def test_scores_match_torchmetrics_and_the_ci_brackets_them():
    gen = torch.Generator().manual_seed(0)
    targets = [1] * 30 + [0] * 40
    probs = [min(1.0, max(0.0, 0.25 * t + 0.4 + 0.3 * float(torch.rand(1, generator=gen)))) for t in targets]
    probs[3] = probs[50]  # a tie across classes counts one half
    s = gate_scores(probs, targets, 0.5, n_resamples=500)
    assert (s["rows"], s["distill"], s["retain"]) == (70, 30, 40)
    acc = sum((p >= 0.5) == bool(t) for p, t in zip(probs, targets, strict=True)) / 70
    assert s["gate_acc"]["mean"] == pytest.approx(acc)
    auroc = float(binary_auroc(torch.tensor(probs), torch.tensor(targets)))
    assert s["gate_auroc"]["mean"] == pytest.approx(auroc)
    for key in ("gate_acc", "gate_auroc"):
        ci = s[key]
        assert ci["lo"] <= ci["mean"] <= ci["hi"] and ci["hi"] - ci["lo"] > 0.02
    assert s == gate_scores(probs, targets, 0.5, n_resamples=500)  # seeded
    text = format_test_scores(s)
    assert "70 rows: 30 distill / 40 retain" in text and "gate_auroc" in text


def test_one_class_has_an_accuracy_and_no_auroc():
    s = gate_scores([0.9, 0.2, 0.7], [1, 1, 1], 0.5, n_resamples=100)
    assert s["gate_acc"]["mean"] == pytest.approx(2 / 3) and s["gate_auroc"] is None
    assert gate_scores([], [], 0.5)["gate_acc"] is None
