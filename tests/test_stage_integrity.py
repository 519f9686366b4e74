"""A finished stage is reused only while its files match the hashes in its meta.json.

Each case damages one file of a copy of a clean tiny run, reruns the bootstrap and checks that a warning
names the stage, its directory and the damage, that the stage and every later stage were recomputed
(the earlier ones were not), and that the rows equal the clean run's: generation is seeded per row, so
recomputing on CPU is deterministic.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from prism_lightning.backbone import BackboneConfig
from prism_lightning.bootstrap import StageStore, run_bootstrap, stage_stores
from prism_lightning.bootstrap.summary import STAGES
from prism_lightning.bootstrap.teacher import load_teacher_targets
from prism_lightning.testing import tiny_bootstrap_config

TRAINER = {"accelerator": "cpu", "enable_progress_bar": False}


@pytest.fixture(scope="module")
def clean(tiny_model_dir, tmp_path_factory):
    """One uninterrupted run; every case works on its own copy."""
    backbone = BackboneConfig(model=str(tiny_model_dir))
    run_dir = tmp_path_factory.mktemp("clean") / "run"
    result = run_bootstrap(tiny_bootstrap_config(), backbone, run_dir, TRAINER)
    assert result.rows("teacher"), "the tiny config must send some rows to the teacher"
    return result, backbone


def copy_run(clean, tmp_path) -> tuple[Path, dict[str, StageStore]]:
    result, backbone = clean
    run_dir = tmp_path / "run"
    shutil.copytree(result.run_dir, run_dir)
    return run_dir, stage_stores(tiny_bootstrap_config(), backbone, run_dir)


def rerun(clean, run_dir, caplog):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prism_lightning.bootstrap"):
        again = run_bootstrap(tiny_bootstrap_config(), clean[1], run_dir, TRAINER)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    return again, [w for w in warnings if w.startswith("bootstrap stage ")]


def teacher_tensors(result) -> dict[str, dict[str, torch.Tensor]]:
    return load_teacher_targets(result.stage_dirs["teacher"], result.rows("teacher"))


def first_tensor_file(store: StageStore) -> Path:
    return store.path / sorted(json.loads(store.meta_path.read_text())["tensor_files"])[0]


# -- the damage done to one stage: (stage, what to do to it, the words the warning must contain) -------
def truncate_rows(store: StageStore) -> str:
    data = store.rows_path.read_bytes()
    cut = len(data) * 2 // 3
    while data[cut - 1 : cut] == b"\n":  # cut inside a line, not after one
        cut += 1
    store.rows_path.write_bytes(data[:cut])
    whole, total = data[:cut].count(b"\n"), data.count(b"\n")
    return f"rows.jsonl has {whole} rows and a torn last line, meta says {total}"


def garble_line(store: StageStore) -> str:
    lines = store.rows_path.read_bytes().split(b"\n")
    lines[1] = b'{"id": "math-1", "que\x00\xff garbled'
    store.rows_path.write_bytes(b"\n".join(lines))
    return "rows.jsonl line 2 is not a JSON object"


def delete_rows(store: StageStore) -> str:
    store.rows_path.unlink()
    return "rows.jsonl is missing"


def garble_meta(store: StageStore) -> str:
    text = store.meta_path.read_text()
    store.meta_path.write_text(text[: len(text) // 2])
    return "meta.json is not valid JSON"


def delete_meta(store: StageStore) -> str:
    store.meta_path.unlink()
    return "meta.json is missing although DONE is present"


def delete_done(store: StageStore) -> str:
    store.done_path.unlink()
    return "the DONE marker is missing"


def truncate_tensors(store: StageStore) -> str:
    path = first_tensor_file(store)
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size - 10])
    return f"{path.name} has {size - 10} bytes, meta says {size}"


def garble_tensors(store: StageStore) -> str:
    path = first_tensor_file(store)
    data = bytearray(path.read_bytes())
    data[-3:] = bytes(255 - b for b in data[-3:])  # same size, other values
    path.write_bytes(bytes(data))
    return f"{path.name} differs from the sha256 in meta.json"


def delete_tensors(store: StageStore) -> str:
    path = first_tensor_file(store)
    path.unlink()
    return f"{path.name} is missing"


CASES = [
    ("answers", truncate_rows),
    ("verdicts", garble_line),
    ("queries", delete_rows),
    ("answers", garble_meta),
    ("teacher", delete_meta),
    ("verdicts", delete_done),
    ("teacher", truncate_tensors),
    ("teacher", garble_tensors),
    ("teacher", delete_tensors),
]


@pytest.mark.parametrize(("stage", "damage"), CASES, ids=[f"{s}-{d.__name__}" for s, d in CASES])
def test_damaged_stage_is_recomputed_with_the_stages_after_it(clean, tmp_path, caplog, stage, damage):
    run_dir, stores = copy_run(clean, tmp_path)
    expected = damage(stores[stage])
    assert not stores[stage].is_done()
    with pytest.raises(RuntimeError, match="rerun the bootstrap"):  # what the datamodule would see
        stores[stage].read_rows()

    again, warnings = rerun(clean, run_dir, caplog)

    ours = [w for w in warnings if w.startswith(f"bootstrap stage {stage} ")]
    assert len(ours) == 1, warnings
    assert str(stores[stage].path) in ours[0] and expected in ours[0]
    later = STAGES[STAGES.index(stage) + 1 :]
    for name in later:  # each deleted later stage is named with its directory
        assert any(f"bootstrap stage {name} ({stores[name].path}) comes after {stage}" in w for w in warnings)
    cached = {name: st["cached"] for name, st in again.summary["stages"].items()}
    assert cached == {name: STAGES.index(name) < STAGES.index(stage) for name in STAGES}
    assert expected in again.summary["stages"][stage]["recomputed_because"]
    result = clean[0]
    assert {s: again.rows(s) for s in STAGES} == {s: result.rows(s) for s in STAGES}
    got, want = teacher_tensors(again), teacher_tensors(result)
    assert got.keys() == want.keys()
    for row_id, tensors in want.items():
        assert all(torch.equal(got[row_id][k], v) for k, v in tensors.items())
    assert all(store.is_done() for store in stores.values())


def test_later_stage_computed_from_other_upstream_rows_is_stale(clean, tmp_path, caplog):
    """An upstream stage recomputed into different rows (another GPU, a deleted directory) keeps its
    directory name; the stages after it notice through the upstream content hashes in their meta."""
    run_dir, stores = copy_run(clean, tmp_path)
    answers = stores["answers"]
    rows = answers.read_rows()
    rows[0]["persona_answer"] = "An answer from another run."
    meta = answers.meta()
    answers.finish(rows, {k: v for k, v in meta.items() if k in ("seconds", "jobs", "stats")})

    again, warnings = rerun(clean, run_dir, caplog)

    stale = [w for w in warnings if w.startswith("bootstrap stage verdicts ")]
    assert len(stale) == 1 and "computed from answers rows that have changed since" in stale[0]
    cached = {name: st["cached"] for name, st in again.summary["stages"].items()}
    assert cached == {"queries": True, "answers": True, "verdicts": False, "teacher": False}
    lineage = json.loads(stores["teacher"].meta_path.read_text())["upstream_rows_sha256"]
    assert lineage["answers"] == answers.meta()["rows_sha256"]
    assert [r["id"] for r in again.rows("verdicts")] == [r["id"] for r in clean[0].rows("verdicts")]


def test_run_finished_before_content_hashes_is_checked_and_kept(clean, tmp_path, caplog, monkeypatch):
    """Stages finished by a version that wrote no hashes are reused when their files are whole (and get
    their hashes recorded); one with a torn rows.jsonl is recomputed like any other."""
    run_dir, stores = copy_run(clean, tmp_path)
    hashes = ("rows_sha256", "tensor_files", "upstream_rows_sha256")
    before = {}
    for name, store in stores.items():
        meta = json.loads(store.meta_path.read_text())
        before[name] = {k: meta.pop(k) for k in hashes}
        store.meta_path.write_text(json.dumps(meta))
    expected = truncate_rows(stores["verdicts"])

    again, warnings = rerun(clean, run_dir, caplog)

    assert any(w.startswith("bootstrap stage verdicts ") and expected in w for w in warnings), warnings
    cached = {name: st["cached"] for name, st in again.summary["stages"].items()}
    assert cached == {"queries": True, "answers": True, "verdicts": False, "teacher": False}
    for name, store in stores.items():  # recorded for the kept stages, written anew for the others
        meta = json.loads(store.meta_path.read_text())
        assert {k: meta[k] for k in hashes} == before[name]
    assert {s: again.rows(s) for s in STAGES} == {s: clean[0].rows(s) for s in STAGES}

    def no_load(*args, **kwargs):
        raise AssertionError("an intact run must not load a model")

    monkeypatch.setattr(BackboneConfig, "load", no_load)
    third, warnings = rerun(clean, run_dir, caplog)
    assert all(st["cached"] for st in third.summary["stages"].values()) and not warnings


def test_tensor_file_of_a_run_finished_before_content_hashes_is_checked_whole(clean, tmp_path):
    """Without recorded hashes a tensor file is checked against its own safetensors header."""
    _, stores = copy_run(clean, tmp_path)
    teacher = stores["teacher"]
    path = first_tensor_file(teacher)
    meta = json.loads(teacher.meta_path.read_text())
    for key in ("rows_sha256", "tensor_files", "upstream_rows_sha256"):
        del meta[key]
    teacher.meta_path.write_text(json.dumps(meta))
    assert teacher.check().done and teacher.check().legacy
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size - 10])
    check = teacher.check()
    assert not check.done and check.problem == f"{path.name} has {size - 10} bytes, its header says {size}"
