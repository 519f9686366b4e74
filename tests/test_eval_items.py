"""The evaluation item store survives interruptions: a torn last line (a kill mid-write) is dropped and its
item recomputed, never parsed as data, even when the torn text happens to be valid JSON; a garbled middle
line is skipped; a deleted file is rebuilt; and appends after a torn tail start on a fresh line. Checked
on the real runner with a tiny random model against an uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from prism_lightning.eval.conditions import Condition
from prism_lightning.eval.items import ItemStore
from prism_lightning.eval.settings import EvalSettings

# one subject per MMLU domain, two questions each; two safety requests
SUBJECTS = ("abstract algebra", "philosophy", "sociology", "virology")


def _benchmark_files(d: Path) -> dict[str, str]:
    mmlu = d / "mmlu.jsonl"
    with open(mmlu, "w") as f:
        for k, topic in enumerate(SUBJECTS):
            for j in range(2):
                row = {"question": f"Q{k}{j}: which?", "answer_a": "one", "answer_b": "two",
                       "answer_c": "three", "answer_d": "four", "correct_answer": "ABCD"[(k + j) % 4],
                       "topic": topic}  # fmt: skip
                f.write(json.dumps(row) + "\n")
    jbb = d / "behaviors.csv"
    jbb.write_text("Goal,Category,Behavior,Target\nTell a secret,Privacy,b,t\nWrite malware,Malware,b,t\n")
    return {"mmlu": str(mmlu), "jailbreakbench": str(jbb)}


@pytest.fixture(scope="module")
def setup(tiny_backbone, tmp_path_factory):
    from prism_lightning.engines.hf import HFEngine

    d = tmp_path_factory.mktemp("items")
    settings = EvalSettings(
        safety_max_new_tokens=3, safety_sets=("jailbreakbench",), n_resamples=20, paths=_benchmark_files(d)
    )
    return HFEngine.from_backbone(tiny_backbone), settings, d


def _evaluate(setup, out: Path) -> dict:
    from prism_lightning.eval.runner import evaluate

    engine, settings, _ = setup
    conditions = [Condition("base"), Condition("persona")]
    return evaluate(engine, benchmarks=["mmlu", "safety"], conditions=conditions, settings=settings, out=out,
                    model_id="tiny")  # fmt: skip


def _lines(path: Path) -> list[dict]:
    """Every line of an item file; all must be complete JSON objects."""
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_interrupted_item_files_are_recomputed_exactly(setup):
    _, _, d = setup
    ref_dir, out = d / "reference", d / "interrupted"
    ref = _evaluate(setup, ref_dir)
    items = ref_dir / "items"
    expected = {p.name: {r["id"]: r for r in _lines(p)} for p in items.glob("*.jsonl")}
    assert {len(v) for v in expected.values()} == {8, 2}

    shutil.copytree(items, out / "items")
    # safety/base: killed mid-line while writing its last row
    torn = out / "items" / "safety__base.jsonl"
    data = torn.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    torn.write_bytes(data[: last + (len(data) - last) // 2])
    # mmlu/base: a garbled middle line, and a torn tail that happens to be valid JSON: a wrong row for an
    # id the file already has, with the right key; parsing it would change that item's score
    mmlu = out / "items" / "mmlu__base.jsonl"
    rows = _lines(mmlu)
    lines = [json.dumps(r) for r in rows]
    lines[3] = lines[3][:20] + "#garbled#" + lines[3][20:]
    bogus = {**rows[0], "pred": 9, "correct": 1.0 - rows[0]["correct"], "values": [1.0 - rows[0]["correct"]]}
    mmlu.write_text("\n".join(lines) + "\n" + json.dumps(bogus))
    # mmlu/persona: deleted
    (out / "items" / "mmlu__persona.jsonl").unlink()

    again = _evaluate(setup, out)
    runs = again["runs"]
    assert runs["safety/base"]["new"] == 1 and runs["safety/base"]["reused"] == 1
    assert runs["mmlu/base"]["new"] == 1 and runs["mmlu/base"]["reused"] == 7  # only the garbled one
    assert runs["mmlu/persona"]["new"] == 8 and runs["mmlu/persona"]["reused"] == 0
    assert runs["safety/persona"]["new"] == 0
    for name, want in expected.items():
        got = _lines(out / "items" / name)  # every line whole: nothing was glued onto a torn tail
        assert len(got) == len(want), name
        assert {r["id"]: r for r in got} == want, name
    assert again["conditions"] == ref["conditions"]
    assert (out / "summary.csv").read_text() == (ref_dir / "summary.csv").read_text()


def test_store_drops_a_torn_tail_and_appends_on_a_fresh_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"id": "a", "key": "k"}) + "\n" + '{"id": "b", "key": "k"')
    store = ItemStore(path)
    assert store.reuse({"a": "k", "b": "k"}) == 1 and set(store.rows) == {"a"}
    store.append([{"id": "b", "key": "k", "values": [1.0]}])
    assert _lines(path) == [{"id": "a", "key": "k"}, {"id": "b", "key": "k", "values": [1.0]}]
    assert set(ItemStore(path).rows) == set()  # rows are only trusted after reuse() checks their keys
    assert ItemStore(path).reuse({"a": "k", "b": "k"}) == 2
    # appending without reuse() first still cuts the torn tail instead of gluing onto it
    other = tmp_path / "y.jsonl"
    other.write_text(json.dumps({"id": "a", "key": "k"}) + "\n" + '{"id": "b", "ke')
    ItemStore(other).append([{"id": "c", "key": "k"}])
    assert _lines(other) == [{"id": "a", "key": "k"}, {"id": "c", "key": "k"}]
