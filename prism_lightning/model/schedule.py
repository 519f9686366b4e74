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


class GateEarlyStopping(L.Callback):
    """The gate's own schedule inside the joint loop: early stopping on its validation AUROC.

    The reference trains its gate apart from the LoRA, with early stopping. Here both train in one loop
    (the gate reads layer ``gate_layer``, which the LoRA never touches); this callback gives the gate its
    own stopping rule without a second loop: after every validation it keeps the gate weights of the best
    ``val/gate_auroc`` so far (the pass before training counts, when ``validate_before_fit`` runs), stops
    the gate's updates once ``patience`` validations in a row bring no improvement (the LoRA trains on), and
    puts the best gate back when fit ends, before the export. Single-process and DDP runs; not FSDP.
    """

    monitor = "val/gate_auroc"

    # no ``monitor`` argument: jsonargparse carries a same-named init arg over from the callback that a
    # config's list replaces (the default config's ModelCheckpoint monitors val/loss)
    def __init__(self, patience: int = 3, min_delta: float = 0.0) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience, self.min_delta = patience, min_delta
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict | None = None
        self.stale = 0
        self.stopped_epoch: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        gate = getattr(pl_module, "gate", None)
        if trainer.sanity_checking or value is None or gate is None or self.stopped_epoch is not None:
            return
        value = float(value)
        epoch = trainer.current_epoch if trainer.state.fn == "fit" else -1  # -1: before training
        if self.best is None or value > self.best + self.min_delta:
            self.best, self.best_epoch, self.stale = value, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in gate.state_dict().items()}
        elif trainer.state.fn == "fit":
            self.stale += 1
            if self.stale >= self.patience:
                self.stopped_epoch = epoch

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self.stopped_epoch is not None:  # AdamW skips parameters without a gradient (no decay either)
            for p in pl_module.gate.parameters():
                p.grad = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.best_state is None:
            return
        pl_module.gate.load_state_dict(self.best_state)
        when = "before training" if self.best_epoch == -1 else f"after epoch {self.best_epoch}"
        stop = "never stopped" if self.stopped_epoch is None else f"stopped after epoch {self.stopped_epoch}"
        if trainer.is_global_zero:
            print(f"gate schedule: best {self.monitor} {self.best:.4f} {when} (kept); gate {stop}")

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "best_state": self.best_state,
                "stale": self.stale, "stopped_epoch": self.stopped_epoch}  # fmt: skip

    def load_state_dict(self, state_dict: dict) -> None:
        for key in ("best", "best_epoch", "best_state", "stale", "stopped_epoch"):
            setattr(self, key, state_dict.get(key))
        self.stale = self.stale or 0
