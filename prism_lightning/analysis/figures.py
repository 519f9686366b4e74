"""Seaborn figures of the paper's analyses, each a function of a tidy frame from
:mod:`prism_lightning.analysis.load` that returns a matplotlib ``Figure``.

Figures never call ``plt.show()``: notebooks display them (:func:`show`), ``report`` saves them. Empty
inputs draw an explanatory placeholder rather than raising, so one thin slice (a tiny run, a
``--limit 1`` evaluation) still renders every figure.
"""

from __future__ import annotations

from collections.abc import Callable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from prism_lightning.analysis.load import MissingInputError
from prism_lightning.eval import scoring as S

__all__ = [
    "distill_retain_split",
    "draw",
    "expert_vs_random",
    "gate_confusion_roc",
    "gate_prob_distributions",
    "length_histograms",
    "length_placement",
    "persona_category_heatmap",
    "persona_effect_across_tasks",
    "routing_scatter",
    "show",
    "training_curves",
    "verdict_consistency",
]

sns.set_theme(style="whitegrid", context="notebook")

LENGTH_ORDER = ["min", "short", "long"]
CONDITION_ORDER = ["base", "persona", "random_persona", "lora", "prism"]


def show(fig: Figure) -> None:
    """Display a figure once in a notebook and close it (the inline backend would show it again)."""
    from IPython.display import display

    display(fig)
    plt.close(fig)


def draw(make: Callable[[], Figure]) -> None:
    """Notebook helper: draw and display ``make()``, or print what is missing and which command
    writes it (loaders raise :class:`~prism_lightning.analysis.load.MissingInputError`). Returns
    None so Jupyter does not display the figure a second time."""
    try:
        fig = make()
    except MissingInputError as e:
        print(f"Figure skipped: {e}")
        return
    show(fig)


def _empty(fig: Figure, ax, message: str) -> Figure:
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=11, transform=ax.transAxes)
    return fig


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.2f}"


# ------------------------------------------------------------------------------------------------
# persona effects (study / evaluate)


def _cells(study: pd.DataFrame, length: str, placement: str) -> tuple[pd.DataFrame, str, str]:
    """Persona cells at (length, placement); the study's first such pair when it lacks that one."""
    personas = study[study["persona"] != "none"]
    cells = personas[(personas["length"] == length) & (personas["placement"] == placement)]
    if cells.empty and not personas.empty:
        length, placement = personas.iloc[0][["length", "placement"]]
        cells = personas[(personas["length"] == length) & (personas["placement"] == placement)]
    return cells, str(length), str(placement)


def persona_category_heatmap(
    study: pd.DataFrame, *, length: str = "short", placement: str = "system"
) -> Figure:
    """Fig. 2a: lift of each persona over no persona per category; boxed cells = the matched expert."""
    cells, length, placement = _cells(study, length, placement)
    tasks = list(dict.fromkeys(study["task"]))
    fig, ax = plt.subplots(
        figsize=(max(7.0, 0.6 * len(tasks) + 3), max(4.5, 0.45 * cells["label"].nunique() + 3))
    )
    if cells.empty:
        return _empty(fig, ax, f"no study cells at length={length}, placement={placement}")
    grid = cells.pivot_table(index="label", columns="task", values="delta", aggfunc="mean")
    grid = grid.reindex(columns=[t for t in tasks if t in grid.columns])
    lim = float(np.nanmax(np.abs(grid.to_numpy()))) if np.isfinite(grid.to_numpy()).any() else 1.0
    sns.heatmap(
        grid,
        ax=ax,
        cmap="RdBu_r",
        center=0.0,
        vmin=-(lim or 1.0),
        vmax=lim or 1.0,
        annot=grid.size <= 240,
        fmt=".1f",
        linewidths=0.5,
        cbar_kws={"label": "lift (MT-Bench points; MMLU, safety: %)"},
    )
    matched = cells[cells["matched"]][["label", "task"]].drop_duplicates()
    rows, cols = list(grid.index), list(grid.columns)
    for label, task in matched.itertuples(index=False):
        if label in rows and task in cols:
            ax.add_patch(
                Rectangle((cols.index(task), rows.index(label)), 1, 1, fill=False, lw=2.5, ec="black")
            )
    ax.set(
        xlabel="category",
        ylabel="persona",
        title=f"Persona lift by category ({length}, {placement}); box = matched expert",
    )
    ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    return fig


def persona_effect_across_tasks(
    study: pd.DataFrame, *, length: str = "short", placement: str = "system"
) -> Figure:
    """Each persona's delta on every category (points) and its mean with a 95% CI across categories."""
    cells, length, placement = _cells(study, length, placement)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * cells["label"].nunique() + 3), 4.5))
    if cells.empty:
        return _empty(fig, ax, f"no study cells at length={length}, placement={placement}")
    order = cells.groupby("label")["delta"].mean().sort_values(ascending=False).index.tolist()
    sns.stripplot(
        data=cells, x="label", y="delta", hue="benchmark", order=order, ax=ax, alpha=0.6, dodge=False
    )
    sns.pointplot(
        data=cells, x="label", y="delta", order=order, ax=ax, color="black", errorbar=("ci", 95),
        linestyle="none", markers="D",
    )  # fmt: skip
    ax.axhline(0.0, color="grey", lw=1)
    ax.set(
        xlabel="persona", ylabel="delta vs no persona", title="Persona effect across all tasks (mean, 95% CI)"
    )
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig


def _ci_points(ax, frame: pd.DataFrame, x: str, hue: str, order: list[str], hue_order: list[str]) -> None:
    """Dodged points with explicit [lo, hi] error bars (the CIs come from the pipeline's bootstrap)."""
    width = 0.8 / max(1, len(hue_order))
    palette = sns.color_palette(n_colors=len(hue_order))
    for j, h in enumerate(hue_order):
        sub = frame[frame[hue] == h].set_index(x).reindex(order)
        xs = np.arange(len(order)) - 0.4 + width * (j + 0.5)
        y = sub["scaled_mean"].to_numpy(dtype=float)
        err = np.vstack(
            [y - sub["scaled_lo"].to_numpy(dtype=float), sub["scaled_hi"].to_numpy(dtype=float) - y]
        )
        ax.errorbar(xs, y, yerr=np.nan_to_num(np.abs(err)), fmt="o", color=palette[j], label=h, capsize=3)
    ax.set_xticks(np.arange(len(order)), order, rotation=45, ha="right")


def expert_vs_random(scores: pd.DataFrame) -> Figure:
    """The matched expert persona vs a random persona vs none, per category, with 95% CIs."""
    conds = [c for c in ("base", "persona", "random_persona") if c in set(scores["condition"])]
    sub = scores[scores["condition"].isin(conds) & (scores["category"] != "")]
    benches = list(dict.fromkeys(sub["benchmark"]))
    fig, axes = plt.subplots(1, max(1, len(benches)), figsize=(5 * max(1, len(benches)), 4.5), squeeze=False)
    if sub.empty or "persona" not in conds:
        return _empty(fig, axes[0, 0], "needs the base and persona (and random_persona) conditions")
    for ax, bench in zip(axes[0], benches, strict=False):
        b = sub[sub["benchmark"] == bench]
        _ci_points(ax, b, "category", "condition", list(dict.fromkeys(b["category"])), conds)
        ax.set(title=bench, xlabel="", ylabel=f"score ({S.OVERALL_SCALE_LABEL})")
    axes[0, 0].legend(title="condition")
    fig.suptitle("Expert vs random persona on its own domain (95% CI)")
    fig.tight_layout()
    return fig


def length_placement(study: pd.DataFrame) -> Figure:
    """Fig. 1: persona length x placement side by side; bars = mean delta over categories, 95% CI."""
    cells = study[(study["persona"] != "none") & study["length"].isin(LENGTH_ORDER)]
    benches = list(dict.fromkeys(cells["benchmark"]))
    fig, axes = plt.subplots(
        1, max(1, len(benches)), figsize=(4.5 * max(1, len(benches)), 4), squeeze=False, sharey=False
    )
    if cells.empty:
        return _empty(fig, axes[0, 0], "no persona cells in the study")
    lengths = [x for x in LENGTH_ORDER if x in set(cells["length"])]
    placements = [p for p in ("system", "user") if p in set(cells["placement"])]
    for ax, bench in zip(axes[0], benches, strict=False):
        sns.barplot(
            data=cells[cells["benchmark"] == bench], x="length", y="delta", hue="placement", order=lengths,
            hue_order=placements, errorbar=("ci", 95), ax=ax, capsize=0.1,
        )  # fmt: skip
        ax.axhline(0.0, color="grey", lw=1)
        ax.set(title=bench, xlabel="persona length", ylabel="delta vs no persona")
    fig.suptitle("Persona length and placement (mean over categories, 95% CI)")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------
# routing


def routing_scatter(corr: pd.DataFrame) -> Figure:
    """Fig. 4: share routed to the adapter vs the persona effect, per category, with a fitted line."""
    fig, ax = plt.subplots(figsize=(6.5, 5))
    data = corr.replace([np.inf, -np.inf], np.nan).dropna(subset=["routing_rate_pct", "persona_effect"])
    if data.empty:
        return _empty(fig, ax, "no categories with both a routing rate and a persona effect")
    stats = (
        corr.attrs
        if "pearson" in corr.attrs
        else S.correlate(data["routing_rate_pct"].tolist(), data["persona_effect"].tolist())
    )
    sns.regplot(
        data=data, x="routing_rate_pct", y="persona_effect", ax=ax, ci=95, scatter=False, color="grey"
    )
    sns.scatterplot(data=data, x="routing_rate_pct", y="persona_effect", hue="benchmark", ax=ax, s=60)
    for row in data.itertuples(index=False):
        ax.annotate(
            row.category,
            (row.routing_rate_pct, row.persona_effect),
            fontsize=8,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set(
        xlabel="routed to adapter (%)",
        ylabel="persona effect (persona - base)",
        title=f"Pearson r = {_fmt(stats.get('pearson'))}, Spearman \u03c1 = {_fmt(stats.get('spearman'))} "
        f"(n = {stats.get('n', len(data))})",
    )
    fig.tight_layout()
    return fig


def gate_prob_distributions(
    items: pd.DataFrame, *, condition: str = "prism", threshold: float = 0.5
) -> Figure:
    """Distribution of the gate's probability per benchmark under ``condition``; line = threshold."""
    sub = items[(items["condition"] == condition)].dropna(subset=["gate_prob"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if sub.empty:
        return _empty(fig, ax, f"no gate probabilities recorded under condition {condition!r}")
    sns.violinplot(data=sub, x="benchmark", y="gate_prob", ax=ax, cut=0, inner=None, color="0.85")
    sns.stripplot(data=sub, x="benchmark", y="gate_prob", ax=ax, alpha=0.6, size=4)
    ax.axhline(threshold, color="red", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set(
        ylim=(-0.02, 1.02),
        xlabel="benchmark",
        ylabel="gate probability",
        title=f"Gate probabilities ({condition})",
    )
    ax.legend(loc="upper right")
    fig.tight_layout()
    return fig


def _roc(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC points and AUC (ties handled by thresholding at each distinct score)."""
    pos, neg = labels.sum(), (1 - labels).sum()
    thresholds = np.r_[np.inf, np.unique(scores)[::-1]]
    tpr = np.array([((scores >= t) & (labels == 1)).sum() / pos if pos else np.nan for t in thresholds])
    fpr = np.array([((scores >= t) & (labels == 0)).sum() / neg if neg else np.nan for t in thresholds])
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) if pos and neg else float("nan")
    return fpr, tpr, auc


def gate_confusion_roc(gates: pd.DataFrame, *, label: str = "gate_target") -> Figure:
    """The exported gate vs the self-verification labels: confusion matrix and ROC curve."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    data = gates.dropna(subset=["gate_prob", label])
    if data.empty:
        _empty(fig, ax2, "")
        return _empty(fig, ax1, "no verdict rows to score")
    y = data[label].astype(int).to_numpy()
    routed = data["routed"].astype(bool).to_numpy()
    cm = pd.DataFrame(
        [[int(((y == t) & (routed == p)).sum()) for p in (False, True)] for t in (0, 1)],
        index=["retain (0)", "distill (1)"],
        columns=["base", "adapter"],
    )
    sns.heatmap(cm, annot=True, fmt="d", cmap="Blues", cbar=False, ax=ax1)
    acc = float((y == routed).mean())
    ax1.set(xlabel="gate decision", ylabel=f"label ({label})", title=f"Confusion matrix (accuracy {acc:.2f})")
    fpr, tpr, auc = _roc(y, data["gate_prob"].to_numpy(dtype=float))
    ax2.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
    if np.isfinite(auc):
        ax2.plot(fpr, tpr, marker="o", ms=3)
    ax2.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate", ylabel="true positive rate",
            title=f"ROC (AUC {_fmt(auc)}, n = {len(data)})")  # fmt: skip
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------
# bootstrap and training


def distill_retain_split(split: pd.DataFrame) -> Figure:
    """Distill/retain rows per persona under both verdict rules (the active rule is marked)."""
    rules = list(dict.fromkeys(split["rule"]))
    fig, axes = plt.subplots(
        1, max(1, len(rules)), figsize=(6 * max(1, len(rules)), 4.5), squeeze=False, sharey=True
    )
    if split.empty:
        return _empty(fig, axes[0, 0], "no verdict split in the bootstrap summary")
    personas = list(dict.fromkeys(split["persona"]))
    colors = {"distill": sns.color_palette()[0], "retain": sns.color_palette()[1]}
    for ax, rule in zip(axes[0], rules, strict=False):
        wide = split[split["rule"] == rule].pivot_table(
            index="persona", columns="label", values="count", aggfunc="sum"
        )
        wide = wide.reindex(index=personas, columns=["distill", "retain"], fill_value=0).fillna(0)
        wide.plot.bar(stacked=True, ax=ax, color=[colors["distill"], colors["retain"]], width=0.8)
        ax.set_ylim(0, max(1.0, float(wide.sum(axis=1).max())) * 1.3)  # room for the legend
        ax.legend(title="label", loc="upper right", ncols=2)
        active = bool(split[split["rule"] == rule]["active"].any())
        total = wide.sum()
        counts = f"{int(total['distill'])} distill / {int(total['retain'])} retain"
        ax.set(
            title=f"{rule}{' (active)' if active else ''}: {counts}",
            xlabel="persona",
            ylabel="queries",
        )
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    return fig


def verdict_consistency(table: pd.DataFrame, verdicts: pd.DataFrame | None = None) -> Figure:
    """Free-text verdicts in both answer orders (a position-unbiased judge fills the diagonal), and the
    persona's log-odds in one order against the other (agreement = same sign)."""
    ncols = 2 if verdicts is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4.5), squeeze=False)
    sns.heatmap(table, annot=True, fmt="d", cmap="Greens", cbar=False, ax=axes[0, 0])
    agree = int(np.trace(table.to_numpy()[:3, :3]))
    axes[0, 0].set_title(f"Preferred answer by order ({agree}/{int(table.to_numpy().sum())} consistent)")
    if verdicts is not None:
        ax = axes[0, 1]
        if verdicts.empty:
            _empty(fig, ax, "no verdict rows")
        else:
            sns.scatterplot(
                data=verdicts, x="logodds_persona_first", y="logodds_base_first", hue="gate_target", ax=ax
            )
            ax.axhline(0, color="grey", lw=1)
            ax.axvline(0, color="grey", lw=1)
            share = float(verdicts["logprob_consistent"].mean())
            ax.set(
                xlabel="persona log-odds, persona answer first",
                ylabel="persona log-odds, base answer first",
                title=f"Log-prob verdicts ({share:.0%} same sign)",
            )
    fig.tight_layout()
    return fig


def length_histograms(lengths: pd.DataFrame, *, unit: str = "chars") -> Figure:
    """Lengths of the self-generated queries and of both answers (``unit``: chars, words or tokens)."""
    kinds = list(dict.fromkeys(lengths["text"]))
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(4.5 * max(1, len(kinds)), 3.8), squeeze=False)
    if lengths.empty:
        return _empty(fig, axes[0, 0], "no bootstrap rows")
    for ax, kind in zip(axes[0], kinds, strict=False):
        sub = lengths[lengths["text"] == kind]
        col = unit if sub[unit].notna().any() else "chars"
        sns.histplot(data=sub, x=col, ax=ax, bins=min(30, max(5, len(sub) // 2)))
        extra = ""
        if sub["truncated"].notna().any():
            extra = f", {int(sub['truncated'].fillna(False).astype(bool).sum())} hit max tokens"
        ax.set(title=f"{kind}\n(n={len(sub)}, median {sub[col].median():.0f}{extra})", xlabel=col)
    fig.tight_layout()
    return fig


def training_curves(
    curves: pd.DataFrame,
    *,
    names: tuple[str, ...] = ("loss", "gate_loss", "kl", "gate_acc", "gate_auroc", "routing_rate"),
) -> Figure:
    """Training (per step and per epoch) and validation curves of the logged metrics against the step."""
    present = [n for n in names if n in set(curves["name"])]
    ncols = 3
    nrows = max(1, -(-len(present) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    if not present:
        return _empty(fig, axes[0, 0], "no training metrics logged")
    for ax, name in zip(axes.flat, present, strict=False):
        sub = curves[curves["name"] == name].copy()
        sub["series"] = sub["split"] + np.where(sub["when"] == "step", " (step)", "")
        sns.lineplot(
            data=sub, x="step", y="value", hue="series", style="series", markers=True, dashes=False, ax=ax
        )
        ax.set(title=name, xlabel="global step", ylabel="")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    source = ", ".join(sorted(set(curves["source"]))) if "source" in curves else ""
    fig.suptitle(f"Training curves ({source}: {', '.join(sorted(set(curves['run'])))})", fontsize=10)
    fig.tight_layout()
    return fig
