"""Writes `predict`'s routed generations as JSONL, one file per rank, rows in dataloader order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter


class RoutedPredictionWriter(BasePredictionWriter):
    """Each row: id, query, response, route (adapter on?) and the gate's probability."""

    def __init__(self, output: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)

    def _path(self, trainer) -> Path:
        if trainer.world_size == 1:
            return self.output
        return self.output.with_name(f"{self.output.stem}.rank{trainer.global_rank}{self.output.suffix}")

    def on_predict_start(self, trainer, pl_module) -> None:
        path = self._path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def write_on_batch_end(
        self,
        trainer,
        pl_module,
        prediction: list[dict[str, Any]],
        batch_indices,
        batch,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        with self._path(trainer).open("a", encoding="utf-8") as f:
            for row in prediction:
                f.write(json.dumps(row) + "\n")

    def on_predict_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            print(f"predictions written to {self._path(trainer)}")
