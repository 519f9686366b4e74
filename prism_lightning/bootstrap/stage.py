"""Running one bootstrap stage as a Lightning ``trainer.predict`` over the rows it still lacks.

* :class:`StageTask` (LightningModule): ``predict_step(batch)`` turns a list of job dicts into a list
  of output rows (each carries the job's ``id``).
* :class:`PendingJobs` (LightningDataModule): ``predict_dataloader`` over the jobs whose id is in no
  shard yet; collate = list of dicts, no shuffling. Under DDP Lightning's sampler splits the jobs
  across ranks without repeating any.
* :class:`ShardWriter` (BasePredictionWriter, ``write_interval="batch"``): appends each batch's rows
  to ``shard-<global_rank>.jsonl`` (flush + fsync). Rows may carry tensors under ``"_tensors"``;
  those go to a safetensors file (written atomically) named in the row's ``tensor_file``, *before*
  the row is appended, so a row on disk always has its tensors.
* :func:`run_stage`: compute pending jobs, predict, barrier, rank 0 merges the shards in job order
  (``finalize`` may filter / summarise), writes ``rows.jsonl`` + meta + DONE, barrier.

Every rank must call :func:`run_stage` for the same stages in the same order: Lightning's subprocess
launcher re-runs the whole command for the other ranks, and later Trainers in those processes reuse
the process group that the first one created.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from prism_lightning import run_paths
from prism_lightning.bootstrap.store import TENSOR_FILE_FIELD, StageStore
from prism_lightning.files import atomic_write_bytes, repair_jsonl

log = logging.getLogger(__name__)

TENSORS_KEY = "_tensors"


def dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def global_rank() -> int:
    """This process's rank, also before Lightning has created the process group."""
    if dist_ready():
        return torch.distributed.get_rank()
    for key in ("RANK", "GLOBAL_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return int(os.environ.get("LOCAL_RANK", 0)) + 0  # single node: local == global


def barrier() -> None:
    if dist_ready():
        torch.distributed.barrier()


class StageTask(L.LightningModule):
    """A LightningModule whose ``predict_step`` maps a batch of jobs to output rows."""

    def process(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int, dataloader_idx: int = 0):
        return self.process(batch)


class _Jobs(Dataset):
    def __init__(self, jobs: Sequence[Mapping[str, Any]]) -> None:
        self.jobs = list(jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return dict(self.jobs[i])


def collate_rows(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(batch)


class PendingJobs(L.LightningDataModule):
    """The jobs of a stage that no shard holds yet, served in a fixed order for ``trainer.predict``."""

    def __init__(self, jobs: Sequence[Mapping[str, Any]], batch_size: int = 8) -> None:
        super().__init__()
        self.jobs = list(jobs)
        self.batch_size = batch_size

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            _Jobs(self.jobs),
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=collate_rows,
            num_workers=0,
        )


class ShardWriter(BasePredictionWriter):
    """Appends every predicted batch to this rank's shard of ``store``."""

    def __init__(self, store: StageStore) -> None:
        super().__init__(write_interval="batch")
        self.store = store
        self.batches = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        repair_jsonl(self.store.shard_path(trainer.global_rank))

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        rank = trainer.global_rank
        rows = [dict(row) for row in prediction]
        tensors: dict[str, torch.Tensor] = {}
        for row in rows:
            tensors.update(row.pop(TENSORS_KEY, None) or {})
        if tensors:
            from safetensors.torch import save

            digest = hashlib.sha256("\n".join(r["id"] for r in rows).encode()).hexdigest()[:16]
            name = run_paths.tensor_file(rank, digest)
            blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
            atomic_write_bytes(self.store.path / name, blob)
            for row in rows:
                row[TENSOR_FILE_FIELD] = name
        self.store.append(rank, rows)
        self.batches += 1


class StopOnSigterm(L.Callback):
    """End a stage on SIGTERM once the batch in flight is written. Lightning stops ``fit`` on SIGTERM but
    its predict loop carries on; a ``kill`` then had no effect until the stage ended. Exit code 143 (the
    shell's code for SIGTERM); a rerun resumes from the shards."""

    def __init__(self, store: StageStore) -> None:
        self.store = store

    def on_predict_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.received_sigterm:
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            if trainer.global_rank == 0:
                print(
                    f"stopped by SIGTERM during the {self.store.stage} stage; the rows written so far are "
                    "kept and the same command resumes from them",
                    file=sys.stderr,
                    flush=True,
                )
            raise SIGTERMException(143)


def make_trainer(trainer_kwargs: Mapping[str, Any] | None, callbacks: list) -> L.Trainer:
    """A Trainer for predict-only stages: no logger, no checkpoints, a progress bar.

    ``devices > 1`` without an explicit strategy uses ``"ddp"`` (Lightning's subprocess launcher,
    works on CPU too).
    """
    kwargs: dict[str, Any] = {
        "accelerator": "auto",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": True,
        "enable_model_summary": False,
    }
    kwargs.update({k: v for k, v in (trainer_kwargs or {}).items() if v is not None})
    devices = kwargs.get("devices")
    many = (isinstance(devices, int) and devices > 1) or (
        isinstance(devices, (list, tuple)) and len(devices) > 1
    )
    if many and kwargs.get("strategy") in (None, "auto"):
        kwargs["strategy"] = "ddp"
    extra = list(kwargs.pop("callbacks", None) or [])
    return L.Trainer(callbacks=extra + callbacks, **kwargs)


def run_stage(
    store: StageStore,
    jobs: Sequence[Mapping[str, Any]],
    make_task: Callable[[], StageTask],
    finalize: Callable[[list[dict[str, Any]]], tuple[list[dict[str, Any]], dict[str, Any]]],
    *,
    batch_size: int,
    trainer_kwargs: Mapping[str, Any] | None = None,
    token_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """Bring ``store`` to done, computing only the missing rows; returns the stage's meta.

    ``finalize(rows)`` gets every row in job order (rank 0 only) and returns the rows to keep and
    extra stats for meta.json. ``token_keys`` name integer row fields summed into "tokens generated".
    """
    start = time.perf_counter()
    ids = [job["id"] for job in jobs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"stage {store.stage}: duplicate job ids")
    store.begin()
    before = store.read_shards()
    pending = [job for job in jobs if job["id"] not in before]
    if before:
        log.info("%s: resuming, %d of %d rows already done", store.stage, len(jobs) - len(pending), len(jobs))
    if pending:
        writer = ShardWriter(store)
        trainer = make_trainer(trainer_kwargs, [writer, StopOnSigterm(store)])  # the batch is written first
        trainer.predict(make_task(), datamodule=PendingJobs(pending, batch_size), return_predictions=False)
    barrier()
    error: str | None = None
    if global_rank() == 0:
        try:
            _merge(store, jobs, before, start, finalize, token_keys)
        except Exception as exc:
            if not dist_ready():
                raise
            error = f"{type(exc).__name__}: {exc}"
    if dist_ready():  # every rank fails together instead of waiting forever at the next barrier
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise RuntimeError(f"stage {store.stage} failed on rank 0: {box[0]}")
    return store.meta()


def _merge(store, jobs, before, start, finalize, token_keys) -> None:
    ids = [job["id"] for job in jobs]
    rows = store.read_shards()
    missing = [i for i in ids if i not in rows]
    if missing:
        raise RuntimeError(f"stage {store.stage}: {len(missing)} rows missing after predict: {missing[:5]}")
    ordered = [rows[i] for i in ids]
    fresh = [rows[i] for i in ids if i not in before]
    final, stats = finalize(ordered)
    seconds = time.perf_counter() - start
    tokens = sum(int(r.get(k, 0) or 0) for r in fresh for k in token_keys)
    store.finish(
        final,
        {
            "seconds": round(seconds, 3),
            "jobs": len(ids),
            "computed_rows": len(fresh),
            "resumed_rows": len(ids) - len(fresh),
            "tokens_generated": tokens,
            "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 and tokens else 0.0,
            "stats": stats,
        },
    )
