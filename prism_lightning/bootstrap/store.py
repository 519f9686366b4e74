"""Run-directory artifact store: one directory per stage, keyed by a hash of everything that made it.

Layout of a stage: ``<run_dir>/bootstrap/<stage>-<hash12>/`` with

* ``meta.json``: format version, stage settings, upstream stage hashes, counts, timings, ``done``, and
  what a finished stage is checked against before it is reused (see :meth:`StageStore.check`):
  ``rows`` and ``rows_sha256`` of rows.jsonl, ``tensor_files`` (``{name: {"sha256", "bytes"}}`` of every
  tensor file a row names in ``tensor_file``) and ``upstream_rows_sha256`` (``{stage: rows_sha256}`` of
  every earlier stage this one was computed from);
* ``shard-<rank>.jsonl``: rows appended by rank ``rank`` while the stage runs (one JSON object per
  line, flushed and fsynced per batch; a partial last line left by a kill is ignored and repaired);
* ``rows.jsonl``: the merged, ordered result, written atomically once every row exists;
* ``DONE``: written last; a stage is finished when this marker exists and the check passes.

The directory hash covers the stage name, :data:`FORMAT_VERSION`, the settings that affect the stage
and the hashes of its upstream stages, so changing a setting recomputes that stage and everything
downstream of it, and nothing else. The directory name cannot see *content*: a file damaged after the
stage finished, or an upstream stage recomputed into different rows, is caught by the content hashes
in meta.json instead. Every file that is not appended to is written to a temporary file and renamed
into place, so a kill never leaves a half-written file behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prism_lightning import run_paths
from prism_lightning.errors import PrismError
from prism_lightning.files import (
    append_jsonl,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    read_written_jsonl,
    sha256_file,
)

log = logging.getLogger(__name__)

#: Bumped whenever the on-disk layout or a row schema changes incompatibly.
FORMAT_VERSION = 1
DONE_MARKER = run_paths.STAGE_DONE
#: The row field that names the stage file holding that row's tensors.
TENSOR_FILE_FIELD = "tensor_file"

# Kept for data/datamodule.py, which still imports it from here; new code imports from files.py.


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


_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file, remembered per (path, inode, size, mtime, ctime): one fit checks a cached stage
    several times (runner, prepare_data, setup, read_rows) and should hash each file once."""
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


@dataclass(frozen=True)
class StageCheck:
    """What a stage directory holds.

    ``done``: a finished stage that may be reused. ``problem``: why a directory that claims more than it
    holds (a finished stage with a damaged file, a broken meta.json, rows computed from other upstream
    rows) must not be reused; None for a stage that is merely absent or unfinished. ``legacy``: finished
    by a version that wrote no content hashes; it passed the structural checks only.
    """

    done: bool
    problem: str | None = None
    legacy: bool = False


def _rows_problem(path: Path, meta: Mapping[str, Any]) -> str | None:
    """Why rows.jsonl does not match meta.json (None when it does). Hashes first; the file is parsed
    only to say what is wrong, or to check a legacy stage that recorded a row count but no hash."""
    if not path.is_file():
        return "rows.jsonl is missing"
    want_sha, want_rows = meta.get("rows_sha256"), meta.get("rows")
    if want_sha is not None and file_digest(path) == want_sha:
        return None
    *lines, tail = path.read_bytes().split(b"\n")
    whole, bad = 0, None
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            row = None
        if isinstance(row, dict):
            whole += 1
        elif bad is None:
            bad = number
    if tail.strip():
        return f"rows.jsonl has {whole} rows and a torn last line, meta says {want_rows}"
    if bad is not None:
        return f"rows.jsonl line {bad} is not a JSON object ({whole} whole rows, meta says {want_rows})"
    if whole != want_rows:
        return f"rows.jsonl has {whole} rows, meta says {want_rows}"
    if want_sha is None:
        return None
    return "rows.jsonl differs from the sha256 in meta.json"


def _tensor_files_problem(directory: Path, files: Any) -> str | None:
    if not isinstance(files, dict) or not all(isinstance(want, dict) for want in files.values()):
        return "meta.json's tensor_files is not a {name: {sha256, bytes}} object"
    for name, want in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want.get("bytes"):
            return f"{name} has {size} bytes, meta says {want.get('bytes')}"
        if file_digest(path) != want.get("sha256"):
            return f"{name} differs from the sha256 in meta.json"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """Structural check of a safetensors file (header parses, data ends where the header says)."""
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length)) if 8 + length <= size else None
    except (struct.error, ValueError, UnicodeDecodeError):
        header = None
    try:
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, IndexError):
        return f"{path.name} has no readable safetensors header"
    if size != 8 + length + end:
        return f"{path.name} has {size} bytes, its header says {8 + length + end}"
    return None


def finished_dir_problem(directory: Path, meta: Mapping[str, Any]) -> str | None:
    """Why the finished stage in ``directory`` (whose parsed meta.json is ``meta``) cannot be reused, or
    None. Checks DONE, rows.jsonl and the tensor files; not the stage hash nor the upstream rows."""
    if not (directory / DONE_MARKER).exists():
        return "the DONE marker is missing although meta.json says the stage finished"
    problem = _rows_problem(directory / run_paths.STAGE_ROWS, meta)
    if problem is not None:
        return problem
    if "tensor_files" in meta:
        return _tensor_files_problem(directory, meta["tensor_files"])
    rows = read_written_jsonl(directory / run_paths.STAGE_ROWS)
    for name in sorted({r[TENSOR_FILE_FIELD] for r in rows if TENSOR_FILE_FIELD in r}):
        # legacy: no hashes recorded, so check that every named file is whole
        problem = _safetensors_problem(directory / name)
        if problem is not None:
            return problem
    return None


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
        self.upstream_stores = list(upstream)
        self.upstream = {up.stage: up.hash for up in upstream}
        self.hash = stage_hash(stage, self.settings, [up.hash for up in upstream])
        self.path = run_paths.stage_dir(root, stage, self.hash)

    # -- paths ---------------------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.path / run_paths.STAGE_META

    @property
    def rows_path(self) -> Path:
        return self.path / run_paths.STAGE_ROWS

    @property
    def done_path(self) -> Path:
        return self.path / DONE_MARKER

    def shard_path(self, rank: int) -> Path:
        return self.path / run_paths.shard_file(rank)

    def shard_paths(self) -> list[Path]:
        return sorted(self.path.glob(run_paths.SHARD_GLOB)) if self.path.exists() else []

    # -- state ---------------------------------------------------------------------------------
    def _load_meta(self) -> tuple[dict[str, Any] | None, str | None]:
        """(meta, None), (None, None) when there is no meta.json, or (None, what is wrong with it)."""
        try:
            text = self.meta_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None, None
        except (OSError, UnicodeDecodeError):
            return None, "meta.json cannot be read"
        try:
            meta = json.loads(text)
        except ValueError:
            return None, "meta.json is not valid JSON"
        if not isinstance(meta, dict):
            return None, "meta.json is not a JSON object"
        return meta, None

    def meta(self) -> dict[str, Any]:
        """meta.json, or {} when it is absent or unreadable (for summaries; :meth:`check` judges it)."""
        return self._load_meta()[0] or {}

    def upstream_lineage(self) -> dict[str, str] | None:
        """``{stage: rows_sha256}`` of every earlier stage, read from the upstream stores' meta.json;
        None while one of them has no recorded hash (unfinished, or finished by an older version)."""
        lineage: dict[str, str] = {}
        for up in self.upstream_stores:
            meta = up.meta()
            if not meta.get("done") or not meta.get("rows_sha256"):
                return None
            lineage.update(meta.get("upstream_rows_sha256") or {})
            lineage[up.stage] = meta["rows_sha256"]
        return lineage

    def check(self) -> StageCheck:
        """Whether this directory holds a finished stage that may be reused; reads, never writes.

        Raises :class:`IncompatibleRunError` only for a meta.json of another format version; a damaged
        one is reported as a problem, like any other damaged file, so that the stage is recomputed.
        """
        if not self.path.is_dir():
            return StageCheck(False)
        has_done = self.done_path.exists()
        meta, problem = self._load_meta()
        if problem is not None:
            return StageCheck(False, problem)
        if meta is None:
            return StageCheck(False, "meta.json is missing although DONE is present" if has_done else None)
        version = meta.get("format_version")
        if isinstance(version, int) and version != FORMAT_VERSION:
            raise IncompatibleRunError(
                f"{self.path} was written by an incompatible version of prism_lightning (format "
                f"{version!r}, this version writes {FORMAT_VERSION}). Delete that directory to "
                "recompute the stage, or choose another run_dir."
            )
        if version != FORMAT_VERSION:
            return StageCheck(False, f"meta.json has format_version {version!r}")
        if meta.get("hash") != self.hash:
            return StageCheck(False, f"meta.json names another stage hash ({str(meta.get('hash'))[:12]})")
        lineage = self.upstream_lineage()
        recorded = meta.get("upstream_rows_sha256")
        if recorded is not None and not isinstance(recorded, dict):
            return StageCheck(False, "meta.json's upstream_rows_sha256 is not an object")
        if lineage is not None and recorded is not None and recorded != lineage:
            changed = ", ".join(sorted(k for k in {*recorded, *lineage} if recorded.get(k) != lineage.get(k)))
            return StageCheck(False, f"it was computed from {changed} rows that have changed since")
        if not meta.get("done"):
            if has_done:
                return StageCheck(False, "DONE is present but meta.json says the stage is unfinished")
            return StageCheck(False)
        problem = finished_dir_problem(self.path, meta)
        if problem is not None:
            return StageCheck(False, problem)
        if lineage is None:
            waiting = [up.stage for up in self.upstream_stores]
            return StageCheck(False, f"upstream stage {', '.join(waiting)} is not finished")
        return StageCheck(True, legacy="rows_sha256" not in meta or recorded is None)

    def is_done(self) -> bool:
        return self.check().done

    def begin(self) -> None:
        """Create the directory and its meta.json (not done) if absent; safe to call on every rank."""
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
            "upstream_rows_sha256": self.upstream_lineage(),
            "done": False,
        }
        meta.update(extra)
        atomic_write_json(self.meta_path, meta)

    def _content_record(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The meta.json fields that a later :meth:`check` compares the files against."""
        names = sorted({r[TENSOR_FILE_FIELD] for r in rows if r.get(TENSOR_FILE_FIELD)})
        return {
            "rows": len(rows),
            "rows_sha256": file_digest(self.rows_path),
            "tensor_files": {
                name: {"sha256": file_digest(self.path / name), "bytes": (self.path / name).stat().st_size}
                for name in names
            },
            "upstream_rows_sha256": self.upstream_lineage(),
        }

    def record_legacy_hashes(self) -> None:
        """Add the content hashes to the meta.json of a stage finished by a version that wrote none.
        Only call after :meth:`check` passed it (count, whole lines, whole tensor files)."""
        meta = self.meta()
        meta.update(self._content_record(read_written_jsonl(self.rows_path)))
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
        """Write rows.jsonl, then meta (done, with the content hashes), then the DONE marker."""
        atomic_write_jsonl(self.rows_path, rows)
        self.write_meta({**extra_meta, **self._content_record(rows), "done": True})
        atomic_write_text(self.done_path, "done\n")

    def read_rows(self) -> list[dict[str, Any]]:
        check = self.check()
        if not check.done:
            why = f": {check.problem}; rerun the bootstrap to recompute it" if check.problem else ""
            raise RuntimeError(f"stage {self.stage} at {self.path} is not finished{why}")
        return read_written_jsonl(self.rows_path)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
