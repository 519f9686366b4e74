"""``python -m prism_lightning study``: the persona-effect grid, no training needed.

For every persona x length (min/short/long) x placement (system/user/none) and every benchmark
category (8 MT-Bench categories, 4 MMLU domains, 3 safety sets), the base model's score with that
persona in the prompt and its paired difference from the no-persona prompt, both with 95% bootstrap
CIs. ``placement none`` puts the persona nowhere: it *is* the no-persona baseline (delta 0), listed
so the grid is complete. ``--personas matched`` (default) uses each category's own expert persona
(MT-Bench: the category persona; MMLU: helpful; safety: safety_monitor); ``all`` or a list applies
each named persona to every category.

Writes ``OUT/study.csv`` (tidy: one row per cell x category) and ``OUT/study.json``; items are cached
under ``OUT/items`` exactly as ``evaluate`` does, so reruns resume.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prism_lightning.chat_format import PLACEMENTS
from prism_lightning.contexts import LENGTHS, ContextLibrary
from prism_lightning.eval import scoring as S
from prism_lightning.eval.conditions import matched_persona

log = logging.getLogger(__name__)

__all__ = ["PersonaCell", "run_study", "study_cli"]


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
        return f"{self.persona}__{self.length}__{self.placement}"

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
    engine,
    *,
    benchmarks,
    personas: list[str],
    lengths: list[str],
    placements: list[str],
    settings,
    out: Path,
    model_id: str,
    judge=None,
    library: ContextLibrary | None = None,
) -> list[dict]:
    from prism_lightning.eval.runner import (
        Context,
        ItemStore,
        resolve_judge_mode,
        run_benchmark,
        select_items,
    )

    library = library or ContextLibrary.builtin()
    settings = resolve_judge_mode(settings, judge or engine)
    ctx = Context(engine, judge or engine, library, settings, model_id)
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
            store = ItemStore(out / "items" / f"{bench}__{cell.name}.jsonl")
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
                scale = 1.0 if bench == "mtbench" else 100.0
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
    out.mkdir(parents=True, exist_ok=True)
    if records:
        with open(out / "study.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows(records)
    (out / "study.json").write_text(json.dumps({"model": model_id, "cells": records}, indent=2))
    return records


def _s(v, scale):
    return None if v is None or not math.isfinite(v) else round(v * scale, 4)


def study_cli(argv: list[str] | None = None) -> int:
    from prism_lightning.eval.cli import _csv, add_common_args, load_judge, settings_from, wandb_log

    ap = argparse.ArgumentParser(
        prog="python -m prism_lightning study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--benchmarks", default="mtbench,mmlu,safety")
    ap.add_argument("--personas", default="matched", help="matched (default), all, or a comma list of names")
    ap.add_argument("--lengths", default=",".join(LENGTHS))
    ap.add_argument("--placements", default=",".join(PLACEMENTS))
    ap.add_argument("--out", required=True, type=Path)
    add_common_args(ap)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from prism_lightning.backbone import DEFAULT_MODEL, BackboneConfig, default_device, inference_dtype
    from prism_lightning.eval.engine import Engine

    library = ContextLibrary.builtin()
    personas = _csv(args.personas)
    if personas == ["all"]:
        personas = library.names
    for p in personas:
        if p != "matched":
            library.get(p)  # unknown names fail here, listing the available ones
    lengths, placements = _csv(args.lengths), _csv(args.placements)
    for length in lengths:
        if length not in LENGTHS:
            ap.error(f"unknown length {length!r}; choose from {', '.join(LENGTHS)}")
    for pl in placements:
        if pl not in PLACEMENTS:
            ap.error(f"unknown placement {pl!r}; choose from {', '.join(PLACEMENTS)}")
    device = args.device or default_device()
    args.dtype = inference_dtype(args.dtype, device)
    t0 = time.perf_counter()
    bb = BackboneConfig(model=args.model or DEFAULT_MODEL, dtype=args.dtype).load(device)
    records = run_study(
        Engine.from_backbone(bb),
        benchmarks=_csv(args.benchmarks),
        personas=personas,
        lengths=lengths,
        placements=placements,
        settings=settings_from(args),
        out=args.out,
        model_id=f"{bb.name}:{args.dtype}",
        judge=load_judge(args, device),
        library=library,
    )
    print(
        f"{'persona':<16} {'length':<6} {'placement':<9} {'category':<24} {'score':>8} {'delta [95% CI]':>26}"
    )
    for r in records:
        d = "-" if r["delta"] is None else f"{r['delta']:+.2f} [{r['delta_lo']:+.2f},{r['delta_hi']:+.2f}]"
        sc = "-" if r["score"] is None else f"{r['score']:.2f}"
        cat = f"{r['benchmark']}/{r['category']}"
        print(f"{r['persona']:<16} {r['length']:<6} {r['placement']:<9} {cat:<24} {sc:>8} {d:>26}")
    print(f"\nwrote {args.out / 'study.csv'} and study.json in {time.perf_counter() - t0:.0f} s")
    if args.wandb:
        wandb_log(args, "study", {"study/grid": records})
    return 0
