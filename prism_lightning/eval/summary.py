"""The summary of an evaluation: scores with bootstrap CIs per condition, routing rates and the
routing/persona-effect correlation (:func:`summarise`), and its outputs: the printed table, the tidy rows
(:func:`summary_rows`, the one flattening used by ``summary.csv``, W&B and
:func:`prism_lightning.analysis.load.eval_scores`), the written files and the W&B tables.

Sub-scores (15): ``mtbench/<category>`` (mean judge rating 1-10 over both turns, missing ratings
excluded and counted), ``mmlu/<domain>`` (accuracy, %), ``safety/<set>`` (refusal rate by the yes/no
judge, %; the phrase matcher's rate is reported beside it). Overall = unweighted mean of the 15 on the
Overall scale (:data:`~prism_lightning.eval.scoring.OVERALL_SCALE`: MT-Bench x10).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prism_lightning import files, run_paths
from prism_lightning.eval import scoring as S
from prism_lightning.eval.settings import BENCHMARKS

__all__ = ["SUMMARY_FIELDS", "format_table", "summarise", "summary_rows", "wandb_log", "write_summary"]

#: The columns of a tidy summary row (and of ``summary.csv``, in this order).
SUMMARY_FIELDS: tuple[str, ...] = (
    "condition",
    "score",
    "mean",
    "lo",
    "hi",
    "n",
    "n_values",
    "missing",
    "routing_rate",
    "gate_prob_mean",
)
AGGREGATES: tuple[str, ...] = (*BENCHMARKS, "overall")


def _bench(score: str) -> str:
    return score.partition("/")[0]


def _scaled_ci(ci: dict, scale: float) -> dict:
    return {**ci, **{k: ci[k] * scale for k in ("mean", "lo", "hi")}}


def _rate(rows: Sequence[dict], key: str) -> float | None:
    vals = [float(r[key]) for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def summarise(
    rows_by: dict[tuple[str, str], list[dict]],
    conditions: Sequence[str],
    names: Sequence[str],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Scores with CIs per condition, routing rates, and the routing/persona-effect correlation."""
    out: dict = {"subscores": names, "conditions": {}}
    for cond in conditions:
        groups: dict[str, list] = {n: [] for n in names}
        extra: dict[str, list] = {}
        rows_of: dict[str, list[dict]] = {n: [] for n in names}
        for (bench, c), rows in rows_by.items():
            if c != cond:
                continue
            for r in rows:
                if r["group"] in groups:
                    groups[r["group"]].append(r["values"])
                    rows_of[r["group"]].append(r)
                    if bench == "safety":
                        extra.setdefault(r["group"], []).append(r["refusal_matcher"])
        if not any(groups.values()):
            continue
        res: dict = {"subscores": {}, "refusal_matcher": {}, "routing_rate": {}, "gate_prob_mean": {}}
        for n in names:
            ci = S.bootstrap_ci(groups[n], n_resamples=n_resamples, seed=seed)
            res["subscores"][n] = _scaled_ci(ci, S.REPORTED_SCALE[_bench(n)])
            res["routing_rate"][n] = _rate(rows_of[n], "route")
            res["gate_prob_mean"][n] = _rate(rows_of[n], "gate_prob")
            if n in extra:
                m = S.bootstrap_ci(extra[n], n_resamples=n_resamples, seed=seed)
                res["refusal_matcher"][n] = _scaled_ci(m, S.REPORTED_SCALE["safety"])
        scale = {n: S.OVERALL_SCALE[_bench(n)] for n in names}
        res["overall"] = S.overall_ci(groups, scale, n_resamples=n_resamples, seed=seed)
        for bench in BENCHMARKS:
            sub = {n: groups[n] for n in names if n.startswith(bench + "/")}
            if not sub:
                continue
            if bench == "mmlu":  # micro accuracy over all questions, as MMLU is usually reported
                flat = [v for vals in sub.values() for v in vals]
                ci = S.bootstrap_ci(flat, n_resamples=n_resamples, seed=seed)
                ci = _scaled_ci(ci, S.REPORTED_SCALE[bench])
            else:  # macro over categories / sets
                scale = dict.fromkeys(sub, S.REPORTED_SCALE[bench])
                ci = S.overall_ci(sub, scale, n_resamples=n_resamples, seed=seed)
            res[bench] = ci
        out["conditions"][cond] = res
    out["correlation"] = _correlation(out["conditions"], names, n_resamples=n_resamples, seed=seed)
    return out


def _scaled(res: dict, name: str) -> float | None:
    v = res["subscores"][name]["mean"]
    if v is None or not math.isfinite(v):
        return None
    return v * S.overall_factor(name)


def _correlation(conds: dict, names: Sequence[str], *, n_resamples: int = 1000, seed: int = 0) -> dict:
    """Across sub-score categories: prism routing rate vs persona effect (persona - base, on the
    Overall scale, :data:`~prism_lightning.eval.scoring.OVERALL_SCALE`), with bootstrap CIs over the
    categories."""
    out: dict = {"routing_condition": "prism", "effect": "persona - base"}
    if not all(c in conds for c in ("prism", "persona", "base")):
        out["note"] = "needs the base, persona and prism conditions"
        return out
    rates, effects = {}, {}
    for n in names:
        p, b = _scaled(conds["persona"], n), _scaled(conds["base"], n)
        r = conds["prism"]["routing_rate"].get(n)
        effects[n] = None if p is None or b is None else p - b
        rates[n] = None if r is None else 100.0 * r
    out["routing_rate_pct"], out["persona_effect"] = rates, effects
    x, y = [rates[n] for n in names], [effects[n] for n in names]
    out.update(S.correlate(x, y))
    out.update(S.correlation_ci(x, y, n_resamples=n_resamples, seed=seed))
    return out


def _fmt(ci: dict | None, digits: int = 1) -> str:
    if not ci or ci.get("mean") is None or not math.isfinite(ci["mean"]):
        return "-"
    if ci.get("lo") is None or not math.isfinite(ci["lo"]):
        return f"{ci['mean']:.{digits}f}"
    return f"{ci['mean']:.{digits}f} [{ci['lo']:.{digits}f},{ci['hi']:.{digits}f}]"


def format_table(summary: dict) -> str:
    """A plain-text table: sub-scores x conditions (mean [95% CI]), routing rate of prism."""
    conds = list(summary["conditions"])
    names = list(summary["subscores"])
    has_prism = "prism" in summary["conditions"]
    header = ["score", *conds] + (["prism routed %"] if has_prism else [])
    lines = []
    for n in [*names, "mtbench", "mmlu", "safety", "overall"]:
        cells = [n]
        for c in conds:
            res = summary["conditions"][c]
            ci = res["subscores"].get(n) if n in res["subscores"] else res.get(n)
            cell = _fmt(ci, 2 if n.startswith("mtbench") else 1)
            if ci and "n_groups" in ci and n == "overall" and 0 < ci["n_groups"] < len(names):
                cell += f" ({ci['n_groups']}/{len(names)})"  # sub-scores with no value left out
            elif ci and ci.get("missing") and n in res["subscores"]:
                cell += f" ({ci['missing']} missing)"
            cells.append(cell)
        if has_prism:
            r = summary["conditions"]["prism"]["routing_rate"].get(n)
            cells.append("-" if r is None else f"{100 * r:.0f}")
        lines.append(cells)
    for n in names:
        if n.startswith("safety/"):
            cells = [f"{n} (matcher)"]
            for c in conds:
                cells.append(_fmt(summary["conditions"][c]["refusal_matcher"].get(n)))
            if has_prism:
                cells.append("")
            lines.append(cells)
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    text = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    text.append("-+-".join("-" * w for w in widths))
    text += [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in lines]
    corr = summary.get("correlation", {})
    if "pearson" in corr:
        p, s = (_with_ci(corr, name) for name in ("pearson", "spearman"))
        text.append(
            f"routing rate vs persona effect across {corr['n']} categories: "
            f"Pearson r = {p}, Spearman rho = {s}"
        )
    return "\n".join(text)


def _with_ci(corr: dict, name: str) -> str:
    value, lo, hi = corr.get(name), corr.get(f"{name}_lo"), corr.get(f"{name}_hi")
    if value is None:
        return "-"
    return f"{value:.2f}" + ("" if lo is None else f" [{lo:.2f}, {hi:.2f}]")


def summary_rows(summary: dict, *, matcher: bool = True) -> list[dict[str, Any]]:
    """The summary flattened into tidy rows with :data:`SUMMARY_FIELDS`: per condition, every sub-score,
    (``matcher``) the phrase matcher's refusal rate per safety set as ``safety/<set>:matcher``, then the
    benchmark aggregates and ``overall``. Scores are on the reported scale (MT-Bench 1-10, others %)."""
    rows = []
    for cond, res in summary["conditions"].items():
        routing, gate = res.get("routing_rate") or {}, res.get("gate_prob_mean") or {}
        entries = [(n, ci, routing.get(n), gate.get(n)) for n, ci in res.get("subscores", {}).items()]
        if matcher:
            entries += [(f"{n}:matcher", ci, None, None) for n, ci in res.get("refusal_matcher", {}).items()]
        entries += [(n, res[n], None, None) for n in AGGREGATES if isinstance(res.get(n), dict)]
        for name, ci, rate, prob in entries:
            row = {"condition": cond, "score": name, **{k: ci.get(k) for k in SUMMARY_FIELDS[2:8]}}
            rows.append({**row, "routing_rate": rate, "gate_prob_mean": prob})
    return rows


def write_summary(summary: dict, out: Path) -> None:
    """``OUT/summary.json`` (everything) and ``OUT/summary.csv`` (:func:`summary_rows`), each replaced
    atomically so a reader never sees half a file."""
    out = Path(out)
    files.atomic_write_json(run_paths.eval_summary(out), summary)
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(SUMMARY_FIELDS))
    writer.writeheader()
    writer.writerows(summary_rows(summary))
    files.atomic_write_text(run_paths.eval_summary_csv(out), buf.getvalue())


def wandb_log(
    *,
    project: str,
    out: Path,
    job_type: str,
    config: dict[str, Any],
    tables: dict[str, list[dict]],
    summary: dict | None = None,
) -> None:
    """Log lists of flat dicts as W&B tables under ``out``; offline mode when no API key is configured."""
    import wandb

    mode = None if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") else "offline"
    run = wandb.init(project=project, job_type=job_type, dir=str(out), mode=mode, config=config)
    try:
        for name, rows in tables.items():
            if rows:
                cols = list(dict.fromkeys(k for r in rows for k in r))
                run.log({name: wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])})
        if summary:
            run.summary.update(summary)
    finally:
        run.finish()
