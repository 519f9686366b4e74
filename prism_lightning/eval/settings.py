"""What an evaluation run is configured by, besides the model and the conditions: the benchmarks and
their sub-scores, and :class:`EvalSettings` (everything that changes a score, so every cached row's
key is built from it)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from prism_lightning.errors import ConfigError
from prism_lightning.eval import benchmarks as B
from prism_lightning.eval import scoring as S

if TYPE_CHECKING:
    from prism_lightning.engines.base import Engine

log = logging.getLogger(__name__)

__all__ = [
    "BENCHMARKS",
    "BENCH_FILES",
    "JUDGE_MODES",
    "EvalInputError",
    "EvalSettings",
    "check_benchmarks",
    "resolve_judge_mode",
    "subscore_names",
]

BENCHMARKS: tuple[str, ...] = ("mtbench", "mmlu", "safety")
#: Benchmark files a user may replace with a local copy of the same format (``--<name>_file``).
BENCH_FILES: tuple[str, ...] = ("mtbench", "mtbench_references", "judge_prompts", "mmlu", *B.SAFETY_SETS)
JUDGE_MODES: tuple[str, ...] = ("auto", "generate", "logprob")
# Judges below this size rarely follow the "[[rating]]" format (the embedded 135M model never does),
# so ``auto`` reads their rating from next-token probabilities instead of parsing free text.
GENERATE_JUDGE_MIN_PARAMS = 1_000_000_000


class EvalInputError(ConfigError):
    """A setting, benchmark or condition the user gave that cannot be evaluated; the message lists the
    valid choices. The CLI prints it as one line (a PrismError) before any model is loaded."""


def check_benchmarks(benchmarks: Sequence[str]) -> list[str]:
    """``benchmarks`` as a list, or a PrismError naming the unknown one and the valid choices."""
    names = list(benchmarks)
    if not names:
        raise EvalInputError(f"no benchmark given; choose from {', '.join(BENCHMARKS)}.")
    for b in names:
        if b not in BENCHMARKS:
            raise EvalInputError(f"unknown benchmark {b!r}; choose from {', '.join(BENCHMARKS)}.")
    return names


def subscore_names(
    benchmarks: Sequence[str] = BENCHMARKS, safety_sets: Sequence[str] = B.SAFETY_SETS
) -> list[str]:
    """The sub-score names, in table order: ``mtbench/<category>``, ``mmlu/<domain>``, ``safety/<set>``."""
    names = []
    if "mtbench" in benchmarks:
        names += [f"mtbench/{c}" for c in B.MTBENCH_CATEGORIES]
    if "mmlu" in benchmarks:
        names += [f"mmlu/{d}" for d in B.MMLU_DOMAINS]
    if "safety" in benchmarks:
        names += [f"safety/{s}" for s in safety_sets]
    return names


@dataclass
class EvalSettings:
    """Everything that changes scores, besides the condition and the model."""

    limit: int | None = None  # per sub-score group (MT-Bench category, MMLU domain, safety set)
    seed: int = 0
    mtbench_max_new_tokens: int = 256
    mtbench_top_p: float = 0.9
    safety_max_new_tokens: int = 256
    judge_mode: str = "auto"  # "generate" ([[rating]] parsed) | "logprob" (expected rating) | "auto"
    judge_max_new_tokens: int = 256
    judge_model: str | None = None
    batch_size: int = 64  # generation (answers, and the judge in generate mode)
    mmlu_batch_size: int = 16  # MMLU option-scoring forwards of the evaluated model
    judge_batch_size: int = 16  # the judge's scoring forwards (logprob ratings, safety yes/no)
    n_resamples: int = 1000  # bootstrap resamples of every confidence interval
    safety_sets: tuple[str, ...] = B.SAFETY_SETS
    paths: dict[str, str] = field(default_factory=dict)  # benchmark-file overrides, see BENCH_FILES
    mmlu_format: str = "chat"  # "raw" (the paper's plain-text prompt) | "chat" (a chat user turn)
    # a reasoning model's (or judge's) thinking budget before its MT-Bench/safety answer, rating or yes/no;
    # part of a row's key only when the model or the judge thinks (see runner.thinking_identity)
    thinking_max_new_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.judge_mode not in JUDGE_MODES:
            choices = ", ".join(JUDGE_MODES)
            raise EvalInputError(f"judge_mode must be one of {choices}, got {self.judge_mode!r}.")
        if self.limit is not None and self.limit < 1:  # 0 would evaluate nothing and report empty scores
            raise EvalInputError(f"limit must be >= 1 (items per sub-score group), got {self.limit}.")
        for name in ("mtbench_max_new_tokens", "safety_max_new_tokens", "judge_max_new_tokens", "batch_size",
                     "mmlu_batch_size", "judge_batch_size", "n_resamples",
                     "thinking_max_new_tokens"):  # fmt: skip
            if getattr(self, name) < 1:
                flag = "ci_resamples" if name == "n_resamples" else name
                raise EvalInputError(f"{name} (--{flag}) must be >= 1, got {getattr(self, name)}.")
        if self.mmlu_format not in B.MMLU_FORMATS:
            choices = ", ".join(B.MMLU_FORMATS)
            raise EvalInputError(f"mmlu_format must be one of {choices}, got {self.mmlu_format!r}.")
        self.safety_sets = tuple(self.safety_sets)
        for s in self.safety_sets:
            if s not in B.SAFETY_SETS:
                raise EvalInputError(f"unknown safety set {s!r}; choose from {', '.join(B.SAFETY_SETS)}.")
        for name in self.paths:
            if name not in BENCH_FILES:
                choices = ", ".join(BENCH_FILES)
                raise EvalInputError(f"unknown benchmark file {name!r}; choose from {choices}.")

    def bench_config(self, benchmark: str) -> dict:
        """The settings that change ``benchmark``'s rows (part of each row's cache key). Batch sizes are
        not in it: they change speed, not scores."""
        judge = {"judge_model": self.judge_model}
        if benchmark == "mtbench":
            return {
                "max_new_tokens": self.mtbench_max_new_tokens,
                "top_p": self.mtbench_top_p,
                "temperatures": S.MTBENCH_TEMPERATURES,
                "judge_mode": self.judge_mode,
                "judge_max_new_tokens": self.judge_max_new_tokens,
                "seed": self.seed,
                **judge,
            }
        if benchmark == "mmlu":  # the persona condition's MMLU persona is the domain's expert (v2)
            prompt = "mmlu-0shot-v1" if self.mmlu_format == "chat" else "mmlu-raw-v2"  # v2: question stripped
            return {"prompt": prompt, "personas": "domain-expert-v2"}
        return {"max_new_tokens": self.safety_max_new_tokens, "judge": "yesno-contrast-v2", **judge}


def resolve_judge_mode(settings: EvalSettings, judge: Engine) -> EvalSettings:
    """``settings`` with ``judge_mode`` ``auto`` replaced by generate (judge >= 1B parameters) or
    logprob; done before any row is keyed, so cached rows name the mode that made them."""
    if settings.judge_mode != "auto":
        return settings
    n_params = sum(p.numel() for p in judge.model.parameters())
    mode = "generate" if n_params >= GENERATE_JUDGE_MIN_PARAMS else "logprob"
    log.info("MT-Bench judge mode: %s (judge has %.2fB parameters)", mode, n_params / 1e9)
    return replace(settings, judge_mode=mode)
