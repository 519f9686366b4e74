"""Stage 2: every query gets a base answer (no persona) and a matched-persona answer.

Row: ``{"id", "persona", "query", "base_answer", "persona_answer", "base_finish", "persona_finish",
"base_tokens", "persona_tokens"}`` (finish: "stop" | "length"; tokens: generated tokens). A reasoning
model's answer is what follows its thinking block (what the judge compares); the block is kept beside it
(``<side>_thinking``, ``<side>_thinking_tokens``, ``<side>_thinking_closed``) and :func:`full_reply` puts
the two back together for the teacher and the student. With ``bootstrap.answer_samples`` k > 1 a row
also holds ``"persona_samples"``: the other k - 1 persona answers, each ``{"answer", "finish", "tokens"}``
(and its thinking fields), from which stage 3 may pick one (:func:`persona_candidates`, :func:`chosen_row`).
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
    """Each job's no-persona answer and its ``samples`` persona answers on an engine, in one batch of
    (1 + samples) x jobs rows."""

    def __init__(
        self,
        engine: Engine,
        sampling: SamplingConfig,
        seed: int,
        think_tokens: int | None = None,
        samples: int = 1,
    ) -> None:
        super().__init__()
        self.engine = engine
        self.sampling = sampling
        self.seed = seed
        self.think_tokens = think_tokens
        self.samples = samples

    def process(self, jobs):
        n = len(jobs)
        prompts = [j["base_prompt"] for j in jobs] + [j["persona_prompt"] for j in jobs] * self.samples
        # sample 0 keeps the seed key of one-answer runs, so its text does not depend on k
        seeds = [row_seed(self.seed, f"answers:{j['id']}:base") for j in jobs] + [
            row_seed(self.seed, f"answers:{j['id']}:persona" + (f":{k}" if k else ""))
            for k in range(self.samples)
            for j in jobs
        ]
        gens = self.engine.generate(
            prompts, self.sampling, seeds=seeds, batch_size=len(prompts), think_tokens=self.think_tokens
        )
        rows = answer_rows(jobs, gens[:n], gens[n : 2 * n])
        if self.samples > 1:
            for i, row in enumerate(rows):
                row["persona_samples"] = [
                    {
                        "answer": g.text,
                        "finish": g.finish_reason,
                        "tokens": len(g.token_ids),
                        **thinking_fields(g),
                    }
                    for g in gens[2 * n + i :: n]
                ]
                row["persona_sample_tokens"] = sum(s["tokens"] for s in row["persona_samples"])
        return rows


def persona_candidates(row: Mapping[str, Any]) -> list[str]:
    """The persona answers a verifier may choose from: the row's own, then its other samples."""
    return [row["persona_answer"]] + [s["answer"] for s in row.get("persona_samples", ())]


def chosen_row(answer_row: Mapping[str, Any], verdict_row: Mapping[str, Any]) -> dict[str, Any]:
    """The answers row with the persona answer stage 3 kept (the first one unless a verifier picked a
    later sample) in its ``persona_*`` fields."""
    pick = int(verdict_row.get("persona_sample", 0))
    if pick == 0:
        return dict(answer_row)
    sample = answer_row["persona_samples"][pick - 1]
    return {**answer_row, **{f"persona_{k}": v for k, v in sample.items()}}


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
