"""Durable file I/O shared by every stage: atomic writes, appends that survive a kill, content hashes,
and the two JSONL readers.

There are two kinds of JSONL file and they get different rules on a bad line:

* **input files** a user hands us (``predict_file``, benchmark files): every non-blank line must be a
  JSON object; a bad one is the user's to fix, so :func:`read_input_jsonl` raises a :class:`PrismError`
  naming the file and line number;
* **files this package appends to** (stage shards, evaluation item stores): a kill can leave a last line
  without its newline. :func:`read_written_jsonl` drops that torn tail (its row is recomputed) and never
  parses it as data; a garbled line in the middle is skipped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prism_lightning.errors import PrismError

log = logging.getLogger(__name__)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, then rename over ``path``: a kill leaves the old file or the
    new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def jsonl_text(rows: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)


def atomic_write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    atomic_write_text(path, jsonl_text(rows))


def append_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append rows and make them durable before returning (flush + fsync)."""
    data = jsonl_text(rows)
    if not data:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def repair_jsonl(path: str | Path) -> None:
    """Cut a torn last line (from a kill mid-write) so that later appends start on a fresh line."""
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as fh:
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())


def read_written_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file this package appends to. A missing file has no rows; an unterminated last
    line is a torn write and is dropped; an unparsable or non-object line is skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines[:-1], 1):  # the last element never had its newline
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            log.warning("%s:%d is not a JSON object; ignoring it (the row is recomputed).", path, number)
    if lines[-1].strip():
        log.warning("%s ends in a torn line (an interrupted write); that row will be recomputed.", path)
    return rows


def check_output_dir(path: str | Path, what: str) -> Path:
    """``path`` as a directory a command may create or reuse; a :class:`PrismError` when it, or a folder
    it would be made in, is an existing file (``mkdir`` would fail there only after the long work)."""
    path = Path(path).expanduser()
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                where = "is a file" if part == path else f"lies under {part}, which is a file"
                raise PrismError(f"{what} {path} {where}; give a directory.")
            break
    return path


def read_input_jsonl(path: str | Path, *, what: str = "file") -> list[dict[str, Any]]:
    """Rows of a user's JSONL file; a missing file or a line that is not a JSON object is a
    :class:`PrismError` naming the file and the line."""
    path = Path(path)
    if path.is_dir():
        raise PrismError(f"{what} {path} is a directory; give a JSONL file.")
    if not path.is_file():
        raise PrismError(f"{what} {path} does not exist.")
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                msg = f"{path}:{number}: not valid JSON ({exc.msg}); fix or remove the line."
                raise PrismError(msg) from None
            if not isinstance(row, dict):
                got = type(row).__name__
                raise PrismError(f"{path}:{number}: expected a JSON object per line, got {got}.")
            rows.append(row)
    return rows


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
