"""Stage 1: the base model writes queries that each persona would excel at.

Shard row (one per generation): ``{"id": "<persona>-<i>", "persona", "index", "raw", "finish",
"tokens"}``. Final row (``rows.jsonl``, kept queries only, in persona/index order):
``{"id", "persona", "index", "query", "raw"}``. Drops are counted per persona and reason
(``empty``, ``too_short``, ``duplicate``, ``near_duplicate``) in meta.json's ``stats``.
"""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from prism_lightning.bootstrap.prompts import examples_query_parts, query_prompt_text
from prism_lightning.bootstrap.stage import StageTask
from prism_lightning.bootstrap.thinking_stats import thinking_counts, thinking_fields
from prism_lightning.contexts import Context
from prism_lightning.engines.base import Engine
from prism_lightning.engines.line_break import line_break_token_ids
from prism_lightning.errors import PrismError
from prism_lightning.generation import SamplingConfig, row_seed

__all__ = ["QueryTask", "finalize_queries", "first_line", "line_break_token_ids", "query_jobs", "query_rows"]

DROP_REASONS: tuple[str, ...] = ("empty", "too_short", "not_a_query", "known", "duplicate", "near_duplicate")
NEAR_DUP_RATIO = 0.9
NEAR_DUP_JACCARD = 0.8

_PREFIX = re.compile(
    r"^\s*(?:"
    r"(?:#+|[-*•>]+)\s*"  # markdown heading / bullet / quote
    r"|\(?(?:q|question)?\s*\d+\s*[.):\]-]\s*"  # 1.  1)  (1)  Q1:  Question 3 -
    r"|\*\*[^*]{0,40}\*\*\s*:?\s*"  # **Query:**
    r"|(?:query|question|request|prompt|user|task|example)\s*(?:\d+\s*)?[:\-]\s*"  # Query: ...
    r")",
    re.IGNORECASE,
)
_QUOTES = "\"'“”‘’`*_ "


def clean_query(raw: str) -> str:
    """First non-empty line, without numbering, bullets, quotes or a "Query:" style prefix."""
    line = next((ln.strip() for ln in raw.splitlines() if ln.strip()), "")
    previous = None
    while line != previous:
        previous = line
        line = _PREFIX.sub("", line, count=1).strip()
        line = line.strip(_QUOTES).strip()
    return line


def normalise(text: str) -> str:
    """Lowercase, punctuation-free, single-spaced: the key for exact-duplicate detection."""
    table = str.maketrans(dict.fromkeys(string.punctuation + "“”‘’", " "))
    return " ".join(text.lower().translate(table).split())


def is_near_duplicate(a: str, b: str) -> bool:
    """difflib ratio >= 0.9 or token Jaccard >= 0.8 between two normalised queries."""
    if difflib.SequenceMatcher(None, a, b).ratio() >= NEAR_DUP_RATIO:
        return True
    ta, tb = set(a.split()), set(b.split())
    return bool(ta | tb) and len(ta & tb) / len(ta | tb) >= NEAR_DUP_JACCARD


def filter_queries(
    rows: Sequence[dict[str, Any]], min_chars: int = 16, known: Sequence[str] = ()
) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]], list[dict[str, Any]]]:
    """Clean, length-filter and de-duplicate (across all personas, first occurrence wins). A query equal
    or near-equal to one of ``known`` (the examples it was shown, or queries used elsewhere) is dropped.

    Returns (kept rows with a ``query`` field, drop counts ``{persona: {reason: n}}``, dropped rows
    with their ``reason``).
    """
    kept: list[dict[str, Any]] = []
    kept_norm: list[str] = []
    seen: set[str] = set()
    known_norm = [normalise(clean_query(q)) for q in known]
    known_set = set(known_norm)
    drops: dict[str, dict[str, int]] = {}
    dropped: list[dict[str, Any]] = []
    for row in rows:
        drops.setdefault(row["persona"], dict.fromkeys(DROP_REASONS, 0))
        query = clean_query(row.get("raw", ""))
        norm = normalise(query)
        if not norm:
            reason = "empty"
        elif len(query) < min_chars:
            reason = "too_short"
        elif query.endswith(":"):  # a heading such as "Here is one example:"
            reason = "not_a_query"
        elif norm in known_set or any(is_near_duplicate(norm, other) for other in known_norm):
            reason = "known"
        elif norm in seen:
            reason = "duplicate"
        elif any(is_near_duplicate(norm, other) for other in kept_norm):
            reason = "near_duplicate"
        else:
            reason = None
        if reason is not None:
            drops[row["persona"]][reason] += 1
            dropped.append(
                {"id": row["id"], "persona": row["persona"], "reason": reason, "raw": row.get("raw")}
            )
            continue
        seen.add(norm)
        kept_norm.append(norm)
        kept.append(
            {
                "id": row["id"],
                "persona": row["persona"],
                "index": row["index"],
                "query": query,
                "raw": row["raw"],
            }
        )
    return kept, drops, dropped


def query_jobs(
    formatter,
    personas: Sequence[Context],
    per_persona: int,
    persona_length: str | None = None,
    examples: tuple[int, int] | None = None,
    first_index: int = 0,
) -> list[dict[str, Any]]:
    """One job per (persona, index). The base model writes the queries with no persona in its own
    prompt; the request describes each persona, or shows its text at ``persona_length`` when given.
    ``examples = (seed, shown)`` primes the writer with a list of each context's example queries
    instead (``query_prompt: examples``). ``first_index`` starts the indices elsewhere, so a held-out
    set of queries gets ids, seeds and example draws of its own. A reasoning model's primer is the job's
    ``reply_start`` (it follows the thinking block); otherwise it ends the prompt."""

    def prompt(ctx: Context, i: int) -> tuple[str, str]:
        if examples is None:
            return formatter.prompt(query_prompt_text(ctx, i, persona_length)), ""
        ask, primer = examples_query_parts(ctx, i, *examples)
        if getattr(formatter, "thinking", None) is not None:
            return formatter.prompt(ask), primer
        return formatter.prompt(ask) + primer, ""

    jobs = []
    for ctx in personas:
        for i in range(first_index, first_index + per_persona):
            text, start = prompt(ctx, i)
            job = {"id": f"{ctx.name}-{i}", "persona": ctx.name, "index": i, "prompt": text}
            jobs.append({**job, "reply_start": start} if start else job)
    return jobs


def first_line(tokenizer, token_ids: Sequence[int]) -> str:
    """The generated text up to (not including) its first line break, whichever token carried it."""
    return tokenizer.decode(list(token_ids), skip_special_tokens=True).split("\n", 1)[0].strip()


class QueryTask(StageTask):
    """Generates the raw queries on an engine; with ``stop_at_newline`` a row ends at its first line
    break and keeps the text before it (:mod:`~prism_lightning.engines.line_break`)."""

    def __init__(
        self,
        engine: Engine,
        sampling: SamplingConfig,
        seed: int,
        stop_at_newline: bool = True,
        think_tokens: int | None = None,
    ) -> None:
        super().__init__()
        self.engine = engine
        self.sampling = sampling
        self.seed = seed
        self.stop_at_newline = stop_at_newline
        self.think_tokens = think_tokens

    def process(self, jobs):
        seeds = [row_seed(self.seed, f"queries:{job['id']}") for job in jobs]
        gens = self.engine.generate(
            [j["prompt"] for j in jobs],
            self.sampling,
            seeds=seeds,
            batch_size=len(jobs),
            stop_at_newline=self.stop_at_newline,
            think_tokens=self.think_tokens,
            reply_start=[j.get("reply_start", "") for j in jobs],
        )
        return query_rows(jobs, gens, self.engine.tokenizer, self.stop_at_newline)


def query_rows(
    jobs: Sequence[Mapping[str, Any]], gens: Sequence, tokenizer, stop_at_newline: bool
) -> list[dict]:
    """The queries stage's raw rows, one schema whichever engine generated them."""
    return [
        {
            "id": job["id"],
            "persona": job["persona"],
            "index": job["index"],
            "raw": first_line(tokenizer, gen.token_ids) if stop_at_newline else gen.text,
            "finish": gen.finish_reason,
            "tokens": len(gen.token_ids),
            **thinking_fields(gen),
        }
        for job, gen in zip(jobs, gens, strict=True)
    ]


class NoQueriesError(PrismError, RuntimeError):
    """Every generated query was dropped."""


def finalize_queries(rows, min_chars: int, persona_names: Sequence[str], known: Sequence[str] = ()):
    kept, drops, dropped = filter_queries(rows, min_chars, known)
    per_persona = {name: sum(1 for r in kept if r["persona"] == name) for name in persona_names}
    if not kept:
        raise NoQueriesError(
            f"no queries left after filtering: {len(rows)} generated, drops by persona and reason: {drops}. "
            "Raise bootstrap.queries_per_persona or bootstrap.query_max_new_tokens, lower "
            "bootstrap.min_query_chars, or use a stronger base model."
        )
    stats = {
        "generated": len(rows),
        "kept": len(kept),
        "dropped": len(dropped),
        "kept_per_persona": per_persona,
        "dropped_by_reason": drops,
        "dropped_rows": dropped,
        "empty_personas": [name for name, n in per_persona.items() if n == 0],
    }
    thinking = thinking_counts(rows)
    if thinking is not None:
        stats["thinking"] = thinking
    return kept, stats
