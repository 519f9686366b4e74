"""How many optimiser steps a fit takes, how it warms up, and the learning-rate factor per step."""

from __future__ import annotations

import math

import lightning as L

LR_SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup over ``warmup`` steps, then ``schedule`` down to 0 at ``total`` (constant stays 1)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if not total or schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def training_plan(trainer: L.Trainer, steps: int, warmup: int) -> dict[str, int | None]:
    """Rows, batch sizes and optimiser steps of a fit as Lightning will run it. Per epoch each process
    gets ceil(rows / world) rows (the distributed sampler repeats a few to even them out), so
    ceil(that / batch) micro-batches, and Lightning steps after every ``accumulate`` micro-batches and
    after the epoch's last: ceil(micro-batches / accumulate) steps, which equals ceil(rows / global)."""
    dm = getattr(trainer, "datamodule", None)
    rows = len(dm.train_set) if getattr(dm, "train_set", None) is not None else None
    batch = getattr(dm, "batch_size", None) if dm is not None else None
    world, accumulate = int(trainer.world_size), int(trainer.accumulate_grad_batches)
    micro = trainer.num_training_batches
    return {
        "rows": rows,
        "world_size": world,
        "per_device_batch": batch,
        "accumulate_grad_batches": accumulate,
        "global_batch": batch * accumulate * world if batch else None,
        "steps_per_epoch": math.ceil(micro / accumulate) if math.isfinite(micro) else None,
        "optimizer_steps": steps,
        "warmup_steps": warmup,
    }


def format_plan(plan: dict[str, int | None]) -> str:
    """The plan as one block, printed when fit starts."""
    labels = {
        "rows": "training rows",
        "world_size": "world size (processes)",
        "per_device_batch": "per-device batch",
        "accumulate_grad_batches": "gradient accumulation",
        "global_batch": "global batch",
        "steps_per_epoch": "optimiser steps / epoch",
        "optimizer_steps": "optimiser steps",
        "warmup_steps": "warmup steps",
    }
    lines = ["training plan"]
    lines += [f"  {label:<26}{'-' if plan[key] is None else plan[key]:>8}" for key, label in labels.items()]
    return "\n".join(lines)
