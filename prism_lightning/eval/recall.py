"""Exact-match recall of a reference context's facts: an objective check that distillation carried them.

The self-judge of the bootstrap cannot tell whether an adapter learned a fact sheet; held-out questions
with known answers can. A recall set (YAML, shipped for the example fact sheet in
``contexts/examples/fact_sheet_questions.yaml``) names its context and lists questions, each with the answer
strings that count::

    context: fact_sheet
    context_file: fact_sheet.yaml          # relative to this file (or absolute)
    questions:
      - question: How much does the Tarsin Velo K9 e-bike weigh?
        answers: ["17.8 kg", "17.8 kilograms"]

A reply recalls a question when one of its answer strings occurs in it as a whole sequence of words and
numbers, ignoring case, punctuation and spacing ("17.8kg" matches "17.8 kg", "117.8 kg" does not). Each
question is asked greedily under four conditions of one loaded checkpoint: the base model without the
context, the base model with the context in the prompt (the ceiling), the adapter forced on without the
context (what distillation kept) and the gate's own choice.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prism_lightning.contexts import Context, ContextLibrary
from prism_lightning.errors import ConfigError

__all__ = [
    "CONDITIONS",
    "RecallQuestion",
    "RecallSet",
    "answer_tokens",
    "load_recall_set",
    "recalled",
    "run_recall",
    "summarize_recall",
]

#: base: no context, adapter off; context: the context in the prompt, adapter off; adapter: no context,
#: adapter forced on; gated: no context, the gate decides.
CONDITIONS: tuple[str, ...] = ("base", "context", "adapter", "gated")

_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[^\W\d_]+")


@dataclass(frozen=True)
class RecallQuestion:
    question: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class RecallSet:
    """A context and its held-out questions."""

    context: Context
    questions: tuple[RecallQuestion, ...]
    source: str


def answer_tokens(text: str) -> list[str]:
    """Lowercased words and numbers of ``text`` (thousands commas dropped, decimals kept whole)."""
    return _TOKEN.findall(_THOUSANDS.sub("", text.lower()))


def _contains(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    n = len(needle)
    return n > 0 and any(list(haystack[i : i + n]) == list(needle) for i in range(len(haystack) - n + 1))


def recalled(response: str, answers: Sequence[str]) -> bool:
    """True when one of ``answers`` occurs in ``response`` as a whole token sequence."""
    tokens = answer_tokens(response)
    return any(_contains(tokens, answer_tokens(answer)) for answer in answers)


def _parse_question(item: Any, index: int, where: str) -> RecallQuestion:
    question = item.get("question") if isinstance(item, dict) else None
    if not isinstance(question, str) or not question.strip():
        raise ConfigError(f"{where}: questions[{index}] needs a non-empty 'question' string.")
    answers = item.get("answers")
    if isinstance(answers, str):
        answers = [answers]
    if (
        not isinstance(answers, list)
        or not answers
        or not all(isinstance(a, str) and answer_tokens(a) for a in answers)
    ):
        raise ConfigError(
            f"{where}: questions[{index}] needs 'answers', a list of strings with a word or number each."
        )
    return RecallQuestion(question.strip(), tuple(answers))


def load_recall_set(path: str | Path) -> RecallSet:
    """Read a recall set; a missing file, a bad entry or an unknown context is a :class:`ConfigError`."""
    path = Path(path).expanduser()
    where = str(path)
    if not path.is_file():
        raise ConfigError(f"{where}: recall question file not found.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{where}: cannot read the recall questions: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("context"), str):
        raise ConfigError(f"{where}: expected a mapping with 'context', 'context_file' and 'questions'.")
    files = []
    if data.get("context_file"):
        context_file = Path(str(data["context_file"])).expanduser()
        files.append(context_file if context_file.is_absolute() else path.parent / context_file)
    context = ContextLibrary.from_config(files).get(data["context"])
    items = data.get("questions")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}: 'questions' must be a non-empty list.")
    questions = tuple(_parse_question(item, i, where) for i, item in enumerate(items))
    return RecallSet(context=context, questions=questions, source=where)


def _prompts(routed, recall_set: RecallSet, condition: str, length: str, placement: str) -> list[str]:
    text = recall_set.context.text(length) if condition == "context" else None
    return [routed.formatter.prompt(q.question, text, placement) for q in recall_set.questions]


def run_recall(
    routed,
    recall_set: RecallSet,
    *,
    conditions: Sequence[str] = CONDITIONS,
    max_new_tokens: int = 64,
    length: str = "long",
    placement: str = "system",
    batch_size: int = 8,
) -> dict[str, Any]:
    """Ask every question under each condition (greedy) with one loaded ``RoutedModel``; per-question
    rows and the summary of :func:`summarize_recall`."""
    from prism_lightning.generation import SamplingConfig
    from prism_lightning.model.inference import routed_generate

    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise ConfigError(f"unknown recall condition(s) {unknown}; choose from {', '.join(CONDITIONS)}.")
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    routes = {"base": False, "context": False, "adapter": True, "gated": None}
    rows: list[dict[str, Any]] = []
    for condition in conditions:
        outs = routed_generate(
            routed.model,
            routed.tokenizer,
            routed.controller,
            _prompts(routed, recall_set, condition, length, placement),
            mode="gated",
            sampling=sampling,
            batch_size=batch_size,
            route=routes[condition],
        )
        for q, out in zip(recall_set.questions, outs, strict=True):
            rows.append(
                {
                    "condition": condition,
                    "question": q.question,
                    "answers": list(q.answers),
                    "response": out.text,
                    "recalled": recalled(out.text, q.answers),
                    "route": out.route,
                    "prompt_tokens": out.prompt_tokens,
                }
            )
    return {"rows": rows, "summary": summarize_recall(rows)}


def summarize_recall(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Recall per condition, its mean prompt tokens, and the share of the with-context recall that the
    adapter recovers: ``adapter / context`` and, above the base floor, ``(adapter - base) / (context -
    base)`` (None where undefined)."""
    per: dict[str, dict[str, Any]] = {}
    for condition in dict.fromkeys(r["condition"] for r in rows):
        mine = [r for r in rows if r["condition"] == condition]
        per[condition] = {
            "questions": len(mine),
            "recalled": sum(r["recalled"] for r in mine),
            "recall": sum(r["recalled"] for r in mine) / len(mine),
            "mean_prompt_tokens": sum(r["prompt_tokens"] for r in mine) / len(mine),
            "routed_on": sum(bool(r["route"]) for r in mine),
        }
    out: dict[str, Any] = {"conditions": per}
    if "adapter" in per and "context" in per:
        ctx, ada = per["context"]["recall"], per["adapter"]["recall"]
        base = per["base"]["recall"] if "base" in per else 0.0
        out["recovered_share"] = ada / ctx if ctx > 0 else None
        out["recovered_share_above_base"] = (ada - base) / (ctx - base) if ctx > base else None
    return out
