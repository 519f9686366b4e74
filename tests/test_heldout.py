"""The held-out check's arithmetic (AUROC, intervals, pass rates, the adapter's share of the gain)."""

from __future__ import annotations

import math

import pytest

from prism_lightning.eval.heldout import auroc, bootstrap_interval, format_report, summarise


def test_auroc_counts_ordered_pairs_and_ties_half():
    assert auroc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    assert auroc([0.5, 0.5], [1, 0]) == 0.5
    assert auroc([0.9, 0.3, 0.5], [1, 0, 1]) == pytest.approx(1.0)
    assert auroc([0.4, 0.6, 0.5], [1, 0, 1]) == pytest.approx(0.0)
    assert math.isnan(auroc([0.3, 0.4], [1, 1]))


def test_bootstrap_interval_brackets_the_statistic_and_narrows_with_n():
    def mean_of(values):
        return lambda idx: sum(values[i] for i in idx) / len(idx)

    small = [1, 0] * 10
    large = [1, 0] * 500
    lo_s, hi_s = bootstrap_interval(mean_of(small), len(small), resamples=400)
    lo_l, hi_l = bootstrap_interval(mean_of(large), len(large), resamples=400)
    assert lo_s < 0.5 < hi_s and lo_l < 0.5 < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3


def _row(label, prob, routed, passes, same=True):
    answers = {"base": "b", "context": "c", "adapter": "a", "routed": "b" if same else "x"}
    return {"label": label, "gate_prob": prob, "routed": routed, "passes": passes, "answers": answers}


def test_summary_reports_the_adapter_share_of_the_context_gain_on_routed_rows():
    on = {"base": 0, "context": 1, "adapter": 1, "routed": 1}
    half = {"base": 0, "context": 1, "adapter": 0, "routed": 0}
    off = {"base": 0, "context": 0, "adapter": 0, "routed": 0}
    rows = [
        _row(1, 0.9, True, on, same=False),
        _row(1, 0.8, True, half, same=False),
        _row(0, 0.2, False, off),
        _row(0, 0.1, False, off, same=False),
    ]
    s = summarise(rows)
    assert s["gate_auroc"] == 1.0 and s["gate_accuracy"] == 1.0
    assert s["pass_rates"]["routed_on"] == {"base": 0.0, "context": 1.0, "adapter": 0.5, "routed": 0.5}
    assert s["adapter_share_of_context_gain"] == pytest.approx(0.5)
    assert (s["routed_off_equal_to_base"], s["routed_off"]) == (1, 2)
    text = format_report(s)
    assert "gate AUROC      1.000" in text and "50% of the context's gain" in text
    assert "routed off: 1/2 answered exactly as the base model" in text


@pytest.mark.integration
@pytest.mark.second_tier
def test_heldout_labels_with_answer_samples_count_any_winning_context_answer(embedded_checkpoint):
    """With bootstrap.answer_samples k the label is 1 when the greedy context answer or any of k - 1 sampled
    ones beats the base answer; the four greedy answers do not depend on k."""
    from prism_lightning.bootstrap.config import BootstrapConfig
    from prism_lightning.bootstrap.verifiers import fact_sheet
    from prism_lightning.contexts import ContextLibrary
    from prism_lightning.engines import open_engine
    from prism_lightning.eval.heldout import run_heldout_check

    settings = dict(
        personas=["fact_sheet"], context_files=["examples/fact_sheet.yaml"], query_prompt="examples",
        queries_per_persona=4, query_max_new_tokens=16, answer_max_new_tokens=8, verifier="program",
        verifier_programs={"fact_sheet": "prism_lightning.bootstrap.verifiers:fact_sheet"},
    )  # fmt: skip
    engine = open_engine(embedded_checkpoint, device="cpu")
    one = run_heldout_check(engine, BootstrapConfig(**settings), per_context=3, training_queries=[])
    three = run_heldout_check(
        engine, BootstrapConfig(**settings, answer_samples=3), per_context=3, training_queries=[]
    )
    sheet = ContextLibrary.from_config(["examples/fact_sheet.yaml"]).select(["fact_sheet"])[0].text("short")
    assert [r["answers"] for r in one.rows] == [r["answers"] for r in three.rows]
    assert three.summary["label_samples"] == 3 and one.summary["label_samples"] == 1
    for a, b in zip(one.rows, three.rows, strict=True):
        assert "context_samples" not in a and len(b["context_samples"]) == 2
        candidates = [b["answers"]["context"], *b["context_samples"]]
        won = [fact_sheet(b["query"], b["answers"]["base"], c, sheet) == "persona" for c in candidates]
        assert b["label"] == int(any(won)) and b["context_answers_won"] == sum(won)
        assert a["label"] == int(won[0])
