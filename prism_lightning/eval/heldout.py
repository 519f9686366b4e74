"""The held-out check: does the exported gate route, and does the adapter carry the context, on queries
the run never trained or selected on?

After ``fit`` (``--heldout_check N``) the base model writes N fresh queries per context with the
bootstrap's own query prompt, at indices after the training ones (so new ids, seeds and example draws);
queries equal or near-equal to a training query or an example are dropped. Each query is answered
greedily four ways with the exported checkpoint: the base model, the base model with the context in the
prompt, the adapter forced on (no context), and PRISM routed (the gate decides, no context). The
verifier labels each query as the bootstrap would (does the context's answer beat the base answer? With
``bootstrap.answer_samples`` k > 1: does any of the greedy one and k - 1 sampled ones?) and
scores each answer on its own (does the verifier prefer it to an empty answer?), which gives:

* the gate's AUROC and accuracy against those labels, each with a bootstrap 95% interval over queries;
* the verifier pass rate of each of the four answers, on all queries and on the ones the gate routes,
  and the share of the context's gain that the adapter recovers without the context in the prompt;
* how many queries the gate routes off are answered exactly as by the base model.

Needs a program verifier (``bootstrap.verifier: program``): a 135M self-judge's labels are noise.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from prism_lightning.bootstrap.config import BootstrapConfig
from prism_lightning.bootstrap.queries import filter_queries, query_jobs
from prism_lightning.bootstrap.verifiers import load_program, run_program
from prism_lightning.contexts import Context, ContextLibrary
from prism_lightning.errors import ConfigError
from prism_lightning.generation import SamplingConfig, row_seed

CONDITIONS = ("base", "context", "adapter", "routed")
RESAMPLES = 1000


@dataclass
class HeldOutReport:
    """Per-query results and the summary numbers printed after fit (also written as JSON)."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Probability that a random positive scores above a random negative (ties count half); NaN when
    one class is missing."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return math.nan
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def bootstrap_interval(
    statistic: Callable[[list[int]], float], n: int, *, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of ``statistic(indices)`` over resamples of ``range(n)`` with replacement;
    resamples where it is undefined (NaN: one class missing) are skipped."""
    rng = random.Random(seed)
    values = []
    for _ in range(resamples):
        value = statistic([rng.randrange(n) for _ in range(n)])
        if not math.isnan(value):
            values.append(value)
    if not values:
        return math.nan, math.nan
    values.sort()
    return values[int(0.025 * (len(values) - 1))], values[int(0.975 * (len(values) - 1))]


def write_heldout_queries(
    engine, config: BootstrapConfig, contexts: Sequence[Context], per_context: int, known: Sequence[str]
) -> list[dict[str, Any]]:
    """Fresh queries, written exactly as stage 1 writes them but at indices after the training ones."""
    examples = (config.seed, config.query_examples) if config.query_prompt == "examples" else None
    length = config.persona_length if config.query_prompt == "persona_text" else None
    jobs = query_jobs(
        engine.formatter,
        contexts,
        per_context,
        length,
        examples=examples,
        first_index=config.queries_per_persona,
    )
    outs = engine.generate(
        [j["prompt"] for j in jobs],
        config.query_sampling(),
        seeds=[row_seed(config.seed, f"heldout-queries:{j['id']}") for j in jobs],
        stop_at_newline=config.query_stop_at_newline,
        think_tokens=config.thinking_max_new_tokens,
        reply_start=[j.get("reply_start", "") for j in jobs],
    )
    rows = [
        {**{k: j[k] for k in ("id", "persona", "index")}, "raw": o.text.split("\n")[0]}
        for j, o in zip(jobs, outs, strict=True)
    ]
    known = list(known) + [q for c in contexts for q in c.example_queries]
    kept, _, _ = filter_queries(rows, config.min_query_chars, known)
    return kept


def run_heldout_check(
    engine,
    config: BootstrapConfig,
    *,
    per_context: int,
    training_queries: Sequence[str],
    max_new_tokens: int | None = None,
    batch_size: int = 16,
) -> HeldOutReport:
    """The check on an engine holding the exported checkpoint (see the module docstring)."""
    if "program" not in config.verifier:
        raise ConfigError("the held-out check needs a program verifier (bootstrap.verifier: program).")
    contexts = ContextLibrary.from_config(config.context_files).select(config.personas)
    by_name = {c.name: c for c in contexts}
    programs = {name: (spec, load_program(spec)) for name, spec in config.verifier_programs.items()}
    queries = write_heldout_queries(engine, config, contexts, per_context, training_queries)
    if not queries:
        raise ConfigError("the held-out check kept no query (every one was empty or a known query).")
    sampling = SamplingConfig(max_new_tokens=max_new_tokens or config.answer_max_new_tokens, temperature=0.0)
    plain = [engine.formatter.prompt(q["query"]) for q in queries]
    with_context = [
        engine.formatter.prompt(
            q["query"], by_name[q["persona"]].text(config.persona_length), config.placement
        )
        for q in queries
    ]
    kw = {"batch_size": batch_size, "think_tokens": config.thinking_max_new_tokens}
    extra = config.answer_samples - 1  # sampled context answers that may also earn the label
    samples = (
        engine.generate(
            with_context * extra,
            replace(config.answer_sampling(), max_new_tokens=sampling.max_new_tokens),
            seeds=[
                row_seed(config.seed, f"heldout-answers:{q['id']}:{k}") for k in range(extra) for q in queries
            ],
            mode="off",
            **kw,
        )
        if extra
        else []
    )
    outs = {
        "base": engine.generate(plain, sampling, mode="off", **kw),
        "context": engine.generate(with_context, sampling, mode="off", **kw),
        "adapter": engine.generate(plain, sampling, mode="on", **kw),
        "routed": engine.generate(plain, sampling, mode="gated", **kw),
    }
    rows = []
    for i, q in enumerate(queries):
        spec, program = programs[q["persona"]]
        text = by_name[q["persona"]].text(config.persona_length)
        answers = {c: outs[c][i].text for c in CONDITIONS}

        def verdict(base: str, other: str) -> str:
            return run_program(program, spec, q["query"], base, other, text)  # noqa: B023

        candidates = [answers["context"]] + [g.text for g in samples[i :: len(queries)]]
        won = sum(verdict(answers["base"], c) == "persona" for c in candidates)
        rows.append(
            {
                "id": q["id"],
                "persona": q["persona"],
                "query": q["query"],
                "label": int(won > 0),
                **({"context_samples": candidates[1:], "context_answers_won": won} if extra else {}),
                "gate_prob": float(outs["routed"][i].gate_prob),
                "routed": bool(outs["routed"][i].route),
                "passes": {c: int(verdict("", answers[c]) == "persona") for c in CONDITIONS},
                "answers": answers,
            }
        )
    return HeldOutReport(rows, {**summarise(rows), "label_samples": config.answer_samples})


def _rate(rows: Sequence[dict[str, Any]], condition: str) -> float:
    return sum(r["passes"][condition] for r in rows) / len(rows) if rows else math.nan


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    labels = [r["label"] for r in rows]
    probs = [r["gate_prob"] for r in rows]

    def auroc_of(idx: list[int]) -> float:
        return auroc([probs[i] for i in idx], [labels[i] for i in idx])

    def accuracy_of(idx: list[int]) -> float:
        return sum(int(rows[i]["routed"]) == labels[i] for i in idx) / len(idx)

    everything = list(range(len(rows)))
    routed = [r for r in rows if r["routed"]]
    off = [r for r in rows if not r["routed"]]
    rates = {
        "all": {c: _rate(rows, c) for c in CONDITIONS},
        "routed_on": {c: _rate(routed, c) for c in CONDITIONS},
    }
    on = rates["routed_on"]
    gain = on["context"] - on["base"] if routed else math.nan
    share = (on["adapter"] - on["base"]) / gain if gain > 0 else math.nan
    return {
        "queries": len(rows),
        "positives": sum(labels),
        "gate_auroc": auroc_of(everything),
        "gate_auroc_ci95": bootstrap_interval(auroc_of, len(rows)),
        "gate_accuracy": accuracy_of(everything),
        "gate_accuracy_ci95": bootstrap_interval(accuracy_of, len(rows)),
        "routed_on": len(routed),
        "pass_rates": rates,
        "adapter_share_of_context_gain": share,
        "routed_off_equal_to_base": sum(r["answers"]["routed"] == r["answers"]["base"] for r in off),
        "routed_off": len(off),
    }


def format_report(summary: dict[str, Any]) -> str:
    """The lines printed after fit."""
    s = summary
    lo, hi = s["gate_auroc_ci95"]
    alo, ahi = s["gate_accuracy_ci95"]
    rates = s["pass_rates"]
    lines = [
        f"\nheld-out check: {s['queries']} fresh queries ({s['positives']} where the context helped, "
        "by the verifier"
        + (f", in any of {s['label_samples']} answers" if s.get("label_samples", 1) > 1 else "")
        + "), never trained or selected on",
        f"  gate AUROC      {s['gate_auroc']:.3f}  (95% CI {lo:.3f}-{hi:.3f})",
        f"  gate accuracy   {s['gate_accuracy']:.3f}  (95% CI {alo:.3f}-{ahi:.3f})",
        "  verifier pass rate     base   context   adapter   routed",
    ]
    for where, label in (("all", "all queries"), ("routed_on", f"routed on ({s['routed_on']})")):
        r = rates[where]
        lines.append(
            f"  {label:<20}{r['base']:>7.2f}{r['context']:>10.2f}{r['adapter']:>10.2f}{r['routed']:>9.2f}"
        )
    share = s["adapter_share_of_context_gain"]
    lines.append(
        "  adapter carries "
        + ("n/a" if math.isnan(share) else f"{share:.0%}")
        + " of the context's gain on the routed queries, with no context in the prompt"
    )
    lines.append(
        f"  routed off: {s['routed_off_equal_to_base']}/{s['routed_off']} answered exactly as the base model"
    )
    return "\n".join(lines)


__all__ = ["CONDITIONS", "HeldOutReport", "auroc", "bootstrap_interval", "format_report", "run_heldout_check"]
