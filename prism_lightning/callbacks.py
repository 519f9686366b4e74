"""The export as a Lightning callback: ``Trainer.fit(PrismModule, PrismDataModule)`` from Python
writes the same checkpoint directory as ``python -m prism_lightning fit``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from prism_lightning import run_paths
from prism_lightning.errors import require

log = logging.getLogger(__name__)

EXPORT_FROM = ("last", "best")


class PrismExport(Callback):
    """Export adapter + gate + prism.json when fit finishes normally (not after an interrupt).

    Args:
        export_dir: where to write; default ``checkpoints/<name of data.run_dir>``.
        export_from: ``last`` exports the weights at the end of training; ``best`` reloads the
            ModelCheckpoint's best checkpoint (by its monitored metric) first.
        training_config: stored in prism.json (the CLI passes the resolved config); default the
            module's hyperparameters.
    """

    def __init__(
        self, export_dir: str | None = None, export_from: str = "last", training_config: dict | None = None
    ) -> None:
        require(
            export_from in EXPORT_FROM,
            f"export_from must be one of {', '.join(EXPORT_FROM)}, got {export_from!r}.",
        )
        self.export_dir = export_dir
        self.export_from = export_from
        self.training_config = training_config
        self.metrics_before: dict[str, float] = {}
        self.exported: Path | None = None
        self.exported_from: dict[str, Any] = {}
        self.test_scores: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.export_from == "best":
            ckpt = trainer.checkpoint_callback
            require(
                ckpt is not None and getattr(ckpt, "monitor", None) is not None,
                "export_from=best needs a ModelCheckpoint callback with a monitor (e.g. val/loss); "
                "use export_from=last or add one.",
            )

    def resolve_dir(self, trainer: L.Trainer) -> Path:
        if self.export_dir:
            return Path(self.export_dir)
        run_dir = getattr(trainer.datamodule, "run_dir", None) or "default"
        return run_paths.default_export_dir(run_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from prism_lightning.model.export import export_checkpoint
        from prism_lightning.model.sharding import is_sharded, trainable_state_dict

        after = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.exported_from = {
            "weights": "last",
            "epochs": trainer.current_epoch,  # completed: the loop has moved past the last one
            "global_step": trainer.global_step,
        }
        if self.export_from == "best":
            self._load_best(trainer, pl_module)
        self.test_scores = self._score_on_test_split(trainer, pl_module)
        out = self.resolve_dir(trainer)
        # A sharded module holds only this rank's shards: every rank gathers, rank 0 writes.
        state = trainable_state_dict(pl_module) if is_sharded(pl_module) else None
        if trainer.is_global_zero:
            dm = trainer.datamodule
            training = dict(self.training_config or pl_module.training_config())
            training["metrics"] = {"before_fit": self.metrics_before, "after_fit": after}
            if self.test_scores is not None:
                training["metrics"]["test"] = self.test_scores
            training["exported_from"] = self.exported_from
            training["plan"] = dict(getattr(pl_module, "plan", {}))
            export_checkpoint(
                pl_module,
                out,
                personas=list(getattr(dm, "persona_names", [])),
                bootstrap_summary=getattr(dm, "bootstrap_summary", None),
                training_config=training,
                trainable_state=state,
            )
        trainer.strategy.barrier("prism_export")
        self.exported = out

    def _score_on_test_split(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any] | None:
        """The gate about to be exported on the data module's test split; None without one. The gate's
        early stopping puts its best gate back in its own ``on_fit_end``, which runs first when it comes
        before this callback in the list (fit's CLI appends this one last). Every rank runs the same
        rows: a sharded model's layers gather across ranks."""
        from prism_lightning.model.gate_eval import gate_scores, held_out_gate_probs

        dm = trainer.datamodule
        if not getattr(dm, "test_set", None) or getattr(pl_module, "gate", None) is None:
            return None
        probs, targets = held_out_gate_probs(pl_module, dm.test_dataloader())
        scores = gate_scores(probs, targets, float(pl_module.hparams.threshold))
        scores["split"] = "test"
        scores["gate"] = "exported"
        return scores

    def _load_best(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if not best:
            log.warning(
                "export_from=best: no best checkpoint was saved (no validation ran); exporting the last."
            )
            return
        ckpt = torch.load(best, map_location="cpu", weights_only=True)
        load_trainable_state(pl_module, ckpt["state_dict"])
        self.exported_from = {
            "weights": "best",
            "checkpoint": str(best),
            "epochs": (ckpt.get("epoch") or 0) + 1,
            "global_step": ckpt.get("global_step"),
            "score": float(trainer.checkpoint_callback.best_model_score),
        }


def load_trainable_state(module: L.LightningModule, state: dict[str, torch.Tensor]) -> None:
    """Load adapter + gate tensors (a ``.ckpt``'s state_dict, whole tensors) into ``module``; a sharded
    module takes its own shard of each (every rank calls this)."""
    from prism_lightning.model.sharding import is_sharded

    if not is_sharded(module):
        module.load_state_dict(state, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # a copy: the loader replaces the dict's values with this rank's shards
    set_model_state_dict(module, dict(state), options=StateDictOptions(full_state_dict=True, strict=False))
