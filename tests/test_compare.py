"""The reproduce table (``reproduce/compare.py``) on a real evaluation's outputs: ``summary.json`` and item
files written by the evaluation's own ``summarise``/``write_summary`` from scored rows. Verdicts only when
the run's model is the paper's; every published number names its source."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from prism_lightning import files, run_paths
from prism_lightning.eval import benchmarks as B
from prism_lightning.eval.settings import EvalSettings, subscore_names
from prism_lightning.eval.summary import summarise, write_summary
from prism_lightning.reproduce.compare import (
    DIFFERENT_MODEL,
    RunPaths,
    compare,
    format_table,
    paper_model_id,
    same_model,
)

QWEN = "Qwen/Qwen2.5-7B-Instruct"
CONDITIONS = ("base", "persona", "prism")


def _every_other(k: int, group: str) -> int:
    return k % 2


def _rows(cond: str, safety_sets: tuple[str, ...], route=_every_other) -> dict[tuple[str, str], list[dict]]:
    """Scored rows of every benchmark under ``cond``: MMLU 70% right, 10 refusals in 16 per safety set
    (persona: 12; AdvBench: 2), MT-Bench 7.5 per turn, prism routes every other item (``route(k, group)``)."""
    out: dict[tuple[str, str], list[dict]] = {("mmlu", cond): [], ("safety", cond): [], ("mtbench", cond): []}
    for d in B.MMLU_DOMAINS:
        for i in range(20):
            out[("mmlu", cond)].append({"id": f"mmlu-{d}-{i}", "group": f"mmlu/{d}", "values": float(i < 14)})
    for s in safety_sets:
        for i in range(16):
            refusals = 2 if s == "advbench" else 12 if cond == "persona" else 10
            row = {"id": f"{s}-{i}", "group": f"safety/{s}", "values": float(i < refusals)}
            out[("safety", cond)].append({**row, "refusal_matcher": row["values"]})
    for c in B.MTBENCH_CATEGORIES:
        for i in range(4):
            out[("mtbench", cond)].append({"id": f"{c}-{i}", "group": f"mtbench/{c}", "values": [7.5, 7.5]})
    if cond == "prism":
        for rows in out.values():
            for k, r in enumerate(rows):
                r.update(route=route(k, r["group"]), gate_prob=0.5)
    return out


def write_eval(
    root: Path,
    safety_sets: tuple[str, ...] = B.SAFETY_SETS,
    persona_length: str = "short",
    *,
    seed: int | None = None,
    conditions: tuple[str, ...] = CONDITIONS,
    route=_every_other,
):
    """An evaluation directory as ``evaluate`` leaves it: item files and the summary (``seed``: an extra
    training seed's)."""
    paths = RunPaths(root, seed)
    rows_by: dict[tuple[str, str], list[dict]] = {}
    for cond in conditions:
        rows_by.update(_rows(cond, safety_sets, route))
    for (bench, cond), rows in rows_by.items():
        files.atomic_write_jsonl(run_paths.item_file(paths.eval, bench, cond), rows)
    settings = EvalSettings(safety_sets=safety_sets, n_resamples=200)
    names = subscore_names(("mtbench", "mmlu", "safety"), safety_sets)
    summary = summarise(rows_by, conditions, names, n_resamples=200)
    summary["settings"] = asdict(settings)
    summary["conditions_config"] = {"persona": {"persona_length": persona_length, "placement": "system"}}
    write_summary(summary, paths.eval)


@pytest.fixture
def run_root(tmp_path) -> Path:
    write_eval(tmp_path)
    return tmp_path


def test_same_model_matches_the_hub_id_or_a_local_copy_of_it():
    assert paper_model_id("qwen2.5-7b") == QWEN
    assert same_model(QWEN, QWEN)
    assert same_model("/models/qwen2.5-7b-instruct/", QWEN)  # a local copy named after the model
    assert not same_model("smollm2-135m-instruct", QWEN)
    assert not same_model("Qwen/Qwen2.5-1.5B-Instruct", QWEN)


def test_verdicts_only_for_the_papers_model(run_root):
    """The 135M run against Qwen2.5-7B numbers says "different model" and no verdict; the same outputs
    labelled as a Qwen2.5-7B run get the verdicts."""
    other = {r.metric: r for r in compare(RunPaths(run_root), "qwen2.5-7b", "smollm2-135m-instruct")}
    safety = other["eval_paper_sets:base:safety"]
    assert safety.value is not None and safety.lo <= 60.3 <= safety.hi  # the paper's number is inside the CI
    for row in other.values():
        assert not row.comparable
        if row.value is not None:
            assert row.difference == DIFFERENT_MODEL
            assert "inside" not in row.difference and "sign" not in row.difference
    same = {r.metric: r for r in compare(RunPaths(run_root), "qwen2.5-7b", QWEN)}
    assert same["eval:base:safety"].comparable
    assert "(paper inside CI)" in same["eval_paper_sets:base:safety"].difference
    assert "sign" in same["effect:mtbench/writing"].difference
    assert same["routing:mtbench/math"].difference == "inside the range"  # prism routes 50%
    table = format_table(list(other.values()), title="t")
    assert "paper inside CI" not in table and DIFFERENT_MODEL in table


PAPER_MODEL_NAMES = ("Qwen2.5-7B-Instruct", "Mistral-7B-Instruct-v0.3", "DeepSeek-R1-Distill")


@pytest.mark.parametrize("model", ["qwen2.5-7b", "mistral-7b", "llama3.1-8b", "deepseek-r1-distill-qwen-7b"])
def test_every_number_names_its_table_or_figure_and_model(run_root, model):
    """Each source says where in the paper (a table, a figure, a section, the study) and which model; the
    printed table (plain and markdown) shows every row's source."""
    rows = compare(RunPaths(run_root), model, paper_model_id(model))
    assert rows
    for r in rows:
        assert any(w in r.source for w in ("table", "Figure", "section", "study")), r.source
        assert any(m in r.source for m in PAPER_MODEL_NAMES) or "across the paper's models" in r.source
    for markdown in (False, True):
        table = format_table(rows, title="t", markdown=markdown)
        for r in rows:
            assert r.source in table
    qwen = {r.metric: r.source for r in compare(RunPaths(run_root), "qwen2.5-7b", QWEN)}
    main = qwen["eval:prism:overall"]
    assert "Qwen2.5-7B-Instruct" in main and "main results table" in main
    assert qwen["correlation:pearson"].startswith("Figure 4")
    assert "Qwen2.5-7B-Instruct" in qwen["routing:mmlu"]


def test_safety_and_overall_rows_name_their_sets_and_a_paper_set_score_beside(run_root, tmp_path):
    """The run's Safety/Overall mix AdvBench in; their labels say so, and a row over the paper's sets
    (HarmBench, JailbreakBench) sits beside each, computed from the same items without AdvBench."""
    rows = compare(RunPaths(run_root), "qwen2.5-7b", QWEN)
    by = {r.metric: r for r in rows}
    mixed = "HarmBench" in by["eval:base:safety"].label and "AdvBench" in by["eval:base:safety"].label
    assert mixed and "JailbreakBench (plain goals)" in by["eval:base:overall"].label
    only = by["eval_paper_sets:base:safety"]
    assert "paper's sets only: JailbreakBench (plain goals), HarmBench; PKU-SafeRLHF not run" in only.label
    assert only.paper == "60.3" and only.value == pytest.approx(62.5)  # 10 of 16 in each paper set
    assert by["eval:base:safety"].value == pytest.approx((62.5 + 62.5 + 12.5) / 3)  # AdvBench mixed in
    metrics = [r.metric for r in rows]
    assert metrics.index("eval_paper_sets:prism:overall") == metrics.index("eval:prism:overall") + 1
    assert by["eval_paper_sets:prism:overall"].value is not None

    # the paper-set scores leave AdvBench's rows out: make AdvBench refuse everything, they do not move
    items = run_paths.item_file(RunPaths(run_root).eval, "safety", "base")
    rows_now = files.read_written_jsonl(items)
    for r in rows_now:
        if r["group"] == "safety/advbench":
            r["values"] = 1.0
    files.atomic_write_jsonl(items, rows_now)
    again = {r.metric: r for r in compare(RunPaths(run_root), "qwen2.5-7b", QWEN)}
    assert again["eval_paper_sets:base:safety"].value == pytest.approx(62.5)
    assert again["eval_paper_sets:base:overall"].value == pytest.approx(
        by["eval_paper_sets:base:overall"].value
    )

    # a run with none of the paper's sets has no paper-set row; its labels still name the sets
    other = tmp_path / "advbench-only"
    write_eval(other, safety_sets=("advbench",))
    rows = {r.metric: r for r in compare(RunPaths(other), "qwen2.5-7b", QWEN)}
    assert (
        "eval_paper_sets:base:safety" not in rows
        and "[safety sets: AdvBench]" in rows["eval:base:safety"].label
    )


def test_persona_rows_carry_the_persona_length_used(run_root, tmp_path):
    by = {r.metric: r for r in compare(RunPaths(run_root), "qwen2.5-7b", QWEN)}
    assert by["effect:mtbench/math"].label.endswith("[this run: short persona]")
    assert by["eval:persona:safety/jailbreakbench"].label.endswith("[this run: short persona]")
    write_eval(tmp_path / "long", persona_length="long")
    by = {r.metric: r for r in compare(RunPaths(tmp_path / "long"), "qwen2.5-7b", QWEN)}
    assert by["effect:mtbench/stem"].label.endswith("[this run: long persona]")


def test_gate_accuracy_is_the_exported_gates_on_the_test_split(run_root):
    """prism.json as fit's export writes it: the test split's score (with a CI) is the table's, labelled
    as such; an older checkpoint without one gives the last validation accuracy, labelled as that."""
    paths = RunPaths(run_root)
    paths.checkpoint.mkdir(parents=True)
    metrics = {
        "after_fit": {"val/gate_acc": 0.9},
        "test": {"rows": 60, "distill": 28, "retain": 32, "split": "test", "gate": "exported",
                 "gate_acc": {"mean": 0.7, "lo": 0.6, "hi": 0.8}, "gate_auroc": None},
    }  # fmt: skip
    prism = paths.checkpoint / run_paths.PRISM_JSON
    files.atomic_write_json(prism, {"training_config": {"metrics": metrics}})
    row = {r.metric: r for r in compare(paths, "qwen2.5-7b", QWEN)}["gate_acc"]
    assert (row.value, row.lo, row.hi) == pytest.approx((70.0, 60.0, 80.0))
    assert (
        row.label.endswith("[exported gate, held-out test split of 60 rows]")
        and row.difference == "inside the range"
    )
    del metrics["test"]
    files.atomic_write_json(prism, {"training_config": {"metrics": metrics}})
    row = {r.metric: r for r in compare(paths, "qwen2.5-7b", QWEN)}["gate_acc"]
    assert row.value == pytest.approx(90.0) and row.lo is None and "no test split" in row.label


def _by_benchmark(k: int, group: str) -> int:
    """Routes all of safety and a quarter of everything else: rates that vary across categories."""
    return int(group.startswith("safety/") or k % 4 == 0)


def test_the_spread_across_training_seeds(run_root):
    """``reproduce --seeds``: a row a fit changes carries each seed's value and their mean and range, beside
    the first seed's CI; an extra seed evaluates only the adapter conditions, so its routing-vs-effect
    correlation pairs its routing rates with the first seed's persona effects; rows no fit changes say so."""
    first = RunPaths(run_root)
    write_eval(run_root, seed=1, route=_by_benchmark)  # every condition: its own summary has the correlation
    write_eval(run_root, seed=2, conditions=("prism",), route=_by_benchmark)  # as reproduce evaluates a seed
    for k, acc in ((None, 0.7), (1, 0.5), (2, 0.6)):
        files.atomic_write_json(
            first.for_seed(k).checkpoint / run_paths.PRISM_JSON,
            {"training_config": {"metrics": {"after_fit": {"val/gate_acc": acc}}}},
        )
    rows = compare(first, "qwen2.5-7b", QWEN, seeds=[first.for_seed(1), first.for_seed(2)])
    by = {r.metric: r for r in rows}

    routing = by["routing:mtbench/math"]  # 2 of 4, then 1 of 4 on both extra seeds
    assert routing.seed_values == pytest.approx([50.0, 25.0, 25.0])
    assert routing.seeds == "33.3 [25.0, 50.0]" and routing.seed_sd == pytest.approx(14.4338, abs=1e-3)
    assert routing.value == pytest.approx(50.0)  # the CI column stays the first seed's
    assert by["gate_acc"].seed_values == pytest.approx([70.0, 50.0, 60.0])
    assert by["eval:prism:mmlu"].seeds == "70.0 [70.0, 70.0]" and by["eval:prism:mmlu"].seed_sd == 0.0
    seed_1 = json.loads(run_paths.eval_summary(first.for_seed(1).eval).read_text())["correlation"]["pearson"]
    corr = by["correlation:pearson"].seed_values
    assert seed_1 is not None and -1.0 <= seed_1 <= 1.0
    assert corr[0] is None  # the first seed routes 50% everywhere: no correlation
    assert corr[1] == pytest.approx(seed_1) and corr[2] == pytest.approx(seed_1)
    assert by["correlation:pearson"].seeds.endswith("(2 of 3 seeds)")
    for metric in ("eval:base:mmlu", "effect:mtbench/math", "study_mmlu:min", "split:distill_pct"):
        assert by[metric].seeds.startswith("same for every seed") and by[metric].seed_values is None
    table = format_table(rows, title="t")
    assert "3 seeds: mean [min, max]" in table and "33.3 [25.0, 50.0]" in table
    assert "seeds:" not in format_table(compare(first, "qwen2.5-7b", QWEN), title="t")  # one seed: as before
