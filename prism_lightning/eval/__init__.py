"""Evaluation: MT-Bench, MMLU and safety benchmarks under the paper's conditions, the routing
analysis, and the persona-effect study (``evaluate`` and ``study`` commands)."""

from prism_lightning.eval.cli import evaluate_main, study_main

__all__ = ["evaluate_main", "study_main"]
