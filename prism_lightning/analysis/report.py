"""``python -m prism_lightning report RUN_DIR``: the notebooks' figures as PNGs plus ``report.md``.

For users outside Jupyter. Each figure whose inputs are missing is skipped with a line naming the
command that produces them, so a report right after ``fit`` (no evaluation yet) still works.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt

from prism_lightning import run_paths
from prism_lightning.analysis import figures as F
from prism_lightning.analysis import load as L
from prism_lightning.errors import ConfigError
from prism_lightning.files import check_output_dir
from prism_lightning.settings_args import (
    HelpFormatter,
    add_dataclass_arguments,
    flag,
    settings_from_namespace,
)

__all__ = [
    "FigureSpec",
    "ReportSettings",
    "default_checkpoint",
    "report_command",
    "report_main",
    "write_report",
]

log = logging.getLogger(__name__)

#: "this input is not there (yet)": reported as a skipped figure; anything else is a bug and raises
MISSING = (L.MissingInputError,)


@dataclass(frozen=True)
class FigureSpec:
    """One figure of the report: file stem, section, how to read it, how to draw it."""

    name: str
    section: str
    title: str
    how_to_read: str
    needs: str  # "run" | "eval" | "study" | "checkpoint"
    draw: Callable[[dict[str, Path | None]], plt.Figure]


def _gate_figure(p: dict[str, Path | None]) -> plt.Figure:
    return F.gate_confusion_roc(
        L.gate_predictions(p["checkpoint"], p["run"], device=str(p.get("device") or "cpu"))
    )


SPECS: tuple[FigureSpec, ...] = (
    FigureSpec(
        "fig2a_persona_category_heatmap", "Persona effects", "Persona x category lift (Fig. 2a)",
        "Red = the persona helps that category over no persona, blue = it hurts; boxed cells are the "
        "category's matched expert.",
        "study", lambda p: F.persona_category_heatmap(L.study_grid(p["study"])),
    ),
    FigureSpec(
        "persona_effect_across_tasks", "Persona effects", "Each persona across all tasks",
        "Dots are categories, diamonds the mean with a 95% CI: a persona whose CI sits above 0 "
        "helps overall.",
        "study", lambda p: F.persona_effect_across_tasks(L.study_grid(p["study"])),
    ),
    FigureSpec(
        "expert_vs_random", "Persona effects", "Expert vs random persona",
        "Per category, the matched expert (persona) against a random persona and none (base), 95% CIs: "
        "expertise matters where persona beats random_persona.",
        "eval", lambda p: F.expert_vs_random(L.eval_scores(p["eval"])),
    ),
    FigureSpec(
        "fig1_length_placement", "Persona effects", "Persona length and placement (Fig. 1)",
        "Mean lift over categories for min/short/long personas in the system vs the user turn, 95% CIs.",
        "study", lambda p: F.length_placement(L.study_grid(p["study"])),
    ),
    FigureSpec(
        "fig4_routing_vs_persona_effect", "Routing", "Routing rate vs persona effect (Fig. 4)",
        "Each point is a category: a positive slope means the gate routes more where personas help.",
        "eval", lambda p: F.routing_scatter(L.routing_correlation(p["eval"])),
    ),
    FigureSpec(
        "gate_prob_distributions", "Routing", "Gate probabilities per benchmark",
        "Mass above the dashed threshold is routed to the adapter under the prism condition.",
        "eval", lambda p: F.gate_prob_distributions(L.eval_items(p["eval"])),
    ),
    FigureSpec(
        "gate_vs_self_verification", "Routing", "Gate decisions vs self-verification labels",
        "Left: the exported gate's decisions against the bootstrap's distill/retain labels; right: its ROC "
        "(0.5 AUC = chance).",
        "checkpoint", _gate_figure,
    ),
    FigureSpec(
        "distill_retain_split", "Bootstrap and training", "Distill/retain split per persona",
        "How many self-generated queries each verdict rule sends to distillation; training needs "
        "both labels.",
        "run", lambda p: F.distill_retain_split(L.bootstrap_split(p["run"])),
    ),
    FigureSpec(
        "verdict_consistency", "Bootstrap and training", "Verdict consistency across the two orders",
        "A position-unbiased judge puts its counts on the diagonal (left) and its log-odds in the "
        "same-sign quadrants (right).",
        "run", lambda p: F.verdict_consistency(L.verdict_consistency(p["run"]), L.verdicts(p["run"])),
    ),
    FigureSpec(
        "lengths", "Bootstrap and training", "Query and answer lengths",
        "Length distributions of the generated queries and both answers; many answers at max tokens "
        "means answer_max_new_tokens truncates them.",
        "run", lambda p: F.length_histograms(L.lengths(p["run"])),
    ),
    FigureSpec(
        "training_curves", "Bootstrap and training", "Training curves",
        "Gate loss/accuracy and the distillation KL per step (train) and per validation run (val).",
        "run", lambda p: F.training_curves(L.training_curves(p["run"])),
    ),
)  # fmt: skip

PRODUCERS = {
    "run": "python -m prism_lightning fit",
    "eval": "python -m prism_lightning evaluate --checkpoint CKPT --out RUN_DIR/eval",
    "study": "python -m prism_lightning study --out RUN_DIR/study",
    "checkpoint": "python -m prism_lightning fit (exports checkpoints/<run>)",
}


def default_checkpoint(run_dir: Path) -> Path | None:
    """``fit`` exports ``checkpoints/<run name>`` beside ``runs/``; look there, then under the run."""
    for cand in (
        run_dir.parent.parent / run_paths.default_export_dir(run_dir),
        run_paths.default_export_dir(run_dir),
        run_dir / run_paths.CHECKPOINT_DIR,
    ):
        if (cand / run_paths.PRISM_JSON).exists():
            return cand
    return None


def _fit_table(checkpoint: Path | None) -> list[str]:
    if checkpoint is None:
        return []
    try:
        m = L.fit_metrics(checkpoint)
    except MISSING:
        return []
    if m.empty:
        return []
    wide = m.pivot_table(index="metric", columns="when", values="value")
    cols = [c for c in ("before_fit", "after_fit") if c in wide.columns]
    lines = ["| metric | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for metric, row in wide.iterrows():
        lines.append(f"| {metric} | " + " | ".join(f"{row[c]:.4f}" for c in cols) + " |")
    test = L.fit_test_scores(checkpoint)
    if test and test.get("gate_acc"):
        ci = {k: test.get(k) for k in ("gate_acc", "gate_auroc")}
        text = ", ".join(
            f"{k} {v['mean']:.4f} [{v['lo']:.4f}, {v['hi']:.4f}]" for k, v in ci.items() if v is not None
        )
        rows = test["rows"]
        lines += ["", f"The exported gate on the test split ({rows} rows, neither trained nor selected on), "
                  f"95% bootstrap CI: {text}."]  # fmt: skip
    return ["## Validation metrics before and after fit", "", *lines, ""]


def _bootstrap_lines(run_dir: Path) -> list[str]:
    try:
        s = L.bootstrap_summary(run_dir)
    except MISSING:
        return []
    q, v = s.get("queries", {}), s.get("verdicts", {})
    rule = s.get("verdict_rule")
    total = (v.get("split") or {}).get(rule, {}).get("total", {})
    lines = [
        "## Bootstrap",
        "",
        f"- queries kept {q.get('kept')} of {q.get('generated')} generated",
        f"- verdict rule `{rule}`: {total.get('distill', 0)} distill / {total.get('retain', 0)} retain",
        f"- unparsable free-text verdicts: {v.get('unparsable')}",
    ]
    lines += [f"- warning: {w}" for w in s.get("warnings", [])]
    return [*lines, ""]


def write_report(
    run_dir: str | Path,
    out: str | Path,
    *,
    eval_dir: str | Path | None = None,
    study_dir: str | Path | None = None,
    checkpoint: str | Path | None = None,
    device: str = "cpu",
    dpi: int = 110,
) -> dict[str, list[str]]:
    """Write every drawable figure to ``out/<name>.png`` and ``out/report.md``.

    Returns ``{"written": [png names], "skipped": [reasons]}``."""
    run_dir, out = Path(run_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path | None] = {
        "run": run_dir,
        "eval": Path(eval_dir) if eval_dir else None,
        "study": Path(study_dir) if study_dir else None,
        "checkpoint": Path(checkpoint) if checkpoint else None,
        "device": device,  # type: ignore[dict-item]
    }
    written: list[str] = []
    skipped: list[str] = []
    body: list[str] = []
    section = None
    for spec in SPECS:
        if spec.section != section:
            section = spec.section
            body += [f"## {section}", ""]
        if paths[spec.needs] is None:
            how = PRODUCERS[spec.needs].replace("RUN_DIR", str(run_dir))
            reason = f"{spec.title}: skipped, no {spec.needs} input (produce it with `{how}`)"
            skipped.append(reason)
            body += [f"- {reason}", ""]
            continue
        try:
            fig = spec.draw(paths)
        except MISSING as e:
            reason = f"{spec.title}: skipped ({e})"
            skipped.append(reason)
            body += [f"- {reason}", ""]
            continue
        png = run_paths.figure_file(out, spec.name).name
        fig.savefig(out / png, dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        written.append(png)
        body += [f"### {spec.title}", "", f"![{spec.title}]({png})", "", spec.how_to_read, ""]
    header = [
        f"# PRISM report: `{run_dir}`",
        "",
        f"- run: `{run_dir}`",
        f"- evaluation: `{eval_dir or '-'}`",
        f"- study: `{study_dir or '-'}`",
        f"- checkpoint: `{checkpoint or '-'}`",
        "",
    ]
    md = header + _bootstrap_lines(run_dir) + _fit_table(paths["checkpoint"]) + body
    run_paths.report_md(out).write_text("\n".join(md), encoding="utf-8")
    return {"written": written, "skipped": skipped}


@dataclass(kw_only=True)
class ReportSettings:
    """``report``'s options, declared once: the command line is generated from these fields."""

    run_dir: Path = flag(positional=True)
    """the fit run directory (runs/<name>)"""
    eval_dir: Path | None = flag(None, name="eval")
    """evaluate --out DIR (default: RUN_DIR/eval if present)"""
    study_dir: Path | None = flag(None, name="study")
    """study --out DIR (default: RUN_DIR/study if present)"""
    checkpoint: Path | None = flag(None)
    """exported checkpoint (default: checkpoints/<run name>)"""
    out: Path | None = flag(None)
    """output directory (default: RUN_DIR/report)"""
    device: str = flag("cpu")
    """device for the gate probabilities (default cpu)"""


def report_main(argv: list[str] | None = None) -> int:
    """CLI entry point (``python -m prism_lightning report``): its flags are :class:`ReportSettings`'s."""
    ap = argparse.ArgumentParser(
        prog="python -m prism_lightning report", description=__doc__, formatter_class=HelpFormatter
    )
    add_dataclass_arguments(ap, ReportSettings)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report_command(settings_from_namespace(ReportSettings, args))
    return 0


def report_command(settings: ReportSettings) -> dict:
    """Check the directories, then write the figures and report.md (see :func:`write_report`, whose
    result it returns) and print what was written and skipped."""
    plt.switch_backend("Agg")  # files only: never open a window (the notebooks keep their own backend)
    run_dir = Path(settings.run_dir)
    if not run_dir.is_dir():
        what = "is a file" if run_dir.exists() else "does not exist"
        raise ConfigError(f"{run_dir} {what}; give a fit run directory such as runs/default.")
    for flag_name, given in (
        ("--eval", settings.eval_dir),
        ("--study", settings.study_dir),
        ("--checkpoint", settings.checkpoint),
    ):
        if given is not None and not Path(given).is_dir():  # given by name: not found is an error, not a skip
            what = "is a file" if Path(given).exists() else "does not exist"
            raise ConfigError(f"{flag_name} {given} {what}; give a directory.")
    if settings.out is not None:
        check_output_dir(settings.out, "--out")
    default_eval, default_study = run_dir / run_paths.EVAL_DIR, run_dir / run_paths.STUDY_DIR
    eval_dir = settings.eval_dir or (default_eval if run_paths.eval_summary(default_eval).exists() else None)
    study_dir = settings.study_dir or (default_study if run_paths.study_csv(default_study).exists() else None)
    checkpoint = settings.checkpoint or default_checkpoint(run_dir)
    out = Path(settings.out) if settings.out is not None else run_dir / run_paths.REPORT_DIR
    result = write_report(
        run_dir, out, eval_dir=eval_dir, study_dir=study_dir, checkpoint=checkpoint, device=settings.device
    )
    for name in result["written"]:
        print(f"wrote {out / name}")
    for reason in result["skipped"]:
        print(f"skipped {reason}")
    counts = f"{len(result['written'])} figures, {len(result['skipped'])} skipped"
    print(f"wrote {run_paths.report_md(out)} ({counts})")
    return result
