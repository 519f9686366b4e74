"""Training history from W&B offline run files (``RUN/wandb/offline-run-*/run-*.wandb``), decoded with
W&B's own protobuf ``Record``: the record log is a LevelDB-style block file, so reading it needs no
network, no ``wandb sync`` and no private W&B modules (which change between releases)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["wandb_history", "wandb_records"]

_BLOCK = 32768
_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version
_RECORD = struct.Struct("<IHB")  # crc32, length, type (1 full, 2 first, 3 middle, 4 last)


def wandb_records(path: Path) -> Iterator[bytes]:
    """Payloads of a W&B ``.wandb`` record log (LevelDB log format: 32 KiB blocks, chunked records)."""
    data = path.read_bytes()
    if len(data) < _HEADER.size or _HEADER.unpack_from(data)[0] != b":W&B":
        raise ValueError(f"{path} is not a W&B record log")
    pos, buf = _HEADER.size, b""
    while pos + _RECORD.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _RECORD.size:  # block trailer padding
            pos += left
            continue
        _, length, kind = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left - _RECORD.size
            continue
        chunk = data[pos : pos + length]
        pos += length
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk
            buf = b""


def wandb_history(path: Path) -> list[dict[str, Any]]:
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for payload in wandb_records(path):
        record = pb.Record()
        try:
            record.ParseFromString(payload)
        except Exception:  # noqa: BLE001 - a record cut off by a run still writing: keep what came before
            break
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            try:
                row[key] = json.loads(item.value_json)
            except ValueError:
                continue
        rows.append(row)
    return rows
