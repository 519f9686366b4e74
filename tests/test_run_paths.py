"""The run-directory layout: the names existing runs were written with (a changed name would make old
runs unresumable), and no module outside ``run_paths`` spelling them again."""

from __future__ import annotations

import re
from pathlib import Path

from prism_lightning import run_paths as R
from prism_lightning.bootstrap.store import StageStore

PACKAGE = Path(R.__file__).parent


def test_the_layout_is_the_one_existing_runs_were_written_with():
    run = Path("runs/default")
    assert R.bootstrap_summary(run) == run / "bootstrap/summary.json"
    store = StageStore(R.bootstrap_dir(run), "teacher", {"k": 1})
    assert store.path.parent == run / "bootstrap" and re.fullmatch(r"teacher-[0-9a-f]{12}", store.path.name)
    assert store.path.name == f"teacher-{store.hash[:12]}"
    names = (store.meta_path.name, store.rows_path.name, store.done_path.name, store.shard_path(2).name)
    assert names == ("meta.json", "rows.jsonl", "DONE", "shard-2.jsonl")
    assert R.tensor_file(1, "ab12") == "tensors-1-ab12.safetensors"
    assert R.BOOTSTRAP_STAGES == ("queries", "answers", "verdicts", "teacher")
    assert R.last_checkpoint(run) == run / "lightning/last.ckpt"
    assert R.predictions_file(run) == run / "predictions.jsonl"
    assert R.default_export_dir(run) == Path("checkpoints/default")
    assert (R.PRISM_JSON, R.GATE_FILE, R.ADAPTER_DIR, R.ADAPTERS_DIR) == (
        "prism.json", "gate.safetensors", "adapter", "adapters",
    )  # fmt: skip
    out = Path("out")
    assert R.eval_summary(out) == out / "summary.json" and R.eval_summary_csv(out) == out / "summary.csv"
    assert R.item_file(out, "mmlu", "prism") == out / "items/mmlu__prism.jsonl"
    cell = R.study_cell("matched", "short", "system")
    assert R.item_file(out, "mmlu", cell) == out / "items/mmlu__matched__short__system.jsonl"
    assert R.parse_item_file(out / "items/mmlu__matched__short__system.jsonl") == ("mmlu", cell)
    assert (R.study_csv(out), R.study_json(out)) == (out / "study.csv", out / "study.json")
    assert (R.report_md(out), R.figure_file(out, "roc")) == (out / "report.md", out / "roc.png")
    paths = R.RunPaths(Path("r"))
    got = [paths.run, paths.checkpoint, paths.eval, paths.study, paths.report, paths.state]
    assert [p.as_posix() for p in got] == [
        "r/run",
        "r/checkpoint",
        "r/eval",
        "r/study",
        "r/report",
        "r/reproduce.json",
    ]
    assert (paths.comparison_md.name, paths.comparison_json.name) == ("comparison.md", "comparison.json")


def test_item_files_lists_one_condition_or_all(tmp_path):
    assert R.item_files(tmp_path) == []  # no items/ yet
    for name in ("mmlu__prism", "mmlu__base", "gsm8k__prism"):
        R.item_file(tmp_path, *name.split("__")).parent.mkdir(exist_ok=True)
        R.item_file(tmp_path, *name.split("__")).write_text("")
    assert [p.stem for p in R.item_files(tmp_path, "prism")] == ["gsm8k__prism", "mmlu__prism"]
    assert len(R.item_files(tmp_path)) == 3


def test_no_other_module_spells_the_layout():
    """The file names of a run directory appear as string literals only in run_paths.py."""
    names = [
        "summary.json", "summary.csv", "rows.jsonl", "meta.json", "DONE", "prism.json", "gate.safetensors",
        "study.csv", "study.json", "report.md", "last.ckpt", "predictions.jsonl", "reproduce.json",
        "comparison.md", "comparison.json",
    ]  # fmt: skip
    alternatives = "|".join(map(re.escape, names))
    literal = re.compile(rf"""(["'])(?:[^"'\n]*/)?({alternatives})\1""")  # a whole string or its last part
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "run_paths.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if literal.search(line) and not line.lstrip().startswith("#"):
                found.append(f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
