"""Analysis loaders, figures and ``report`` on a run directory, checkpoint, evaluation and study
produced by the real pipeline on the tiny model (see ``test_analysis_inputs.py``)."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure
from test_analysis_inputs import AnalysisInputs, get_inputs, need

from prism_lightning.analysis import figures as F
from prism_lightning.analysis import load as L
from prism_lightning.analysis.report import SPECS, report_main, write_report


@pytest.fixture(scope="session")
def analysis_inputs(tiny_model_dir, tmp_path_factory) -> AnalysisInputs:
    return get_inputs(tiny_model_dir, tmp_path_factory)


def _drawn(fig: Figure) -> None:
    """The figure has axes with content (not only the empty-input placeholder)."""
    assert isinstance(fig, Figure)
    axes = [ax for ax in fig.axes if ax.axison]
    assert axes, "only a placeholder was drawn"
    assert any(ax.collections or ax.lines or ax.patches or ax.images for ax in axes)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# bootstrap + training


def test_bootstrap_frames_match_the_stage_files(analysis_inputs):
    run = analysis_inputs.run_dir
    summary = L.bootstrap_summary(run)
    split = L.bootstrap_split(run)
    assert set(split["rule"]) == {"logprob", "strict"}
    assert set(split["persona"]) == {"math", "coding", "writing"}
    for rule, per in summary["verdicts"]["split"].items():
        got = split[split["rule"] == rule].groupby("label")["count"].sum().to_dict()
        assert got == {"distill": per["total"]["distill"], "retain": per["total"]["retain"]}
    assert split[split["active"]]["rule"].unique().tolist() == [summary["verdict_rule"]]

    v = L.verdicts(run)
    rows = L.stage_rows(run, "verdicts")
    assert len(v) == len(rows) == summary["verdicts"]["pairs"]
    assert (v["gate_target"] == [r["gate_target"] for r in rows]).all()
    # the persona's log-odds, re-derived from the stored log-probs of both orders
    r0 = rows[0]
    lp1, lp2 = r0["order_persona_first"]["logprobs"], r0["order_base_first"]["logprobs"]
    assert v.loc[0, "logodds_persona_first"] == pytest.approx(lp1["A"] - lp1["B"])
    assert v.loc[0, "logodds_base_first"] == pytest.approx(lp2["B"] - lp2["A"])
    table = L.verdict_consistency(run)
    assert int(table.to_numpy().sum()) == len(v)
    assert int(np.trace(table.to_numpy()[:3, :3])) == int(v["consistent"].sum())

    lengths = L.lengths(run)
    assert lengths.groupby("text").size().to_dict() == {
        "query": summary["queries"]["kept"],
        "base answer": len(rows),
        "persona answer": len(rows),
    }
    assert (lengths["chars"] >= 0).all()

    _drawn(F.distill_retain_split(split))
    _drawn(F.verdict_consistency(table, v))
    _drawn(F.length_histograms(lengths))


def test_a_damaged_stage_is_a_missing_input_not_a_figure(analysis_inputs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(analysis_inputs.run_dir, run)
    rows_file = L._stage_dir(run, "verdicts") / "rows.jsonl"
    data = rows_file.read_bytes()
    rows_file.write_bytes(data[: len(data) * 2 // 3])  # a kill or a bad copy cut it mid-line
    with pytest.raises(L.MissingInputError, match="verdicts stage .* is damaged .*python -m prism_lightning"):
        L.stage_rows(run, "verdicts")
    assert len(L.stage_rows(run, "queries")) > 0  # the intact stages still load


def test_training_curves_from_wandb_offline_files(analysis_inputs):
    curves = L.training_curves(analysis_inputs.run_dir)
    assert set(curves["source"]) == {"wandb"} and curves["run"].nunique() == 1
    names = set(curves["name"])
    assert {"loss", "gate_loss", "kl", "gate_acc", "routing_rate"} <= names
    assert {"train", "val"} <= set(curves["split"])
    assert curves["value"].notna().all()
    # the last logged validation KL is the exported "after_fit" metric
    fit = L.fit_metrics(analysis_inputs.checkpoint)
    assert set(fit["when"]) == {"before_fit", "after_fit"}  # the test split's scores are apart:
    test = L.fit_test_scores(analysis_inputs.checkpoint)
    assert test["rows"] >= 1 and test["gate_acc"]["lo"] <= test["gate_acc"]["mean"] <= test["gate_acc"]["hi"]
    after = fit[(fit["when"] == "after_fit") & (fit["metric"] == "val/kl")]["value"].item()
    val_kl = curves[curves["metric"] == "val/kl"].sort_values("step")["value"].to_numpy()
    assert after == pytest.approx(val_kl[-1], rel=1e-4)
    _drawn(F.training_curves(curves))


def test_training_curves_fall_back_to_lightning_csv(tmp_path):
    run = tmp_path / "run"
    csv_dir = run / "csv" / "version_0"
    csv_dir.mkdir(parents=True)
    (csv_dir / "metrics.csv").write_text(
        "epoch,step,train/loss_step,val/loss,val/gate_acc\n0,0,0.9,,\n0,1,0.8,,\n0,1,,0.7,0.5\n"
    )
    curves = L.training_curves(run)
    assert set(curves["source"]) == {"csv"}
    assert set(curves["metric"]) == {"train/loss_step", "val/loss", "val/gate_acc"}
    assert curves[curves["metric"] == "train/loss_step"]["when"].unique().tolist() == ["step"]
    with pytest.raises(L.MissingInputError, match="fit"):
        L.training_curves(tmp_path / "empty")


def test_gate_predictions_use_the_exported_checkpoint(analysis_inputs):
    from prism_lightning.model.export import load_checkpoint

    gates = L.gate_predictions(analysis_inputs.checkpoint, analysis_inputs.run_dir)
    v = L.verdicts(analysis_inputs.run_dir)
    assert len(gates) == len(v) and gates["gate_prob"].between(0, 1).all()
    routed = load_checkpoint(analysis_inputs.checkpoint, device="cpu")
    assert gates["gate_prob"].tolist()[:3] == pytest.approx(
        routed.gate_probs(v["query"].tolist()[:3]), abs=1e-5
    )
    assert (gates["routed"] == (gates["gate_prob"] >= routed.threshold)).all()
    _drawn(F.gate_confusion_roc(gates))


# ------------------------------------------------------------------------------------------------
# evaluation + study


def test_eval_frames_and_routing_figures(analysis_inputs):
    ev = need(analysis_inputs, "eval")
    summary = json.loads((ev / "summary.json").read_text())
    scores = L.eval_scores(ev)
    assert set(scores["condition"]) == set(summary["conditions"])
    row = scores[(scores["condition"] == "base") & (scores["score"] == "mmlu/stem")].iloc[0]
    assert row["mean"] == pytest.approx(summary["conditions"]["base"]["subscores"]["mmlu/stem"]["mean"])
    items = L.eval_items(ev)
    prism = items[items["condition"] == "prism"]
    assert len(prism) and prism["gate_prob"].between(0, 1).all()
    assert items[items["condition"] == "lora"]["route"].all()
    corr = L.routing_correlation(ev)
    assert len(corr) == len(summary["subscores"])
    ref = summary["correlation"]
    for k in ("pearson", "spearman"):
        if ref.get(k) is None:
            assert corr.attrs[k] is None
        else:
            assert corr.attrs[k] == pytest.approx(ref[k], abs=1e-6)
    for name, effect in ref["persona_effect"].items():
        got = corr.set_index("score").loc[name, "persona_effect"]
        assert got == pytest.approx(effect, abs=1e-6)
    _drawn(F.expert_vs_random(scores))
    _drawn(F.routing_scatter(corr))
    _drawn(F.gate_prob_distributions(items))


def test_study_frames_and_persona_figures(analysis_inputs):
    st = need(analysis_inputs, "study")
    grid = L.study_grid(st)
    # 1 baseline + 3 personas x 2 lengths x 2 placements, on 4 MMLU domains + 1 safety set
    assert len(grid) == (1 + 3 * 2 * 2) * 5
    assert (grid[grid["persona"] == "none"]["delta"] == 0).all()
    matched = grid[grid["matched"]]
    assert set(zip(matched["label"], matched["benchmark"], strict=True)) == {
        ("stem", "mmlu"),
        ("safety_monitor", "safety"),
    }
    _drawn(F.persona_category_heatmap(grid))
    fallback = F.persona_category_heatmap(grid, length="long")  # not in this study: its first pair
    assert "(min, system)" in fallback.axes[0].get_title()
    _drawn(fallback)
    _drawn(F.persona_effect_across_tasks(grid))
    _drawn(F.length_placement(grid))


# ------------------------------------------------------------------------------------------------
# report


def test_report_writes_every_figure_and_the_markdown(analysis_inputs, tmp_path):
    need(analysis_inputs, "eval")
    need(analysis_inputs, "study")
    out = tmp_path / "report"
    i = analysis_inputs
    args = [str(i.run_dir), "--eval", str(i.eval_dir), "--study", str(i.study_dir),
            "--checkpoint", str(i.checkpoint), "--out", str(out)]  # fmt: skip
    assert report_main(args) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(f"{s.name}.png" for s in SPECS)
    assert all((out / p).stat().st_size > 5000 for p in pngs)
    md = (out / "report.md").read_text()
    assert all(f"]({p})" in md for p in pngs) and "skipped" not in md
    assert "| val/kl |" in md  # before/after fit metrics from prism.json


def test_report_without_eval_skips_with_the_producing_command(analysis_inputs, tmp_path):
    result = write_report(analysis_inputs.run_dir, tmp_path / "r", checkpoint=None)
    needs = {s.name: s.needs for s in SPECS}
    assert sorted(result["written"]) == sorted(f"{n}.png" for n, k in needs.items() if k == "run")
    md = (tmp_path / "r" / "report.md").read_text()
    assert "python -m prism_lightning evaluate" in md and "python -m prism_lightning study" in md
    assert len(result["skipped"]) == sum(k != "run" for k in needs.values())
    # a directory that is not a run: every loader names the command that makes its input
    with pytest.raises(L.MissingInputError, match="prism_lightning fit"):
        L.bootstrap_split(tmp_path)
    with pytest.raises(L.MissingInputError, match="prism_lightning evaluate"):
        L.eval_scores(tmp_path)
    with pytest.raises(L.MissingInputError, match="prism_lightning study"):
        L.study_grid(tmp_path)
