"""Stage 2: every query gets a base answer (no persona) and a matched-persona answer.

Row: ``{"id", "persona", "query", "base_answer", "persona_answer", "base_finish", "persona_finish",
"base_tokens", "persona_tokens"}`` (finish: "stop" | "length"; tokens: generated tokens). A reasoning
model's answer is what follows its thinking block (what the judge compares); the block is kept beside it
(``<side>_thinking``, ``<side>_thinking_tokens``, ``<side>_thinking_closed``) and :func:`full_reply` puts
the two back together for the teacher and the student.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prism_lightning.bootstrap.stage import StageTask
from prism_lightning.bootstrap.thinking_stats import thinking_counts, thinking_fields
from prism_lightning.chat_format import ThinkingFormat
from prism_lightning.contexts import Context
from prism_lightning.engines.base import Engine
from prism_lightning.errors import PrismError
from prism_lightning.generation import SamplingConfig, row_seed


class DegenerateAnswersError(PrismError, RuntimeError):
    """The model ended every answer at once."""


def answer_jobs(
    formatter,
    queries: Sequence[Mapping[str, Any]],
    personas: Mapping[str, Context],
    length: str,
    placement: str,
) -> list[dict[str, Any]]:
    return [
        {
            "id": q["id"],
            "persona": q["persona"],
            "query": q["query"],
            "base_prompt": formatter.prompt(q["query"]),
            "persona_prompt": formatter.prompt(q["query"], personas[q["persona"]].text(length), placement),
        }
        for q in queries
    ]


class AnswerTask(StageTask):
    """Each job's no-persona and persona answers on an engine, in one batch of 2 x jobs rows."""

    def __init__(
        self, engine: Engine, sampling: SamplingConfig, seed: int, think_tokens: int | None = None
    ) -> None:
        super().__init__()
        self.engine = engine
        self.sampling = sampling
        self.seed = seed
        self.think_tokens = think_tokens

    def process(self, jobs):
        prompts = [j["base_prompt"] for j in jobs] + [j["persona_prompt"] for j in jobs]
        seeds = [row_seed(self.seed, f"answers:{j['id']}:base") for j in jobs] + [
            row_seed(self.seed, f"answers:{j['id']}:persona") for j in jobs
        ]
        gens = self.engine.generate(
            prompts, self.sampling, seeds=seeds, batch_size=len(prompts), think_tokens=self.think_tokens
        )
        return answer_rows(jobs, gens[: len(jobs)], gens[len(jobs) :])


def finalize_answers(rows):
    empty_base = sum(1 for r in rows if not r["base_answer"].strip())
    empty_persona = sum(1 for r in rows if not r["persona_answer"].strip())
    warnings = []
    if rows and (empty_base == len(rows) or empty_persona == len(rows)):
        raise DegenerateAnswersError(
            f"the model ended every answer at once ({empty_base}/{len(rows)} base and "
            f"{empty_persona}/{len(rows)} persona answers are empty). Check the model and its chat "
            "template (does it stop on its first token?), or use another backbone."
        )
    if empty_base or empty_persona:
        warnings.append(
            f"{empty_base} base and {empty_persona} persona answers ended at once (empty); they stay in "
            "the data and mostly land in retain"
        )
    stats = {
        "pairs": len(rows),
        "empty_base": empty_base,
        "empty_persona": empty_persona,
        "truncated_base": sum(1 for r in rows if r["base_finish"] == "length"),
        "truncated_persona": sum(1 for r in rows if r["persona_finish"] == "length"),
        "warnings": warnings,
    }
    thinking = thinking_counts(rows, ("base_", "persona_"))
    if thinking is not None:
        stats["thinking"] = thinking
    return rows, stats


def answer_rows(jobs: Sequence[Mapping[str, Any]], base: Sequence, persona: Sequence) -> list[dict]:
    """The answers stage's rows from each job's no-persona and persona generations (any engine)."""
    return [
        {
            "id": job["id"],
            "persona": job["persona"],
            "query": job["query"],
            "base_answer": b.text,
            "persona_answer": p.text,
            "base_finish": b.finish_reason,
            "persona_finish": p.finish_reason,
            "base_tokens": len(b.token_ids),
            "persona_tokens": len(p.token_ids),
            **thinking_fields(b, "base_"),
            **thinking_fields(p, "persona_"),
        }
        for job, b, p in zip(jobs, base, persona, strict=True)
    ]


def full_reply(row: Mapping[str, Any], side: str, thinking: ThinkingFormat | None) -> str:
    """The reply of ``side`` (base or persona) as the model wrote it after its prompt: a reasoning model's
    thinking block, then the answer. The teacher's targets and the student's rows keep the block: the
    prompt ends inside it (``<think>\\n``), so a student trained on the answer alone there would learn
    to stop reasoning, and the persona's effect on a reasoning model starts in its reasoning."""
    answer = row[f"{side}_answer"]
    block = row.get(f"{side}_thinking")
    return answer if block is None or thinking is None else thinking.full_reply(block, answer)
