"""The bootstrap's summary: what each stage made and cost, the distill/retain split, and the warnings a
user should read before training (``<run_dir>/bootstrap/summary.json`` and the printed table)."""

from __future__ import annotations

from typing import Any

from prism_lightning.bootstrap.store import FORMAT_VERSION
from prism_lightning.bootstrap.thinking_stats import thinking_warnings
from prism_lightning.run_paths import BOOTSTRAP_STAGES as STAGES


def build_summary(config, stores, timings, total_seconds, loaded, run_dir) -> dict[str, Any]:
    metas = {name: store.meta() for name, store in stores.items()}
    stages = {}
    for name in STAGES:
        meta = metas[name]
        this_run = timings.get(name, {"cached": True, "seconds": 0.0})
        stages[name] = {
            "dir": str(stores[name].path),
            "cached": this_run.get("cached", False),
            "recomputed_because": this_run.get("recomputed_because"),
            "seconds_this_run": this_run.get("seconds", 0.0),
            "seconds_when_computed": meta.get("seconds"),
            "rows": meta.get("rows"),
            "jobs": meta.get("jobs"),
            "resumed_rows": meta.get("resumed_rows"),
            "tokens_generated": meta.get("tokens_generated"),
            "tokens_per_second": meta.get("tokens_per_second"),
        }
    qs = metas["queries"].get("stats", {})
    ans = metas["answers"].get("stats", {})
    vs = metas["verdicts"].get("stats", {})
    split = vs.get("split", {})
    rule = "program" if vs.get("decided_by") == "program" else config.verdict_rule
    warnings: list[str] = list(ans.get("warnings", []))
    thinking = {n: metas[n].get("stats", {}).get("thinking") for n in ("queries", "answers", "verdicts")}
    thinking = {n: t for n, t in thinking.items() if t}
    warnings += thinking_warnings(thinking)
    for name in qs.get("empty_personas", []):
        warnings.append(f"persona {name!r} kept no queries")
    unparsable = vs.get("unparsable", {})
    if sum(unparsable.values()):
        warnings.append(
            f"unparsable free-text verdicts: {unparsable} (the strict rule counts them as retain)"
        )
    total = split.get(rule, {}).get("total", {})
    if total and (total.get("distill", 0) == 0 or total.get("retain", 0) == 0):
        warnings.append(
            f"the {rule} rule gives {total.get('distill', 0)} distill / {total.get('retain', 0)} retain "
            "rows: training needs both; raise queries_per_persona, switch verdict_rule, or change "
            "persona_length/placement"
        )
    return {
        "format_version": FORMAT_VERSION,
        "run_dir": str(run_dir),
        "verdict_rule": rule,
        "backend": config.generation.backend,
        "models_loaded": loaded,
        "total_seconds": round(total_seconds, 3),
        "stages": stages,
        "queries": {
            k: qs.get(k) for k in ("generated", "kept", "dropped", "kept_per_persona", "dropped_by_reason")
        },
        "answers": {k: v for k, v in ans.items() if k != "warnings"},
        "verdicts": {
            "pairs": vs.get("pairs"),
            "unparsable": unparsable,
            "parsed_counts": vs.get("parsed_counts"),
            "split": split,
            "decided_by": vs.get("decided_by", "self"),
            "agreement": vs.get("agreement", {}),
            **({"answer_samples": vs["answer_samples"]} if "answer_samples" in vs else {}),
        },
        **({"thinking": thinking} if thinking else {}),
        "warnings": warnings,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of the summary for the terminal."""
    lines = [f"bootstrap summary ({summary['run_dir']}, rule: {summary['verdict_rule']})"]
    lines.append(
        f"{'stage':<10}{'status':<10}{'rows':>6}{'tokens':>9}{'tok/s':>8}{'s (run)':>9}{'s (made)':>10}"
    )
    for name, st in summary["stages"].items():
        status = "cached" if st["cached"] else "computed"
        lines.append(
            f"{name:<10}{status:<10}{st['rows'] or 0:>6}{st['tokens_generated'] or 0:>9}"
            f"{st['tokens_per_second'] or 0:>8.1f}{st['seconds_this_run']:>9.1f}"
            f"{st['seconds_when_computed'] or 0:>10.1f}"
        )
    q = summary["queries"]
    lines.append(f"queries: {q['generated']} generated, {q['kept']} kept, {q['dropped']} dropped")
    for persona, reasons in (q.get("dropped_by_reason") or {}).items():
        nonzero = {k: v for k, v in reasons.items() if v}
        kept = (q.get("kept_per_persona") or {}).get(persona, 0)
        lines.append(f"  {persona:<16} kept {kept:>3}  dropped {nonzero or '-'}")
    v = summary["verdicts"]
    decided = v.get("decided_by", "self")
    lines.append(
        f"verdicts: {v['pairs']} pairs decided by {decided}, unparsable free-text verdicts {v['unparsable']}"
    )
    split = v.get("split") or {}
    rules = [r for r in ("strict", "logprob", "program") if r in split]
    personas = list(dict.fromkeys(p for r in rules for p in split[r] if p != "total"))
    lines.append(f"  {'persona':<16}" + "".join(f"{r + ' d/r':>14}" for r in rules))
    for p in [*personas, "total"]:
        cells = [split[r].get(p, {}) for r in rules]
        lines.append(
            f"  {p:<16}" + "".join(f"{c.get('distill', 0):>8}/{c.get('retain', 0):<5}" for c in cells)
        )
    for pair, agree in (v.get("agreement") or {}).items():
        lines.append(
            f"  agreement {pair.replace('~', ' vs ')}: {agree['agree']:.0%} of {agree['pairs']} pairs, "
            f"Cohen's kappa {agree['kappa']:.2f}"
        )
    if v.get("answer_samples"):
        a = v["answer_samples"]
        lines.append(
            f"  best of the persona samples: {a['won_by_first_sample']} pairs won by the first, "
            f"{a['won_by_a_later_sample']} more by a later one ({a['samples_won_mean']:.2f} winning per pair)"
        )
    for name, t in (summary.get("thinking") or {}).items():
        lines.append(
            f"thinking ({name}): {t['blocks']} blocks, {t['tokens']} tokens, {t['unterminated']} ran out of "
            "the budget"
        )
    for name, st in summary["stages"].items():
        if st.get("recomputed_because"):
            lines.append(f"recomputed {name}: {st['recomputed_because']}")
    for w in summary["warnings"]:
        lines.append(f"WARNING: {w}")
    lines.append(f"total {summary['total_seconds']:.1f} s")
    return "\n".join(lines)
