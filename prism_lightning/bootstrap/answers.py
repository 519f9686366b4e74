"""Stage 2: every query gets a base answer (no persona) and a matched-persona answer.

Row: ``{"id", "persona", "query", "base_answer", "persona_answer", "base_finish", "persona_finish",
"base_tokens", "persona_tokens"}`` (finish: "stop" | "length"; tokens: generated tokens); with
``bootstrap.answer_samples`` k > 1 also ``"persona_samples"``: the other k - 1 persona answers, each
``{"answer", "finish", "tokens"}``, from which stage 3 may pick (:func:`persona_candidates`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prism_lightning.bootstrap.stage import StageTask
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

    def __init__(self, engine: Engine, sampling: SamplingConfig, seed: int, samples: int = 1) -> None:
        super().__init__()
        self.engine = engine
        self.sampling = sampling
        self.seed = seed
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
        gens = self.engine.generate(prompts, self.sampling, seeds=seeds, batch_size=len(prompts))
        rows = answer_rows(jobs, gens[:n], gens[n : 2 * n])
        if self.samples > 1:
            for i, row in enumerate(rows):
                row["persona_samples"] = [
                    {"answer": g.text, "finish": g.finish_reason, "tokens": len(g.token_ids)}
                    for g in gens[2 * n + i :: n]
                ]
                row["persona_sample_tokens"] = sum(s["tokens"] for s in row["persona_samples"])
        return rows


def persona_candidates(row: Mapping[str, Any]) -> list[str]:
    """The persona answers a verifier may choose from: the row's own, then its other samples."""
    return [row["persona_answer"]] + [s["answer"] for s in row.get("persona_samples", ())]


def chosen_persona_answer(answer_row: Mapping[str, Any], verdict_row: Mapping[str, Any]) -> str:
    """The persona answer stage 3 kept for a row (the first one unless a verifier picked a sample)."""
    return persona_candidates(answer_row)[int(verdict_row.get("persona_sample", 0))]


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
        }
        for job, b, p in zip(jobs, base, persona, strict=True)
    ]
