"""What an evaluation run is configured by, besides the model and the conditions: the benchmarks and
their sub-scores, and :class:`EvalSettings` (everything that changes a score, so every cached row's
key is built from it)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from prism_lightning.errors import ConfigError
from prism_lightning.eval import benchmarks as B
from prism_lightning.eval import scoring as S
from prism_lightning.settings_args import flag

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
    """Everything that changes scores, besides the condition and the model. Each field is one flag of
    ``evaluate`` and ``study`` (``prism_lightning.settings_args``); its docstring is the flag's help."""

    limit: int | None = flag(None)
    """items per sub-score group: MT-Bench category, MMLU domain, safety set (default: all)"""
    seed: int = flag(0)
    """seed of the item sample, the persona draws and the confidence intervals' resamples"""
    mtbench_max_new_tokens: int = flag(256)
    """answer length of MT-Bench turns"""
    mtbench_top_p: float = flag(0.9, cli=False)
    """nucleus of MT-Bench's sampled categories (set from Python only)"""
    safety_max_new_tokens: int = flag(256)
    """answer length on the safety sets (greedy)"""
    judge_mode: str = flag("auto", choices=JUDGE_MODES)
    """generate: FastChat [[rating]] parsing (unparsable = missing); logprob: expected rating from the
    judge's next-token probabilities after 'Rating: [['; auto: generate for judges of 1B parameters or
    more, else logprob"""
    judge_max_new_tokens: int = flag(256)
    """length of the judge's reply in generate mode"""
    judge_model: str | None = flag(None)
    """judge model (default: the base model itself)"""
    batch_size: int = flag(64)
    """generation batch size (large batches pay off even on CPU: 2.7x the tokens/s of 8)"""
    mmlu_batch_size: int = flag(16)
    """batch size of MMLU's scoring forwards"""
    judge_batch_size: int = flag(16)
    """batch size of the judge's scoring forwards (logprob ratings, safety yes/no)"""
    n_resamples: int = flag(1000, name="ci_resamples", aliases=("--bootstrap",))
    """bootstrap resamples of every 95% confidence interval"""
    safety_sets: tuple[str, ...] = flag(B.SAFETY_SETS, csv=True)
    """comma list of the safety sets"""
    paths: dict[str, str] = flag(keys=BENCH_FILES, default_factory=dict)
    """local file replacing the pinned {key} data (same format)"""
    mmlu_format: str = flag("chat", choices=B.MMLU_FORMATS)
    """raw: the paper's plain-text MMLU prompt scored on ' A'..' D' (persona as a system prefix); chat:
    the question as a chat user turn scored on the assistant's first token"""
    thinking_max_new_tokens: int = flag(1024)
    """a reasoning model's thinking budget (its chat template opens a <think> block): the MT-Bench and
    safety answers, and a reasoning judge's rating or yes/no, are read after the block"""

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
