"""query_prompt: examples — the writer continues a list of a context's example queries."""

from __future__ import annotations

import pytest

from prism_lightning.bootstrap.queries import filter_queries, query_jobs
from prism_lightning.contexts import ContextFileError, ContextLibrary, load_context_file


class _Formatter:
    def prompt(self, text, context=None, placement="system"):
        return f"<user>{text}</user><assistant>"


def _fact_sheet():
    return ContextLibrary.from_config(["examples/fact_sheet.yaml"]).select(["fact_sheet"])[0]


def test_each_query_is_primed_with_its_own_draw_of_examples():
    sheet = _fact_sheet()
    jobs = query_jobs(_Formatter(), [sheet], 6, examples=(0, 3))
    again = query_jobs(_Formatter(), [sheet], 6, examples=(0, 3))
    assert [j["prompt"] for j in jobs] == [j["prompt"] for j in again]  # deterministic
    for job in jobs:
        listed = job["prompt"].split("<assistant>", 1)[1]
        assert listed.endswith("4.") and listed.count("\n") == 3
        assert sum(q in listed for q in sheet.example_queries) == 3
        assert "Tarsin Velo K9 folding e-bike" in job["prompt"]  # a reference context shows its text
    assert len({j["prompt"] for j in jobs}) == 6
    later = query_jobs(_Formatter(), [sheet], 2, examples=(0, 3), first_index=6)
    assert [j["id"] for j in later] == ["fact_sheet-6", "fact_sheet-7"]


def test_a_query_that_copies_an_example_is_dropped_as_known():
    rows = [
        {"id": "a-0", "persona": "a", "index": 0, "raw": "Why do cats purr?"},
        {"id": "a-1", "persona": "a", "index": 1, "raw": "why do cats purr!"},
        {"id": "a-2", "persona": "a", "index": 2, "raw": "How heavy is the Tarsin Velo K9 folded?"},
    ]
    kept, drops, _ = filter_queries(rows, 8, known=["Why do cats purr?"])
    assert [r["id"] for r in kept] == ["a-2"]
    assert drops["a"]["known"] == 2


def test_example_queries_must_be_a_list_of_strings(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("desk:\n  kind: reference\n  text: A sheet.\n  example_queries: one question\n")
    with pytest.raises(ContextFileError, match="example_queries must be a list"):
        load_context_file(bad)
