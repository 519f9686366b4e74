"""Tidy pandas frames from a run directory, an exported checkpoint, and evaluate/study outputs.

Every loader reads files the pipeline wrote (nothing is recomputed except gate probabilities, which
need the exported checkpoint) and returns a long-format frame, so each figure is one seaborn call.

Sources
-------
* ``RUN/bootstrap/summary.json`` and ``RUN/bootstrap/<stage>-<hash>/rows.jsonl`` (the stage directory
  named in the summary; the newest finished one when the summary is missing or stale).
* Training curves: the W&B offline files ``RUN/wandb/offline-run-*/run-*.wandb``, decoded here with
  W&B's own protobuf ``Record`` (the record log is a LevelDB-style block file; reading it needs no
  network, no ``wandb sync`` and no private W&B modules, which change between releases). When a run
  has no W&B files, or they cannot be decoded, Lightning ``CSVLogger`` files (``RUN/**/metrics.csv``,
  ``lightning_logs/version_*/metrics.csv``) are used instead.
* ``EVAL/summary.json`` + ``EVAL/items/<benchmark>__<condition>.jsonl`` from ``evaluate --out EVAL``.
* ``STUDY/study.csv`` (or ``study.json``) from ``study --out STUDY``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from prism_lightning import files, run_paths
from prism_lightning.analysis.wandb_records import wandb_history
from prism_lightning.eval import scoring as S

__all__ = [
    "MissingInputError",
    "bootstrap_split",
    "bootstrap_summary",
    "eval_items",
    "eval_scores",
    "fit_metrics",
    "fit_test_scores",
    "gate_predictions",
    "lengths",
    "routing_correlation",
    "stage_rows",
    "study_grid",
    "training_curves",
    "verdict_consistency",
    "verdicts",
]

STAGES = run_paths.BOOTSTRAP_STAGES


class MissingInputError(FileNotFoundError):
    """An input a loader needs is not there (yet); the message names the command that writes it."""


# ------------------------------------------------------------------------------------------------
# bootstrap


def _read_json(path: Path, how_to_make: str) -> dict[str, Any]:
    """A run output as a dict, or a MissingInputError naming the command that writes it."""
    if not path.exists():
        raise MissingInputError(f"{path} not found: {how_to_make}")
    return json.loads(path.read_text(encoding="utf-8"))


def bootstrap_summary(run_dir: str | Path) -> dict[str, Any]:
    """``RUN/bootstrap/summary.json`` (written by every bootstrap/fit run)."""
    path = run_paths.bootstrap_summary(run_dir)
    return _read_json(path, "run `python -m prism_lightning fit` (or bootstrap) first")


def _stage_dir(run_dir: Path, stage: str) -> Path:
    """The stage directory the summary points at (re-rooted under ``run_dir``: the summary stores paths
    relative to where ``fit`` ran), else the newest finished ``<stage>-*`` directory."""
    root = run_paths.bootstrap_dir(run_dir)
    try:
        named = Path(bootstrap_summary(run_dir)["stages"][stage]["dir"]).name
        if (root / named / run_paths.STAGE_ROWS).exists():
            return root / named
    except (MissingInputError, KeyError, TypeError, ValueError):
        pass
    done = [p.parent for p in root.glob(f"{run_paths.stage_dir_glob(stage)}/{run_paths.STAGE_DONE}")]
    if not done:
        raise MissingInputError(
            f"no finished {stage} stage under {root}: run `python -m prism_lightning fit`"
        )
    return max(done, key=lambda p: p.stat().st_mtime)


def stage_rows(run_dir: str | Path, stage: str) -> list[dict[str, Any]]:
    """The rows of one bootstrap stage (schemas: :mod:`prism_lightning.bootstrap`)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    directory = _stage_dir(Path(run_dir), stage)
    _check_stage(directory, stage)
    return _read_jsonl(directory / run_paths.STAGE_ROWS)


def _check_stage(directory: Path, stage: str) -> None:
    """A damaged stage (truncated or edited rows, a missing tensor file) is a missing input, never plotted:
    the bootstrap recomputes it."""
    from prism_lightning.bootstrap.store import finished_dir_problem

    try:
        meta = json.loads((directory / run_paths.STAGE_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    problem = "meta.json is missing or unreadable" if not isinstance(meta, dict) else None
    problem = problem or finished_dir_problem(directory, meta)
    if problem:
        raise MissingInputError(
            f"the {stage} stage in {directory} is damaged ({problem}): run `python -m prism_lightning "
            "bootstrap` with the run's config, which recomputes it"
        )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a file the pipeline appends to: a line torn by a kill is dropped, never parsed."""
    return files.read_written_jsonl(path)


def bootstrap_split(run_dir: str | Path) -> pd.DataFrame:
    """Distill/retain counts per persona under both verdict rules.

    Columns: ``rule, persona, label (distill|retain), count, active`` (``active``: the run's rule).
    """
    summary = bootstrap_summary(run_dir)
    active = summary.get("verdict_rule")
    records = []
    for rule, per in (summary.get("verdicts", {}).get("split") or {}).items():
        for persona, counts in per.items():
            if persona == "total":
                continue
            for label in ("distill", "retain"):
                records.append(
                    {
                        "rule": rule,
                        "persona": persona,
                        "label": label,
                        "count": int(counts.get(label, 0)),
                        "active": rule == active,
                    }
                )
    return pd.DataFrame.from_records(records, columns=["rule", "persona", "label", "count", "active"])


def _preference(parsed: str | None, persona_is: str) -> str:
    """A parsed verdict as which answer the judge preferred: persona / base / tie / unparsable."""
    if parsed is None:
        return "unparsable"
    if parsed == "TIE":
        return "tie"
    return "persona" if parsed == persona_is else "base"


def verdicts(run_dir: str | Path) -> pd.DataFrame:
    """One row per judged pair, both orders side by side.

    ``pref_persona_first`` / ``pref_base_first``: which answer the free-text verdict preferred in each
    order (persona is A in the first order, B in the second); ``logodds_*``: the persona's log-odds
    (log p(persona letter) - log p(base letter)) in each order; ``consistent``: both free-text verdicts
    parsed and agree; ``logprob_consistent``: both log-odds have the same sign.
    """
    records = []
    for r in stage_rows(run_dir, "verdicts"):
        pf, bf = r.get("order_persona_first") or {}, r.get("order_base_first") or {}
        lp_pf, lp_bf = pf.get("logprobs") or {}, bf.get("logprobs") or {}
        lo_pf = _diff(lp_pf, "A", "B")
        lo_bf = _diff(lp_bf, "B", "A")
        p1, p2 = _preference(pf.get("parsed"), "A"), _preference(bf.get("parsed"), "B")
        records.append(
            {
                "id": r["id"],
                "persona": r["persona"],
                "query": r.get("query", ""),
                "pref_persona_first": p1,
                "pref_base_first": p2,
                "consistent": p1 == p2 and p1 != "unparsable",
                "logodds_persona_first": lo_pf,
                "logodds_base_first": lo_bf,
                "logprob_consistent": bool(
                    np.isfinite(lo_pf) and np.isfinite(lo_bf) and np.sign(lo_pf) == np.sign(lo_bf)
                ),
                "logprob_score": r.get("logprob_score"),
                "strict_label": r.get("strict_label"),
                "logprob_label": r.get("logprob_label"),
                "gate_target": r.get("gate_target"),
            }
        )
    return pd.DataFrame.from_records(records)


def _diff(lp: dict, a: str, b: str) -> float:
    try:
        return float(lp[a]) - float(lp[b])
    except (KeyError, TypeError, ValueError):
        return float("nan")


def verdict_consistency(run_dir: str | Path) -> pd.DataFrame:
    """Counts of (persona-first preference x base-first preference); a consistent judge is diagonal."""
    v = verdicts(run_dir)
    order = ["persona", "base", "tie", "unparsable"]
    table = pd.crosstab(v["pref_persona_first"], v["pref_base_first"]).reindex(
        index=order, columns=order, fill_value=0
    )
    table.index.name, table.columns.name = "persona answer first", "base answer first"
    return table


def lengths(run_dir: str | Path) -> pd.DataFrame:
    """Query and answer lengths, long format: ``id, persona, text (query|base answer|persona answer),
    chars, words, tokens (answers: generated tokens; queries: NaN), truncated``."""
    records = []
    for r in stage_rows(run_dir, "queries"):
        q = r.get("query", "")
        records.append(_len_record(r, "query", q, None, None))
    for r in stage_rows(run_dir, "answers"):
        for kind in ("base", "persona"):
            records.append(
                _len_record(
                    r,
                    f"{kind} answer",
                    r.get(f"{kind}_answer", ""),
                    r.get(f"{kind}_tokens"),
                    r.get(f"{kind}_finish") == "length",
                )
            )
    return pd.DataFrame.from_records(records)


def _len_record(r: dict, kind: str, text: str, tokens: int | None, truncated: bool | None) -> dict:
    return {
        "id": r["id"],
        "persona": r["persona"],
        "text": kind,
        "chars": len(text),
        "words": len(text.split()),
        "tokens": float("nan") if tokens is None else int(tokens),
        "truncated": truncated,
    }


# ------------------------------------------------------------------------------------------------
# training curves


def _tidy_curves(frame: pd.DataFrame, run: str, source: str) -> pd.DataFrame:
    step_col = "trainer/global_step" if "trainer/global_step" in frame else "step"
    skip = {"_step", "_runtime", "_timestamp", "epoch", "step", "trainer/global_step"}
    metrics = [c for c in frame.columns if c not in skip]
    long = frame.melt(id_vars=[c for c in (step_col, "epoch") if c in frame], value_vars=metrics)
    long = long.rename(columns={step_col: "step", "variable": "metric"})
    long["value"] = pd.to_numeric(long["value"], errors="coerce")
    long = long.dropna(subset=["value", "step"])
    if "epoch" not in long:
        long["epoch"] = np.nan
    parts = long["metric"].str.split("/", n=1, expand=True)
    long["split"] = parts[0] if parts.shape[1] > 1 else ""
    name = parts[1] if parts.shape[1] > 1 else parts[0]
    long["when"] = np.where(name.str.endswith("_step"), "step", "epoch")
    long["name"] = name.str.replace(r"_(step|epoch)$", "", regex=True)
    long["run"], long["source"] = run, source
    long["step"] = long["step"].astype(int)
    cols = ["run", "source", "step", "epoch", "split", "name", "when", "metric", "value"]
    return long[cols].sort_values(["run", "metric", "step"]).reset_index(drop=True)


def training_curves(run_dir: str | Path, *, all_runs: bool = False) -> pd.DataFrame:
    """Logged training/validation metrics, long format.

    Columns: ``run, source (wandb|csv), step, epoch, split (train|val), name (loss, gate_loss, kl,
    gate_acc, ...), when (step|epoch), metric (as logged), value``. The W&B offline history is
    preferred (what ``fit`` logs by default); Lightning CSV logs are the fallback. Only the newest run
    is returned unless ``all_runs`` (a run directory accumulates one W&B run per ``fit``).
    """
    run_dir = Path(run_dir)
    frames: list[tuple[float, pd.DataFrame]] = []
    for path in sorted(run_dir.glob("wandb/*run-*/run-*.wandb")):
        try:
            history = wandb_history(path)
        except Exception:  # noqa: BLE001 - undecodable or foreign file: try the next source
            continue
        if history:
            frames.append(
                (path.stat().st_mtime, _tidy_curves(pd.DataFrame(history), path.parent.name, "wandb"))
            )
    if not frames:
        csvs = list(run_dir.glob("**/metrics.csv")) + list(
            run_dir.glob("lightning_logs/version_*/metrics.csv")
        )
        for path in sorted(set(csvs)):
            frame = pd.read_csv(path)
            if len(frame):
                run = str(path.parent.relative_to(run_dir))
                frames.append((path.stat().st_mtime, _tidy_curves(frame, run, "csv")))
    if not frames:
        raise MissingInputError(
            f"no W&B offline run (wandb/offline-run-*) or Lightning metrics.csv under {run_dir}: "
            "run `python -m prism_lightning fit`"
        )
    frames.sort(key=lambda t: t[0])
    chosen = [f for _, f in frames] if all_runs else [frames[-1][1]]
    return pd.concat(chosen, ignore_index=True)


def fit_metrics(checkpoint: str | Path) -> pd.DataFrame:
    """Validation metrics before and after ``fit`` from the exported ``prism.json``.

    Columns: ``when (before_fit|after_fit), metric, value``."""
    meta = _checkpoint_meta(checkpoint)
    metrics = (meta.get("training_config") or {}).get("metrics") or {}
    records = [
        {"when": when, "metric": k, "value": float(v)}
        for when, values in metrics.items()
        if when in ("before_fit", "after_fit")  # the test split's scores: :func:`fit_test_scores`
        for k, v in (values or {}).items()
        if isinstance(v, (int, float))
    ]
    return pd.DataFrame.from_records(records, columns=["when", "metric", "value"])


def fit_test_scores(checkpoint: str | Path) -> dict[str, Any] | None:
    """The exported gate's scores on the test split, from ``prism.json`` (``rows``, ``distill``,
    ``retain``, ``gate_acc`` and ``gate_auroc`` as ``{mean, lo, hi}``); None for a fit without one."""
    meta = _checkpoint_meta(checkpoint)
    return ((meta.get("training_config") or {}).get("metrics") or {}).get("test")


def _checkpoint_meta(checkpoint: str | Path) -> dict[str, Any]:
    how = "`python -m prism_lightning fit` exports checkpoints/<run>"
    return _read_json(Path(checkpoint) / run_paths.PRISM_JSON, how)


def gate_predictions(
    checkpoint: str | Path,
    run_dir: str | Path,
    *,
    device: str = "cpu",
    batch_size: int = 16,
) -> pd.DataFrame:
    """The exported gate's probability on every self-verification query, beside its labels.

    Columns: ``id, persona, query, gate_prob, routed (prob >= the checkpoint's threshold),
    gate_target, strict_label, logprob_label``. Loads the base model + adapter + gate once.
    """
    from prism_lightning.model.export import load_checkpoint

    v = verdicts(run_dir)
    routed = load_checkpoint(checkpoint, device=device)
    probs = routed.gate_probs(v["query"].tolist(), batch_size=batch_size) if len(v) else []
    out = v[["id", "persona", "query", "gate_target", "strict_label", "logprob_label"]].copy()
    out["gate_prob"] = [float(p) for p in probs]
    out["threshold"] = float(routed.threshold)
    out["routed"] = out["gate_prob"] >= routed.threshold
    return out


# ------------------------------------------------------------------------------------------------
# evaluation and study


def _eval_summary(eval_dir: str | Path) -> dict[str, Any]:
    how = f"run `python -m prism_lightning evaluate --out {eval_dir}`"
    return _read_json(run_paths.eval_summary(eval_dir), how)


def _split_score(name: str) -> tuple[str, str]:
    bench, _, category = name.partition("/")
    return bench, category


def eval_scores(eval_dir: str | Path) -> pd.DataFrame:
    """Every sub-score and aggregate per condition with its 95% CI: the rows of ``summary.csv``
    (:func:`prism_lightning.eval.summary.summary_rows`, without the refusal-matcher rows).

    Columns: ``condition, score (e.g. mmlu/stem, mtbench, overall), benchmark, category ('' for
    aggregates), mean, lo, hi, n, n_values, missing, routing_rate, gate_prob_mean, scaled_mean/lo/hi``
    (the Overall scale, :data:`prism_lightning.eval.scoring.OVERALL_SCALE`: MT-Bench x10, others in %)."""
    from prism_lightning.eval.summary import summary_rows

    records = []
    for row in summary_rows(_eval_summary(eval_dir), matcher=False):
        bench, category = _split_score(row["score"])
        rec = {"condition": row["condition"], "score": row["score"], "benchmark": bench, "category": category}
        for k in ("mean", "lo", "hi"):
            rec[k] = _num(row[k])
        rec.update(n=row["n"], n_values=row["n_values"], missing=row["missing"])
        rec.update(routing_rate=_num(row["routing_rate"]), gate_prob_mean=_num(row["gate_prob_mean"]))
        factor = S.overall_factor(row["score"])
        for k in ("mean", "lo", "hi"):
            rec[f"scaled_{k}"] = rec[k] * factor
        records.append(rec)
    return pd.DataFrame.from_records(records)


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return f if math.isfinite(f) else float("nan")


def eval_items(eval_dir: str | Path) -> pd.DataFrame:
    """One row per scored item and condition: ``benchmark, condition, id, group, category, persona,
    route, gate_prob, value`` (mean of the item's values; MT-Bench ratings 1-10, others 0/1)."""
    items = run_paths.items_dir(eval_dir)
    files = run_paths.item_files(eval_dir)
    if not files:
        raise MissingInputError(
            f"no item files under {items}: run `python -m prism_lightning evaluate --out {eval_dir}`"
        )
    records = []
    for path in files:
        bench, cond = run_paths.parse_item_file(path)
        for r in _read_jsonl(path):
            vals = [v for v in r.get("values") or [] if v is not None]
            records.append(
                {
                    "benchmark": bench,
                    "condition": cond,
                    "id": r.get("id"),
                    "group": r.get("group"),
                    "category": str(r.get("group", "")).partition("/")[2],
                    "persona": r.get("persona"),
                    "route": r.get("route"),
                    "gate_prob": _num(r.get("gate_prob")),
                    "value": float(np.mean(vals)) if vals else float("nan"),
                }
            )
    return pd.DataFrame.from_records(records)


def routing_correlation(
    eval_dir: str | Path, *, routing: str = "prism", effect: str = "persona"
) -> pd.DataFrame:
    """Per sub-score category: the share routed to the adapter under ``routing`` (%) and the persona
    effect (``effect`` - base, Overall scale). Pearson/Spearman are in ``frame.attrs``.

    Columns: ``score, benchmark, category, routing_rate_pct, persona_effect``."""
    scores = eval_scores(eval_dir)
    sub = scores[scores["category"] != ""]
    need = {routing, effect, "base"}
    have = set(sub["condition"])
    if not need <= have:
        raise MissingInputError(
            f"{eval_dir} lacks conditions {sorted(need - have)}: run `python -m prism_lightning evaluate "
            f"--checkpoint CKPT --conditions base,{effect},{routing} --out {eval_dir}`"
        )
    wide = sub.pivot_table(
        index=["score", "benchmark", "category"], columns="condition", values="scaled_mean"
    )
    rates = sub[sub["condition"] == routing].set_index("score")["routing_rate"]
    out = wide.reset_index()[["score", "benchmark", "category"]]
    out["routing_rate_pct"] = 100.0 * out["score"].map(rates).astype(float)
    out["persona_effect"] = (wide[effect] - wide["base"]).to_numpy()
    out.attrs.update(S.correlate(out["routing_rate_pct"].tolist(), out["persona_effect"].tolist()))
    return out


def study_grid(study_dir: str | Path) -> pd.DataFrame:
    """The persona-effect grid of ``study``: one row per (persona, length, placement) x category.

    Columns as in ``study.csv`` (``persona, persona_used, length, placement, benchmark, category, n,
    missing, score, score_lo, score_hi, delta, delta_lo, delta_hi``) plus ``label`` (the persona
    actually used: ``persona_used`` for ``matched``) and ``matched`` (it is the category's expert)."""
    study_dir = Path(study_dir)
    csv_path, json_path = run_paths.study_csv(study_dir), run_paths.study_json(study_dir)
    if csv_path.exists():
        frame = pd.read_csv(csv_path, keep_default_na=False, na_values=[""])
    elif json_path.exists():
        frame = pd.DataFrame.from_records(json.loads(json_path.read_text(encoding="utf-8"))["cells"])
    else:
        raise MissingInputError(
            f"no study.csv under {study_dir}: run `python -m prism_lightning study --out {study_dir}`"
        )
    for col in ("score", "score_lo", "score_hi", "delta", "delta_lo", "delta_hi"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    frame["length"] = frame["length"].fillna("").astype(str)
    used = frame["persona_used"].where(frame["persona_used"].notna() & (frame["persona_used"] != ""), None)
    frame["label"] = used.fillna(frame["persona"]).astype(str)
    frame["matched"] = [
        _is_matched(p, b, c)
        for p, b, c in zip(frame["label"], frame["benchmark"], frame["category"], strict=True)
    ]
    frame["task"] = frame["benchmark"] + "/" + frame["category"]
    return frame


def _is_matched(persona: str, benchmark: str, category: str) -> bool:
    from prism_lightning.contexts import ContextLibrary
    from prism_lightning.eval.conditions import matched_persona

    if persona == "none":
        return False
    try:
        return matched_persona(ContextLibrary.builtin(), benchmark, category) == persona
    except (KeyError, ValueError, LookupError):
        return False
