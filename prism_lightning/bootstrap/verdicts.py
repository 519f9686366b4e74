"""Stage 3: the model judges each (base, persona) answer pair twice, with positions swapped.

Two verdicts per order:

* free text: greedy generation of a few tokens after the primed judge prompt, parsed tolerantly by
  :func:`parse_verdict` into "A" / "B" / "TIE" or ``None`` (unparsable, counted);
* log-probabilities of the options' first tokens at the verdict position (never unparsable).

Row: ``{"id", "persona", "query", "order_persona_first": {"raw", "parsed", "logprobs": {"A", "B",
"TIE"}}, "order_base_first": {...}, "strict_label": 0|1, "logprob_score": float,
"logprob_label": 0|1, "gate_target": 0|1}``. ``strict_label`` is the paper's rule (the parsed verdict
prefers the persona in both orders); ``logprob_score`` is the persona's log-odds
(logp(persona letter) - logp(base letter)) summed over both orders, which cancels a constant
position bias; ``logprob_label = score > 0``. ``gate_target`` is the label of the configured rule.

A reasoning judge thinks first (``bootstrap.thinking_max_new_tokens``); the verdict, its options' scores
included, is read after the thinking block, primed there with "Verdict:", and each order keeps the block
(``thinking``, ``thinking_tokens``, ``thinking_closed``; blocks that ran out of the budget are counted).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from prism_lightning.bootstrap.answers import persona_candidates
from prism_lightning.bootstrap.prompts import JUDGE_PRIMER, VERDICT_OPTIONS, judge_prompt
from prism_lightning.bootstrap.stage import StageTask
from prism_lightning.bootstrap.thinking_stats import thinking_counts, thinking_fields
from prism_lightning.engines.base import Engine, first_token_ids
from prism_lightning.generation import SamplingConfig

ORDERS = ("order_persona_first", "order_base_first")
#: Which letter the persona answer has in each order.
PERSONA_LETTER = {"order_persona_first": "A", "order_base_first": "B"}
BASE_LETTER = {"order_persona_first": "B", "order_base_first": "A"}

_BRACKETED = re.compile(r"\[\[\s*(A|B|C|TIE|tie|Tie)\s*\]\]")
_TOKEN = re.compile(r"(?<![A-Za-z])(A|B)(?![A-Za-z])|\b(tie|equal|equally|neither|both)\b", re.IGNORECASE)


def parse_verdict(text: str | None) -> str | None:
    """Map free judge text to "A", "B", "TIE", or ``None`` when it names no verdict.

    Accepts "[[A]]", "A", "Output A:", "Assistant B is better", "tie", "[[C]]" (MT-Bench's tie).
    The first verdict-like token wins; an "A"/"B" must stand alone (not inside a word) and be a
    capital letter unless it follows "assistant"/"answer"/"output"/"response".
    """
    if not text:
        return None
    text = text.strip()
    match = _BRACKETED.search(text)
    if match:
        value = match.group(1).upper()
        return "TIE" if value in ("C", "TIE") else value
    for match in _TOKEN.finditer(text):
        if match.group(2):
            return "TIE"
        letter = match.group(1)
        if letter.isupper():
            return letter
        before = text[: match.start()].rstrip().lower()
        if before.endswith(("assistant", "answer", "output", "response")):
            return letter.upper()
    return None


def option_token_ids(tokenizer) -> dict[str, list[int]]:
    """First token of each surface form of each verdict option (deduplicated; shared first tokens dropped)."""
    return first_token_ids(tokenizer, VERDICT_OPTIONS)


def persona_log_odds(logprobs: Mapping[str, float], order: str) -> float:
    return logprobs[PERSONA_LETTER[order]] - logprobs[BASE_LETTER[order]]


def logprob_verdict(pf: Mapping[str, float], bf: Mapping[str, float]) -> tuple[float, int]:
    """(score, label): the persona's log-odds summed over both orders; label = score > 0.

    A constant position bias c (the judge adds c to "A" in every prompt) adds +c in the
    persona-first order and -c in the base-first order, so it cancels in the sum.
    """
    score = persona_log_odds(pf, "order_persona_first") + persona_log_odds(bf, "order_base_first")
    return score, int(score > 0)


def strict_verdict(parsed_pf: str | None, parsed_bf: str | None) -> int:
    """The paper's rule: 1 only when the persona wins in both orders."""
    return int(
        parsed_pf == PERSONA_LETTER["order_persona_first"] and parsed_bf == PERSONA_LETTER["order_base_first"]
    )


def verdict_jobs(
    formatter, answers: Sequence[Mapping[str, Any]], references: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Judge prompts in the judge's chat format (no persona), persona answer as A then as B.
    ``references`` maps a reference context's name to the text the judge is shown for its rows."""
    refs = references or {}

    def prompt(a, first: str, second: str) -> str:
        return judge_prompt(formatter, a["query"], a[first], a[second], refs.get(a["persona"]))

    return [
        {
            "id": a["id"],
            "persona": a["persona"],
            "query": a["query"],
            "order_persona_first": prompt(a, "persona_answer", "base_answer"),
            "order_base_first": prompt(a, "base_answer", "persona_answer"),
        }
        for a in answers
    ]


class VerdictTask(StageTask):
    """Both judge orders of each pair on the judge's engine: the greedy free-text verdict and, from the
    request that starts it, the options' log-probabilities as the first token."""

    def __init__(
        self, engine: Engine, max_new_tokens: int, rule: str, think_tokens: int | None = None
    ) -> None:
        super().__init__()
        self.engine = engine
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
        self.rule = rule
        self.think_tokens = think_tokens

    def process(self, jobs):
        prompts = [j["order_persona_first"] for j in jobs] + [j["order_base_first"] for j in jobs]
        # a local engine scores the options in the same prefill (free); an endpoint only for the logprob rule
        scored = self.rule == "logprob" or self.engine.free_option_scores
        gens = self.engine.generate(
            prompts,
            self.sampling,
            batch_size=len(prompts),
            score_options=VERDICT_OPTIONS if scored else None,
            think_tokens=self.think_tokens,
            reply_start=JUDGE_PRIMER,
        )
        rows = []
        n = len(jobs)
        for i, job in enumerate(jobs):
            orders = {}
            for k, order in enumerate(ORDERS):
                gen = gens[i + k * n]
                orders[order] = {
                    "raw": gen.text,
                    "parsed": parse_verdict(gen.text),
                    "logprobs": gen.option_scores,
                    "tokens": gen.tokens,
                    **thinking_fields(gen),
                }
            rows.append(label_row(job, orders, self.rule))
        return rows


def label_row(job: Mapping[str, Any], orders: Mapping[str, Mapping[str, Any]], rule: str) -> dict[str, Any]:
    pf, bf = orders["order_persona_first"], orders["order_base_first"]
    strict = strict_verdict(pf["parsed"], bf["parsed"])
    score: float | None = None
    lp_label: int | None = None
    if pf["logprobs"] is not None and bf["logprobs"] is not None:  # an endpoint under strict: none
        score, lp_label = logprob_verdict(pf["logprobs"], bf["logprobs"])
        score = score if math.isfinite(score) else 0.0
    return {
        "id": job["id"],
        "persona": job["persona"],
        "query": job["query"],
        "order_persona_first": dict(pf),
        "order_base_first": dict(bf),
        "strict_label": strict,
        "logprob_score": score,
        "logprob_label": lp_label,
        "gate_target": strict if rule == "strict" else lp_label,
        "judge_tokens": sum(int(o.get(k, 0)) for o in (pf, bf) for k in ("tokens", "thinking_tokens")),
    }


def relabel(rows: Sequence[Mapping[str, Any]], rule: str) -> list[dict[str, Any]]:
    """The same judgments under another rule (no re-judging needed)."""
    return [{**r, "gate_target": r["strict_label"] if rule == "strict" else r["logprob_label"]} for r in rows]


def split_counts(rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, dict[str, int]]:
    """{persona: {"distill": n, "retain": m}} plus a "total" entry, for label field ``key``."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        slot = out.setdefault(r["persona"], {"distill": 0, "retain": 0})
        slot["distill" if r[key] else "retain"] += 1
    out["total"] = {
        "distill": sum(v["distill"] for v in out.values()),
        "retain": sum(v["retain"] for v in out.values()),
    }
    return out


def finalize_verdicts(rows, rule: str):
    rows = relabel(rows, rule)
    stats = {
        "pairs": len(rows),
        "rule": rule,
        "unparsable": {order: sum(1 for r in rows if r[order]["parsed"] is None) for order in ORDERS},
        "parsed_counts": {
            order: {v: sum(1 for r in rows if r[order]["parsed"] == v) for v in ("A", "B", "TIE")}
            for order in ORDERS
        },
        "split": {"strict": split_counts(rows, "strict_label")},
    }
    thinking = thinking_counts([r[order] for r in rows for order in ORDERS])
    if thinking is not None:
        stats["thinking"] = thinking
    if all(r["logprob_label"] is not None for r in rows):  # an endpoint judging by text gives none
        stats["split"]["logprob"] = split_counts(rows, "logprob_label")
    return rows, stats


# ------------------------------------------------------------------------------------------------
# Verifiers other than the self-judge (``bootstrap.verifier``)


def program_verdicts(
    answers: Sequence[Mapping[str, Any]], programs: Mapping[str, str], texts: Mapping[str, str]
) -> dict[str, dict[str, Any]]:
    """{row id: {"program_verdict", "program_label", "program"}}: each pair judged by its context's
    program (``programs`` maps a context name to ``module:function``; ``texts`` to the context's text).
    A row with several persona answers (``bootstrap.answer_samples``) keeps the first that wins
    (``"persona_sample"``: its index) and records how many of them won (``"samples_won"``)."""
    from prism_lightning.bootstrap.verifiers import load_program, run_program

    loaded = {name: load_program(spec) for name, spec in programs.items()}
    out = {}
    for a in answers:
        spec = programs[a["persona"]]
        candidates = persona_candidates(a)
        verdicts = [
            run_program(loaded[a["persona"]], spec, a["query"], a["base_answer"], c, texts[a["persona"]])
            for c in candidates
        ]
        chosen = verdicts.index("persona") if "persona" in verdicts else 0
        out[a["id"]] = {
            "program_verdict": verdicts[chosen],
            "program_label": int(verdicts[chosen] == "persona"),
            "program": spec,
            **(
                {"persona_sample": chosen, "samples_won": verdicts.count("persona")}
                if len(candidates) > 1
                else {}
            ),
        }
    return out


def self_label_key(rule: str) -> str:
    return "strict_label" if rule == "strict" else "logprob_label"


def decide_by_verifiers(
    rows: Sequence[Mapping[str, Any]], verifiers: Sequence[str], rule: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The gate target of each row from the first verifier, every verifier's label beside it, and the
    stats: the split each verifier gives and, for each pair of verifiers, how often they agree (share
    and Cohen's kappa), so a user sees how noisy self-judgment is on their model."""
    keys = {"self": self_label_key(rule), "program": "program_label"}
    out = []
    for r in rows:
        labels = {v: int(r[keys[v]]) for v in verifiers}
        out.append({**r, "labels": labels, "verifier": verifiers[0], "gate_target": labels[verifiers[0]]})
    agreement = {}
    for i, a in enumerate(verifiers):
        for b in verifiers[i + 1 :]:
            agreement[f"{a}~{b}"] = agreement_stats(
                [r["labels"][a] for r in out], [r["labels"][b] for r in out]
            )
    stats = {"decided_by": verifiers[0], "verifiers": list(verifiers), "agreement": agreement}
    if "program" in verifiers:
        stats["program_split"] = split_counts(out, "program_label")
    sampled = [r for r in out if "samples_won" in r]
    if sampled:  # bootstrap.answer_samples > 1: how much the extra samples changed
        stats["answer_samples"] = {
            "rows": len(sampled),
            "won_by_first_sample": sum(r["program_label"] and r["persona_sample"] == 0 for r in sampled),
            "won_by_a_later_sample": sum(r["program_label"] and r["persona_sample"] > 0 for r in sampled),
            "samples_won_mean": round(sum(r["samples_won"] for r in sampled) / len(sampled), 3),
        }
    return out, stats


def agreement_stats(a: Sequence[int], b: Sequence[int]) -> dict[str, float | int]:
    """Share of rows two binary labellings agree on, and Cohen's kappa (agreement beyond chance; 0 for
    labellings that agree only as often as their marginals predict, 1 for identical ones)."""
    n = len(a)
    if n == 0:
        return {"pairs": 0, "agree": float("nan"), "kappa": float("nan")}
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pa, pb = sum(a) / n, sum(b) / n
    expected = pa * pb + (1 - pa) * (1 - pb)
    kappa = 1.0 if expected == 1 else (observed - expected) / (1 - expected)
    return {"pairs": n, "agree": round(observed, 4), "kappa": round(kappa, 4)}
