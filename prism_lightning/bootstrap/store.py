"""Run-directory artifact store: one directory per stage, keyed by a hash of everything that made it.

Layout of a stage: ``<run_dir>/bootstrap/<stage>-<hash12>/`` with

* ``meta.json``: format version, stage settings, upstream stage hashes, counts, timings, ``done``;
* ``shard-<rank>.jsonl``: rows appended by rank ``rank`` while the stage runs (one JSON object per
  line, flushed and fsynced per batch; a partial last line left by a kill is ignored and repaired);
* ``rows.jsonl``: the merged, ordered result, written atomically once every row exists;
* ``DONE``: written last; a stage is finished exactly when this marker exists.

The hash covers the stage name, :data:`FORMAT_VERSION`, the settings that affect the stage and the
hashes of its upstream stages, so changing a setting recomputes that stage and everything downstream
of it, and nothing else. Every file that is not appended to is written to a temporary file and
renamed into place, so a kill never leaves a half-written file behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prism_lightning.errors import PrismError
from prism_lightning.files import (  # noqa: F401  (re-exported for the stage modules)
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    read_written_jsonl,
    repair_jsonl,
)

log = logging.getLogger(__name__)

#: Bumped whenever the on-disk layout or a row schema changes incompatibly.
FORMAT_VERSION = 1
DONE_MARKER = "DONE"


class IncompatibleRunError(PrismError, RuntimeError):
    """A stage directory written by an incompatible version of this package."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def stage_hash(stage: str, settings: Mapping[str, Any], upstream: Sequence[str] = ()) -> str:
    """sha256 over (stage, format version, settings, upstream hashes)."""
    payload = canonical_json(
        {"stage": stage, "format": FORMAT_VERSION, "settings": settings, "upstream": list(upstream)}
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class StageStore:
    """The directory of one stage run; see the module docstring for the layout."""

    def __init__(
        self,
        root: str | Path,
        stage: str,
        settings: Mapping[str, Any],
        upstream: Sequence[StageStore] = (),
    ) -> None:
        self.stage = stage
        self.settings = dict(settings)
        self.upstream = {up.stage: up.hash for up in upstream}
        self.hash = stage_hash(stage, self.settings, [up.hash for up in upstream])
        self.path = Path(root) / f"{stage}-{self.hash[:12]}"

    # -- paths ---------------------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.path / "meta.json"

    @property
    def rows_path(self) -> Path:
        return self.path / "rows.jsonl"

    @property
    def done_path(self) -> Path:
        return self.path / DONE_MARKER

    def shard_path(self, rank: int) -> Path:
        return self.path / f"shard-{rank}.jsonl"

    def shard_paths(self) -> list[Path]:
        return sorted(self.path.glob("shard-*.jsonl")) if self.path.exists() else []

    # -- state ---------------------------------------------------------------------------------
    def read_meta(self) -> dict[str, Any] | None:
        if not self.meta_path.exists():
            return None
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise IncompatibleRunError(
                f"{self.meta_path} is not valid JSON ({exc}); delete {self.path} to recompute this stage."
            ) from exc
        return meta

    def check_compatible(self) -> None:
        """Raise :class:`IncompatibleRunError` when the directory was written by another format."""
        meta = self.read_meta()
        if meta is None:
            if self.done_path.exists():
                raise IncompatibleRunError(f"{self.path} has a DONE marker but no meta.json; delete it.")
            return
        version = meta.get("format_version")
        if version != FORMAT_VERSION or meta.get("hash") != self.hash:
            raise IncompatibleRunError(
                f"{self.path} was written by an incompatible version of prism_lightning (format "
                f"{version!r}, this version writes {FORMAT_VERSION}). Delete that directory to "
                "recompute the stage, or choose another run_dir."
            )

    def is_done(self) -> bool:
        self.check_compatible()
        return self.done_path.exists() and self.rows_path.exists()

    def begin(self) -> None:
        """Create the directory and its meta.json (not done) if absent; safe to call on every rank."""
        self.check_compatible()
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.meta_path.exists():
            self.write_meta({})

    def write_meta(self, extra: Mapping[str, Any]) -> None:
        meta = {
            "format_version": FORMAT_VERSION,
            "stage": self.stage,
            "hash": self.hash,
            "settings": self.settings,
            "upstream": self.upstream,
            "done": False,
        }
        meta.update(extra)
        atomic_write_json(self.meta_path, meta)

    # -- rows ----------------------------------------------------------------------------------
    def read_shards(self) -> dict[str, dict[str, Any]]:
        """Rows already written by any rank, keyed by id (first occurrence wins)."""
        rows: dict[str, dict[str, Any]] = {}
        for path in self.shard_paths():
            for row in read_written_jsonl(path):
                rows.setdefault(row["id"], row)
        return rows

    def append(self, rank: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append rows to this rank's shard and make them durable before returning."""
        if not rows:
            return
        append_jsonl(self.shard_path(rank), rows)

    def finish(self, rows: Sequence[Mapping[str, Any]], extra_meta: Mapping[str, Any]) -> None:
        """Write rows.jsonl, then meta (done), then the DONE marker, each atomically."""
        atomic_write_jsonl(self.rows_path, rows)
        self.write_meta({**extra_meta, "done": True, "rows": len(rows)})
        atomic_write_text(self.done_path, "done\n")

    def read_rows(self) -> list[dict[str, Any]]:
        if not self.is_done():
            raise RuntimeError(f"stage {self.stage} at {self.path} is not finished")
        return read_written_jsonl(self.rows_path)

    def meta(self) -> dict[str, Any]:
        return self.read_meta() or {}

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


read_jsonl = read_written_jsonl
