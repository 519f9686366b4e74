"""The routing-vs-persona-effect correlation's bootstrap CI over categories (issue 23, item 6)."""

from __future__ import annotations

import math

import numpy as np

from prism_lightning.eval import scoring as S
from prism_lightning.eval.summary import format_table, summarise


def test_ci_brackets_the_coefficients_and_is_seeded():
    x = [5, 20, 35, 50, 60, 75, 90, 95, 10, 40, 70, 30]
    y = [-1.0, 0.5, -0.2, 1.0, 0.4, 2.0, 1.5, 2.5, -0.5, 0.0, 1.1, 0.9]
    point = S.correlate(x, y)
    assert S._average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]
    ci = S.correlation_ci(x, y, n_resamples=400, seed=1)
    for name in ("pearson", "spearman"):
        assert ci[f"{name}_lo"] < point[name] < ci[f"{name}_hi"] <= 1.0
    assert ci["n_resamples_used"] == 400 and ci == S.correlation_ci(x, y, n_resamples=400, seed=1)
    ties = S.correlation_ci([1, 1, 2, 2, 3], [1, 2, 2, 3, 3], n_resamples=200)
    assert 0 < ties["n_resamples_used"] <= 200  # constant resamples are left out
    assert S.correlation_ci([1, 2], [2, 3])["pearson_lo"] is None  # under 3 pairs: no CI


def test_the_evaluation_summary_carries_and_prints_it():
    names = [f"mmlu/{d}" for d in ("stem", "humanities", "social_sciences", "other")]
    rows_by = {}
    for cond, shift in (("base", 0), ("persona", 1), ("prism", 0)):
        rows = []
        for k, n in enumerate(names):
            for i in range(10):
                row = {"id": f"{n}-{i}", "group": n, "values": float(i < 3 + shift * k)}
                if cond == "prism":
                    row.update(route=int(i < 2 * k + 1), gate_prob=0.5)
                rows.append(row)
        rows_by[("mmlu", cond)] = rows
    summary = summarise(rows_by, ["base", "persona", "prism"], names, n_resamples=200)
    corr = summary["correlation"]
    assert corr["n"] == 4 and math.isclose(corr["pearson"], 1.0)
    assert corr["pearson_lo"] is not None and corr["pearson_lo"] <= corr["pearson"] <= corr["pearson_hi"]
    assert "Pearson r = 1.00 [" in format_table(summary)
