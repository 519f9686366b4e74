"""Run benchmarks under conditions, store one JSONL row per scored item, summarise.

Layout of ``--out DIR``::

    DIR/items/<benchmark>__<condition>.jsonl   one row per scored item (resumable cache, items.py)
    DIR/summary.json                           every score with its 95% bootstrap CI, routing, correlation
    DIR/summary.csv                            the same scores, tidy (condition, score, mean, lo, hi, ...)

Which items are scored and how rows are cached: :mod:`~prism_lightning.eval.items`; how each
benchmark scores them: :mod:`~prism_lightning.eval.scorers`; what the summary holds and how it is
shown: :mod:`~prism_lightning.eval.summary`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from prism_lightning import run_paths
from prism_lightning.contexts import ContextLibrary
from prism_lightning.engines.base import Engine
from prism_lightning.eval.conditions import Condition
from prism_lightning.eval.items import ItemStore, item_key, select_items
from prism_lightning.eval.scorers import CHUNK, SCORERS, ScoringContext
from prism_lightning.eval.settings import (
    BENCHMARKS,
    EvalInputError,
    EvalSettings,
    check_benchmarks,
    resolve_judge_mode,
    subscore_names,
)
from prism_lightning.eval.summary import summarise, write_summary

log = logging.getLogger(__name__)

__all__ = ["evaluate", "run_benchmark"]


def run_benchmark(
    ctx: ScoringContext, benchmark: str, cond, items: list[dict], store: ItemStore
) -> dict[str, float]:
    """Score ``items`` under ``cond`` into ``store``, skipping rows already there; returns counts."""
    base_key = {"bench": ctx.settings.bench_config(benchmark), "cond": cond.config(), "model": ctx.model_id}
    generation = getattr(ctx.engine, "generation_identity", None)  # None on hf: its keys stay as they were
    if generation is not None:
        base_key["generation"] = generation
    thinking = thinking_identity(ctx, benchmark)
    if thinking:
        base_key["thinking"] = thinking
    backend = getattr(ctx.engine, "backend", "hf")
    keys = {r["id"]: item_key(r, base_key) for r in items}
    reused = store.reuse(keys)
    todo = [r for r in items if r["id"] not in store.rows]
    start = time.perf_counter()
    chunk = CHUNK[benchmark]
    for s in range(0, len(todo), chunk):
        rows = SCORERS[benchmark](ctx, cond, todo[s : s + chunk])
        for row in rows:
            row["key"] = keys[row["id"]]
            row["backend"] = backend
        store.append(rows)
        log.info("%s/%s: %d/%d new items scored", benchmark, cond.name, min(s + chunk, len(todo)), len(todo))
    counts = {"reused": reused, "new": len(todo), "seconds": round(time.perf_counter() - start, 2)}
    if thinking:
        counts.update(thinking_counts([r for r in store.rows.values() if r["id"] in keys]))
    return counts


def thinking_identity(ctx: ScoringContext, benchmark: str) -> dict:
    """What thinking adds to a row's key: the budget and format of the evaluated model and of the judge when
    they think (MT-Bench and safety; MMLU scores its letters without generating); nothing otherwise, so the
    rows of models that do not think keep their keys."""
    if benchmark == "mmlu":
        return {}
    budget = ctx.settings.thinking_max_new_tokens
    roles = {"model": ctx.engine.thinking, "judge": ctx.judge.thinking}
    return {role: {"max_new_tokens": budget, **fmt.identity()} for role, fmt in roles.items() if fmt}


def thinking_counts(rows: Sequence[dict]) -> dict[str, int]:
    """Thinking blocks of the rows (answers and judge calls) and how many ran out of the budget: they were
    closed for the model, and what was scored follows a cut reasoning."""
    closed = [
        c for r in rows for key in ("thinking_closed", "judge_thinking_closed") for c in r.get(key) or []
    ]
    cut = sum(1 for c in closed if not c)
    if cut:
        log.warning(
            "%d of %d thinking blocks ran out of --thinking_max_new_tokens and were closed for the model",
            cut, len(closed),
        )  # fmt: skip
    return {"thinking_blocks": len(closed), "thinking_unterminated": cut}


def evaluate(
    engine: Engine,
    *,
    benchmarks: Sequence[str] = BENCHMARKS,
    conditions: Sequence[Condition],
    settings: EvalSettings,
    out: Path,
    model_id: str,
    judge: Engine | None = None,
    library: ContextLibrary | None = None,
) -> dict:
    """Score every (benchmark, condition), resumably, and write ``summary.json`` / ``summary.csv``."""
    out = Path(out)
    benchmarks = check_benchmarks(benchmarks)
    for c in conditions:
        if c.needs_checkpoint and not engine.has_adapter:
            raise EvalInputError(f"condition {c.name!r} needs a PRISM checkpoint (--checkpoint)")
    settings = resolve_judge_mode(settings, judge or engine)
    ctx = ScoringContext(engine, judge or engine, library or ContextLibrary.builtin(), settings, model_id)
    rows_by: dict[tuple[str, str], list[dict]] = {}
    runs = {}
    for b in benchmarks:
        items = select_items(b, settings)
        for c in conditions:
            store = ItemStore(run_paths.item_file(out, b, c.name))
            runs[f"{b}/{c.name}"] = run_benchmark(ctx, b, c, items, store)
            wanted = {r["id"] for r in items}
            rows_by[(b, c.name)] = [r for r in store.rows.values() if r["id"] in wanted]
            log.info("%s/%s: %s", b, c.name, runs[f"{b}/{c.name}"])
    names = subscore_names(benchmarks, settings.safety_sets)
    summary = summarise(
        rows_by, [c.name for c in conditions], names, n_resamples=settings.n_resamples, seed=settings.seed
    )
    summary["runs"] = runs
    summary["settings"] = asdict(settings)
    summary["conditions_config"] = {c.name: c.config() for c in conditions}
    summary["model"] = model_id
    summary["backend"] = getattr(engine, "backend", "hf")
    write_summary(summary, out)
    return summary
