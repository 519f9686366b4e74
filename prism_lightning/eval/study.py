"""``python -m prism_lightning study``: the persona-effect grid, no training needed.

For every persona x length (min/short/long) x placement (system/user/none) and every benchmark
category (8 MT-Bench categories, 4 MMLU domains, 3 safety sets), the base model's score with that
persona in the prompt and its paired difference from the no-persona prompt, both with 95% bootstrap
CIs. ``placement none`` puts the persona nowhere: it *is* the no-persona baseline (delta 0), listed
so the grid is complete. ``--personas matched`` (default) uses each category's own expert persona
(MT-Bench: the category persona; MMLU: the domain's expert; safety: safety_monitor); ``all`` or a list applies
each named persona to every category.

Writes ``OUT/study.csv`` (tidy: one row per cell x category) and ``OUT/study.json``; items are cached
under ``OUT/items`` exactly as ``evaluate`` does, so reruns resume.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prism_lightning import files, run_paths
from prism_lightning.chat_format import PLACEMENTS
from prism_lightning.contexts import LENGTHS, ContextLibrary
from prism_lightning.engines.base import Engine
from prism_lightning.eval import scoring as S
from prism_lightning.eval.conditions import matched_persona
from prism_lightning.eval.items import ItemStore, select_items
from prism_lightning.eval.runner import run_benchmark
from prism_lightning.eval.scorers import ScoringContext
from prism_lightning.eval.settings import EvalInputError, EvalSettings, resolve_judge_mode

log = logging.getLogger(__name__)

__all__ = ["PersonaCell", "check_grid", "format_grid", "run_study"]


def check_grid(
    library: ContextLibrary, personas: Sequence[str], lengths: Sequence[str], placements: Sequence[str]
) -> tuple[list[str], list[str], list[str]]:
    """The grid's axes as lists (``all`` expanded to every persona), or an EvalInputError naming the
    unknown value and the valid choices; checked before any model loads."""
    personas = library.names if list(personas) == ["all"] else list(personas)
    _check_axis("persona", personas, ["matched", *library.names], "all, ")
    _check_axis("length", lengths, LENGTHS)
    _check_axis("placement", placements, PLACEMENTS)
    return personas, list(lengths), list(placements)


def _check_axis(what: str, given: Sequence[str], valid: Sequence[str], also: str = "") -> None:
    choices = also + ", ".join(valid)
    if not given:
        raise EvalInputError(f"no {what} given; choose from {choices}.")
    for value in given:
        if value not in valid:
            raise EvalInputError(f"unknown {what} {value!r}; choose from {choices}.")


@dataclass(frozen=True)
class PersonaCell:
    """A condition with one fixed persona (or ``matched``) at one length and placement; base model."""

    persona: str | None  # None: no persona (the baseline)
    length: str = "short"
    placement: str = "system"
    mode: str = "off"
    needs_checkpoint: bool = False

    @property
    def name(self) -> str:
        if self.persona is None or self.placement == "none":
            return "none"
        return run_paths.study_cell(self.persona, self.length, self.placement)

    def config(self) -> dict:
        if self.name == "none":
            return {"condition": "base", "mode": "off"}
        return {"persona": self.persona, "length": self.length, "placement": self.placement, "mode": "off"}

    def context(self, library: ContextLibrary, benchmark: str, category: str, item_id: str):
        if self.name == "none":
            return None, None
        name = matched_persona(library, benchmark, category) if self.persona == "matched" else self.persona
        return name, library.get(name).text(self.length)


def run_study(
    engine: Engine,
    *,
    benchmarks: Sequence[str],
    personas: list[str],
    lengths: list[str],
    placements: list[str],
    settings: EvalSettings,
    out: Path,
    model_id: str,
    judge: Engine | None = None,
    library: ContextLibrary | None = None,
) -> list[dict]:
    """Score every cell of the grid on every benchmark (cached like ``evaluate``) and write the grid."""
    library = library or ContextLibrary.builtin()
    settings = resolve_judge_mode(settings, judge or engine)
    ctx = ScoringContext(engine, judge or engine, library, settings, model_id)
    out = Path(out)
    cells = [PersonaCell(None, "short", "none")]
    for p in personas:
        for length in lengths:
            for pl in placements:
                cells.append(PersonaCell(p, length, pl))
    records = []
    for bench in benchmarks:
        items = select_items(bench, settings)
        wanted = {r["id"] for r in items}
        results: dict[str, dict[str, dict]] = {}
        for cell in cells:
            if cell.name in results:
                continue
            store = ItemStore(run_paths.item_file(out, bench, cell.name))
            info = run_benchmark(ctx, bench, cell, items, store)
            log.info("study %s/%s: %s", bench, cell.name, info)
            results[cell.name] = {r["id"]: r for r in store.rows.values() if r["id"] in wanted}
        base = results["none"]
        groups = sorted({r["group"] for r in items}, key=[r["group"] for r in items].index)
        emitted = set()
        for cell in cells:
            if cell.name in emitted:  # placement "none" is the one baseline, listed once
                continue
            emitted.add(cell.name)
            rows = results[cell.name]
            for g in groups:
                t = {i: r["values"] for i, r in rows.items() if r["group"] == g}
                c = {i: r["values"] for i, r in base.items() if r["group"] == g}
                scale = S.REPORTED_SCALE[bench]
                ci = S.bootstrap_ci(list(t.values()), n_resamples=settings.n_resamples, seed=settings.seed)
                d = S.bootstrap_delta_ci(t, c, n_resamples=settings.n_resamples, seed=settings.seed)
                category = g.split("/", 1)[1]
                used = cell.context(library, bench, category, "-")[0] if cell.name != "none" else None
                records.append(
                    {
                        "persona": cell.persona if cell.name != "none" else "none",
                        "persona_used": used,
                        "length": cell.length if cell.name != "none" else "",
                        "placement": cell.placement,
                        "benchmark": bench,
                        "category": category,
                        "n": ci["n"],
                        "missing": ci["missing"],
                        "score": _s(ci["mean"], scale),
                        "score_lo": _s(ci["lo"], scale),
                        "score_hi": _s(ci["hi"], scale),
                        "delta": _s(d["mean"], scale),
                        "delta_lo": _s(d["lo"], scale),
                        "delta_hi": _s(d["hi"], scale),
                    }
                )
    if records:
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows(records)
        files.atomic_write_text(run_paths.study_csv(out), buf.getvalue())
    files.atomic_write_json(run_paths.study_json(out), {"model": model_id, "cells": records})
    return records


def _s(v, scale):
    return None if v is None or not math.isfinite(v) else round(v * scale, 4)


def format_grid(records: list[dict]) -> str:
    """The grid as a plain-text table: one line per cell x category, score and delta [95% CI]."""
    head = (
        f"{'persona':<16} {'length':<6} {'placement':<9} {'category':<24} {'score':>8} {'delta [95% CI]':>26}"
    )
    lines = [head]
    for r in records:
        d = "-" if r["delta"] is None else f"{r['delta']:+.2f} [{r['delta_lo']:+.2f},{r['delta_hi']:+.2f}]"
        sc = "-" if r["score"] is None else f"{r['score']:.2f}"
        cat = f"{r['benchmark']}/{r['category']}"
        lines.append(f"{r['persona']:<16} {r['length']:<6} {r['placement']:<9} {cat:<24} {sc:>8} {d:>26}")
    return "\n".join(lines)
