"""Benchmark items: which are scored (:func:`select_items`), their cache keys, and the resumable store
of their scored rows (:class:`ItemStore`, one JSONL file per benchmark and condition).

Every row carries ``key``: a hash of the item's content, the condition's settings, the benchmark's
settings and the model. A rerun skips items whose row exists with the same key and redoes the rest,
so an interrupted run loses at most the chunk in flight, and changing a setting never reuses stale
rows (they are dropped from the file when it is next written). The file is read with
:func:`prism_lightning.files.read_written_jsonl`: a line torn by a kill is dropped (its item is
recomputed), never parsed as data, and cut off before the next append.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path

from prism_lightning import files
from prism_lightning.eval import benchmarks as B
from prism_lightning.eval.settings import BENCHMARKS, EvalInputError, EvalSettings

__all__ = ["ItemStore", "item_key", "select_items"]


def select_items(benchmark: str, settings: EvalSettings) -> list[dict]:
    """Benchmark rows to score, each with ``group`` (its sub-score name); ``limit`` per group.

    MMLU's per-domain subset (when limited) is a seeded random sample, so it spans subjects.
    """
    p, limit = settings.paths, settings.limit
    if benchmark == "mtbench":
        rows = B.load_mtbench(p.get("mtbench"), references=p.get("mtbench_references"))
        return _per_group(rows, lambda r: f"mtbench/{r['category']}", limit)
    if benchmark == "mmlu":
        rows = B.load_mmlu(p.get("mmlu"))
        if limit is not None:
            rng = random.Random(settings.seed)
            rows = rows[:]
            rng.shuffle(rows)
        picked = _per_group(rows, lambda r: f"mmlu/{r['domain']}", limit)
        return sorted(picked, key=lambda r: r["id"]) if limit is not None else picked
    if benchmark == "safety":
        rows = B.load_safety(settings.safety_sets, paths={s: p[s] for s in settings.safety_sets if s in p})
        return _per_group(rows, lambda r: f"safety/{r['set']}", limit)
    raise EvalInputError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARKS)}.")


def _per_group(rows: list[dict], group: Callable[[dict], str], limit: int | None) -> list[dict]:
    counts: dict[str, int] = {}
    out = []
    for r in rows:
        g = group(r)
        if limit is not None and counts.get(g, 0) >= limit:
            continue
        counts[g] = counts.get(g, 0) + 1
        out.append({**r, "group": g})
    return out


def item_key(item: dict, base: dict) -> str:
    """The cache key of one item's row: its content (without the ``group`` label) and ``base`` (the
    benchmark's settings, the condition's config and the model)."""
    content = {k: v for k, v in item.items() if k != "group"}
    blob = json.dumps({"item": content, **base}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ItemStore:
    """One JSONL file of scored rows keyed by ``id``; rows whose ``key`` differs are stale."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: dict[str, dict] = {}
        self._loaded = [r for r in files.read_written_jsonl(self.path) if "id" in r]
        # whether every line of the file is a loaded row and the file ends on a newline; if not (a torn
        # tail, a garbled line), the file is rewritten before anything is appended to it
        self._clean = not self.path.exists() or self._whole_lines() == len(self._loaded)

    def _whole_lines(self) -> int | None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            return None
        return sum(1 for line in data.split(b"\n") if line.strip())

    def reuse(self, keys: dict[str, str]) -> int:
        """Keep loaded rows whose key matches ``keys[id]`` (the last one of an id wins); rewrite the file
        (atomically) when anything was dropped: stale rows, duplicates, garbled lines or a torn tail."""
        kept = {r["id"]: r for r in self._loaded if keys.get(r["id"]) == r.get("key")}
        self.rows = kept
        if len(kept) != len(self._loaded) or not self._clean:
            files.atomic_write_jsonl(self.path, self.rows.values())
            self._clean = True
        self._loaded = []
        return len(kept)

    def append(self, rows: Iterable[dict]) -> None:
        """Add rows durably (fsync'd before this returns)."""
        rows = list(rows)
        if not rows:
            return
        if not self._clean:  # never glue a row onto a torn line (reuse() was not called)
            files.repair_jsonl(self.path)
            self._clean = True
        files.append_jsonl(self.path, rows)
        for row in rows:
            self.rows[row["id"]] = row
