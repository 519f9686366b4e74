"""The side-by-side table: every published number of a model (``paper_numbers.yaml``) beside this run's
value with its 95% bootstrap CI and the difference.

This run's values come from the run directory's outputs: ``eval/summary.json`` and the scored rows in
``eval/items/`` (persona effects, routing rates), ``study/items/`` (MMLU per persona length), the
bootstrap summary (the distill share) and the checkpoint's ``prism.json`` (gate accuracy). A number whose
input is missing shows ``-`` with the step that makes it.

With more training seeds (``reproduce --seeds N``) each number that a fit changes (the adapter conditions'
scores, routing, the routing-vs-effect correlation, the gate's accuracy) is also measured on every seed's
fit and evaluation, and the table adds their mean and range across the seeds beside the first seed's
item CI; numbers no fit changes (the base-model conditions, the persona study, the bootstrap split) say so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from prism_lightning import files, run_paths
from prism_lightning.errors import ConfigError
from prism_lightning.eval import scoring as S
from prism_lightning.eval.summary import summarise
from prism_lightning.run_paths import RunPaths

__all__ = [
    "PAPER_NUMBERS_FILE",
    "PAPER_SAFETY_SETS",
    "Comparison",
    "RunPaths",
    "compare",
    "format_table",
    "paper_model_id",
    "paper_numbers",
    "paper_safety_sets",
    "same_model",
    "varies_with_seed",
]

PAPER_NUMBERS_FILE = Path(__file__).with_name("paper_numbers.yaml")
CI_RESAMPLES = 1000
#: The difference column of a row whose paper number was measured on another model than this run's.
DIFFERENT_MODEL = "different model (no verdict)"


@dataclass
class Comparison:
    """One row of the table."""

    label: str
    metric: str
    source: str
    paper: str
    ours: str
    difference: str
    value: float | None = None
    lo: float | None = None
    hi: float | None = None
    comparable: bool = True  # this run's base model is the model the paper's number was measured on
    seeds: str | None = None  # across training seeds (``--seeds``): "mean [min, max]", or why not
    seed_values: list[float | None] | None = None  # one per training seed, the first seed's first
    seed_sd: float | None = None  # sample standard deviation across the seeds that have a value


def _paper_entry(model: str) -> dict:
    models = yaml.safe_load(PAPER_NUMBERS_FILE.read_text(encoding="utf-8"))["models"]
    if model not in models:
        raise ConfigError(f"no published numbers for {model!r}; known: {', '.join(models)}.")
    return models[model]


def paper_numbers(model: str) -> list[dict]:
    """The published numbers of ``model`` (a key of ``paper_numbers.yaml``)."""
    return list(_paper_entry(model)["numbers"])


def paper_model_id(model: str) -> str:
    """The hub id of the model whose numbers ``model`` (a key of ``paper_numbers.yaml``) holds."""
    return str(_paper_entry(model)["model"])


def _model_name(name: str) -> str:
    return name.strip().rstrip("/").rsplit("/", 1)[-1].lower()


def same_model(run_model: str, paper_model: str) -> bool:
    """Whether a run of ``run_model`` (a hub id, a local directory or an embedded name) measures the
    paper's ``paper_model`` (a hub id): the same last path component, ignoring case, so a local copy in a
    directory named after the model counts; an embedded small model never does."""
    return _model_name(run_model) == _model_name(paper_model)


# ------------------------------------------------------------------------------------------------
# what this run's Safety and persona rows were measured on

#: The safety sets of the paper's Safety score (and its Overall); of these, this project runs HarmBench
#: and JailbreakBench (as the plain behaviour goals), and has no PKU-SafeRLHF loader.
PAPER_SAFETY_SETS: tuple[str, ...] = ("harmbench", "jailbreakbench", "pku_saferlhf")
_SET_NAMES = {"harmbench": "HarmBench", "jailbreakbench": "JailbreakBench", "advbench": "AdvBench",
              "pku_saferlhf": "PKU-SafeRLHF"}  # fmt: skip


def paper_safety_sets(sets: list[str] | tuple[str, ...]) -> list[str]:
    """The sets of ``sets`` that are among the paper's safety sets, in ``sets``' order."""
    return [s for s in sets if s in PAPER_SAFETY_SETS]


def _safety_sets(summary: dict) -> list[str]:
    sets = (summary.get("settings") or {}).get("safety_sets")
    if sets is None:  # an older summary: the sets its sub-scores name
        sets = [n.partition("/")[2] for n in summary.get("subscores", []) if n.startswith("safety/")]
    return list(sets)


def _set_text(name: str, summary: dict) -> str:
    text = _SET_NAMES.get(name, name)
    # the pinned JailbreakBench file holds the behaviour goals, not the paper's jailbreak prompts
    if name == "jailbreakbench":
        local = name in ((summary.get("settings") or {}).get("paths") or {})
        text += " (a local file)" if local else " (plain goals)"
    return text


def _sets_label(sets: list[str], summary: dict) -> str:
    return ", ".join(_set_text(s, summary) for s in sets) if sets else "none"


def _with_run_labels(numbers: list[dict], summary: dict | None) -> list[dict]:
    """``numbers`` with the labels saying what this run measured: the safety sets behind each Safety and
    Overall row (and, beside each, a row over the paper's sets only, when the run has any of them), and the
    persona length behind the persona-effect and Safety-Monitor rows."""
    if summary is None:
        return numbers
    sets = _safety_sets(summary)
    paper = paper_safety_sets(sets)
    missing = [_SET_NAMES[s] for s in PAPER_SAFETY_SETS if s not in sets]
    length = ((summary.get("conditions_config") or {}).get("persona") or {}).get("persona_length")
    out = []
    for n in numbers:
        kind, _, arg = n["metric"].partition(":")
        score = arg.rpartition(":")[2]
        if kind == "eval" and score in ("safety", "overall"):
            out.append({**n, "label": f"{n['label']} [safety sets: {_sets_label(sets, summary)}]"})
            if paper:
                only = _sets_label(paper, summary) + (f"; {', '.join(missing)} not run" if missing else "")
                label = f"{n['label']} [paper's sets only: {only}]"
                out.append({**n, "metric": f"eval_paper_sets:{arg}", "label": label})
            continue
        if length and (kind == "effect" or n["metric"] == "eval:persona:safety/jailbreakbench"):
            n = {**n, "label": f"{n['label']} [this run: {length} persona]"}
        out.append(n)
    return out


# ------------------------------------------------------------------------------------------------
# this run's values: (mean, lo, hi) or None when the input is missing


def _rows(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in files.read_written_jsonl(path) if "id" in r} if path.exists() else {}


def _ci(values: list, scale: float) -> tuple[float, float | None, float | None] | None:
    if not values:
        return None
    ci = S.bootstrap_ci(values, n_resamples=CI_RESAMPLES, seed=0)
    if not math.isfinite(ci["mean"]):
        return None
    return ci["mean"] * scale, ci["lo"] * scale, ci["hi"] * scale


def _eval_summary(paths: RunPaths) -> dict | None:
    path = run_paths.eval_summary(paths.eval)
    return json.loads(path.read_text()) if path.exists() else None


def _from_summary(paths: RunPaths, cond: str, score: str):
    summary = _eval_summary(paths)
    if summary is None:
        return None
    res = summary["conditions"].get(cond)
    if not res:
        return None
    ci = res["subscores"].get(score) if score in res["subscores"] else res.get(score)
    if not ci or ci.get("mean") is None or not math.isfinite(ci["mean"]):
        return None
    lo, hi = ci.get("lo"), ci.get("hi")
    ok = lo is not None and math.isfinite(lo)
    return ci["mean"], (lo if ok else None), (hi if ok else None)


def _paper_sets_score(paths: RunPaths, cond: str, score: str):
    """Safety or Overall of ``cond`` over the paper's safety sets only (the other sets' rows left out),
    computed from the item files exactly as ``evaluate``'s summary computes the run's own."""
    summary = _eval_summary(paths)
    if summary is None:
        return None
    kept = paper_safety_sets(_safety_sets(summary))
    if not kept:
        return None
    names = [n for n in summary["subscores"] if not n.startswith("safety/") or n.partition("/")[2] in kept]
    rows_by = {}
    for bench in ("mtbench", "mmlu", "safety"):
        rows = [
            r for r in _rows(run_paths.item_file(paths.eval, bench, cond)).values() if r.get("group") in names
        ]
        if rows:
            rows_by[(bench, cond)] = rows
    res = summarise(rows_by, [cond], names, n_resamples=CI_RESAMPLES)["conditions"].get(cond)
    ci = (res or {}).get(score)
    if not ci or ci.get("mean") is None or not math.isfinite(ci["mean"]):
        return None
    ok = ci.get("lo") is not None and math.isfinite(ci["lo"])
    return ci["mean"], (ci["lo"] if ok else None), (ci["hi"] if ok else None)


def _in_group(row: dict, group: str) -> bool:
    return group == "all" or row.get("group") == group or str(row.get("group", "")).startswith(group + "/")


def _effect(paths: RunPaths, score: str):
    bench = score.partition("/")[0]
    treated = _rows(run_paths.item_file(paths.eval, bench, "persona"))
    control = _rows(run_paths.item_file(paths.eval, bench, "base"))
    t = {i: r["values"] for i, r in treated.items() if _in_group(r, score)}
    c = {i: r["values"] for i, r in control.items() if _in_group(r, score)}
    if not t or not c:
        return None
    d = S.bootstrap_delta_ci(t, c, n_resamples=CI_RESAMPLES, seed=0)
    if d.get("mean") is None or not math.isfinite(d["mean"]):
        return None
    scale = S.REPORTED_SCALE[bench]
    return d["mean"] * scale, d["lo"] * scale, d["hi"] * scale


def _routing(paths: RunPaths, group: str):
    rows = []
    for path in run_paths.item_files(paths.eval, "prism"):
        rows += [r for r in _rows(path).values() if _in_group(r, group) and r.get("route") is not None]
    return _ci([float(r["route"]) for r in rows], 100.0)


def _correlation(paths: RunPaths, which: str):
    path = run_paths.eval_summary(paths.eval)
    if not path.exists():
        return None
    corr = json.loads(path.read_text()).get("correlation", {})
    v, lo, hi = corr.get(which), corr.get(f"{which}_lo"), corr.get(f"{which}_hi")  # CI: over categories
    if v is None or not math.isfinite(v):
        return None
    return (v, lo, hi) if lo is not None else (v, None, None)


def _study_mmlu(paths: RunPaths, length: str):
    cell = "none" if length == "none" else run_paths.study_cell("matched", length, "system")
    rows = _rows(run_paths.item_file(paths.study, "mmlu", cell))
    return _ci([r["values"] for r in rows.values()], 100.0)


def _distill_share(paths: RunPaths):
    path = run_paths.bootstrap_summary(paths.run)
    if not path.exists():
        return None
    s = json.loads(path.read_text())
    total = ((s.get("verdicts") or {}).get("split") or {}).get(s.get("verdict_rule"), {}).get("total", {})
    d, r = int(total.get("distill", 0)), int(total.get("retain", 0))
    return _ci([1.0] * d + [0.0] * r, 100.0)


def _fit_metrics(paths: RunPaths) -> dict | None:
    path = paths.checkpoint / run_paths.PRISM_JSON
    if not path.exists():
        return None
    return (json.loads(path.read_text()).get("training_config") or {}).get("metrics") or {}


def _gate_acc(paths: RunPaths):
    """The exported gate's accuracy on the test split, with its CI; a checkpoint without a test split
    gives the last epoch's validation accuracy (rows the gate was selected on), without a CI."""
    metrics = _fit_metrics(paths)
    if metrics is None:
        return None
    test = (metrics.get("test") or {}).get("gate_acc")
    if test is not None:
        return 100.0 * test["mean"], 100.0 * test["lo"], 100.0 * test["hi"]
    acc = (metrics.get("after_fit") or {}).get("val/gate_acc")
    return None if acc is None else (100.0 * float(acc), None, None)


def _gate_label(paths: RunPaths) -> str | None:
    """What this run's gate accuracy was measured on, for the row's label."""
    metrics = _fit_metrics(paths)
    if metrics is None:
        return None
    test = metrics.get("test") or {}
    if test.get("gate_acc") is not None:
        return f"exported gate, held-out test split of {test['rows']} rows"
    return "last epoch, on the validation rows the gate was selected on (no test split)"


def _trained_condition(cond: str) -> bool:
    from prism_lightning.eval.conditions import CONDITIONS, KWAY_CONDITIONS, Condition

    return cond in CONDITIONS + KWAY_CONDITIONS and Condition(cond).needs_checkpoint


def varies_with_seed(metric: str) -> bool:
    """Whether a fit changes ``metric``: the adapter conditions' scores, routing, the routing-vs-effect
    correlation and the gate's accuracy do; the base-model conditions, persona effects, the persona study
    and the bootstrap's split do not (one bootstrap serves every seed)."""
    kind, _, arg = metric.partition(":")
    if kind in ("eval", "eval_paper_sets"):
        return _trained_condition(arg.partition(":")[0])
    return kind in ("routing", "correlation", "gate_acc")


def _seed_correlation(first: RunPaths, paths: RunPaths, which: str):
    """An extra seed's routing-vs-effect correlation: its prism routing rates against the persona effects
    of the first seed's evaluation (its evaluation runs only the adapter conditions; the effects do not
    change with the training seed)."""
    effects = ((_eval_summary(first) or {}).get("correlation") or {}).get("persona_effect")
    prism = ((_eval_summary(paths) or {}).get("conditions") or {}).get("prism")
    if not effects or not prism:
        return None
    rates = prism.get("routing_rate") or {}
    x = [None if rates.get(n) is None else 100.0 * rates[n] for n in effects]
    value = S.correlate(x, [effects[n] for n in effects]).get(which)
    return None if value is None or not math.isfinite(value) else (value, None, None)


def _seed_spread(first: RunPaths, seeds: list[RunPaths], metric: str, digits: int):
    """(text, per-seed values, sd) of ``metric`` across the first seed and ``seeds``."""
    if not varies_with_seed(metric):
        return "same for every seed (no fit)", None, None
    values: list[float | None] = []
    for k, paths in enumerate([first, *seeds]):
        kind, _, arg = metric.partition(":")
        got = _seed_correlation(first, paths, arg) if kind == "correlation" and k else measured(paths, metric)
        values.append(None if got is None else got[0])
    have = [v for v in values if v is not None]
    if not have:
        return "-", values, None
    mean = sum(have) / len(have)
    sd = math.sqrt(sum((v - mean) ** 2 for v in have) / (len(have) - 1)) if len(have) > 1 else None
    text = f"{mean:.{digits}f} [{min(have):.{digits}f}, {max(have):.{digits}f}]"
    if len(have) < len(values):
        text += f" ({len(have)} of {len(values)} seeds)"
    return text, values, sd


_MAKER = {  # which step writes the input of each metric kind
    "eval": "evaluate", "eval_paper_sets": "evaluate", "effect": "evaluate", "routing": "evaluate",
    "correlation": "evaluate",
    "study_mmlu": "study", "split": "bootstrap", "gate_acc": "fit",
}  # fmt: skip


def measured(paths: RunPaths, metric: str):
    """This run's (mean, lo, hi) of one ``metric`` of ``paper_numbers.yaml``, or None if not there."""
    kind, _, arg = metric.partition(":")
    if kind == "eval":
        cond, _, score = arg.partition(":")
        return _from_summary(paths, cond, score)
    if kind == "eval_paper_sets":
        cond, _, score = arg.partition(":")
        return _paper_sets_score(paths, cond, score)
    if kind == "effect":
        return _effect(paths, arg)
    if kind == "routing":
        return _routing(paths, arg)
    if kind == "correlation":
        return _correlation(paths, arg)
    if kind == "study_mmlu":
        return _study_mmlu(paths, arg)
    if kind == "split":
        return _distill_share(paths)
    if kind == "gate_acc":
        return _gate_acc(paths)
    raise ConfigError(f"unknown metric {metric!r} in {PAPER_NUMBERS_FILE.name}")


# ------------------------------------------------------------------------------------------------
# the table


def _digits(metric: str) -> int:
    return 2 if ("mtbench" in metric and "routing" not in metric) or metric.startswith("correlation") else 1


def _paper_text(n: dict, digits: int) -> str:
    if "range" in n:
        lo, hi = n["range"]
        return f"{lo}-{hi}"
    if "direction" in n:
        return "> 0 (helps)" if n["direction"] == "up" else "< 0 (hurts)"
    return ("~" if n.get("approx") else "") + f"{n['value']:.{digits}f}"


def _difference(n: dict, got: tuple, digits: int) -> str:
    mean, lo, hi = got
    if "range" in n:
        a, b = n["range"]
        if a <= mean <= b:
            return "inside the range"
        return f"{mean - b:+.{digits}f} above" if mean > b else f"{mean - a:+.{digits}f} below"
    if "direction" in n:
        agrees = (mean > 0) == (n["direction"] == "up")
        sure = lo is not None and (lo > 0 or hi < 0)
        sign = "same sign" if agrees else "opposite sign"
        return sign + (" (CI excludes 0)" if sure else " (CI spans 0)")
    diff = mean - float(n["value"])
    covered = lo is not None and lo <= float(n["value"]) <= hi
    return f"{diff:+.{digits}f}" + (" (paper inside CI)" if covered else "")


def compare(
    paths: RunPaths, paper_model: str, run_model: str, *, seeds: list[RunPaths] | tuple[RunPaths, ...] = ()
) -> list[Comparison]:
    """Every published number of ``paper_model`` beside this run's. A verdict (the difference, "paper
    inside CI", inside a range, the sign) is given only when ``run_model``, this run's base model, is the
    model the paper measured; otherwise the row says "different model" and judges nothing. ``seeds``: the
    paths of the extra training seeds (``paths`` is the first's); each row then carries the spread."""
    comparable = same_model(run_model, paper_model_id(paper_model))
    seeds = list(seeds)
    out = []
    gate_label = _gate_label(paths)
    for n in _with_run_labels(paper_numbers(paper_model), _eval_summary(paths)):
        if n["metric"] == "gate_acc" and gate_label:
            n = {**n, "label": f"{n['label']} [{gate_label}]"}
        digits = _digits(n["metric"])
        got = measured(paths, n["metric"])
        if got is None:
            step = _MAKER.get(n["metric"].partition(":")[0], "?")
            ours, diff = "-", f"(no {step} output)"
        else:
            mean, lo, hi = got
            ours = f"{mean:.{digits}f}" + (f" [{lo:.{digits}f}, {hi:.{digits}f}]" if lo is not None else "")
            diff = _difference(n, got, digits) if comparable else DIFFERENT_MODEL
        spread, values, sd = _seed_spread(paths, seeds, n["metric"], digits) if seeds else (None, None, None)
        out.append(
            Comparison(
                label=n["label"],
                metric=n["metric"],
                source=n["source"],
                paper=_paper_text(n, digits),
                ours=ours,
                difference=diff,
                value=None if got is None else got[0],
                lo=None if got is None else got[1],
                hi=None if got is None else got[2],
                comparable=comparable,
                seeds=spread,
                seed_values=values,
                seed_sd=sd,
            )
        )
    return out


def format_table(rows: list[Comparison], *, title: str, markdown: bool = False) -> str:
    """``paper | this run [95% CI] | difference`` per published number (with ``--seeds``, the spread across
    the training seeds before the difference); sources listed below the table."""
    sources = list(dict.fromkeys(r.source for r in rows))
    header = ["number", "paper", "this run [95% CI]", "difference", "src"]
    body = [[r.label, r.paper, r.ours, r.difference, str(sources.index(r.source) + 1)] for r in rows]
    n_seeds = max((len(r.seed_values) for r in rows if r.seed_values), default=0)
    if n_seeds:  # --seeds: the spread across the training seeds, beside the first seed's item CI
        header.insert(3, f"{n_seeds} seeds: mean [min, max]")
        for row, r in zip(body, rows, strict=True):
            row.insert(3, r.seeds or "-")
    notes = [f"  [{i + 1}] {s}" for i, s in enumerate(sources)]
    if markdown:
        lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join([*lines, "", "Sources:", *notes])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = [title, " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    if not rows:
        lines.append("(the collected notes hold no number of this model)")
    return "\n".join([*lines, "sources:", *notes])
