"""Evaluation: MT-Bench, MMLU and safety benchmarks under the paper's conditions, the routing
analysis, and the persona-effect study (``evaluate`` and ``study`` commands).

The command entry points are imported on first use, so ``prism_lightning.eval.scoring`` (pure
statistics, used by the analysis package) does not pull in the models."""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate_command", "evaluate_main", "study_command", "study_main"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from prism_lightning.eval import cli

        return getattr(cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
