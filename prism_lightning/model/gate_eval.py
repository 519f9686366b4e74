"""The exported gate scored on held-out rows, with bootstrap CIs.

``val/gate_acc`` comes from the rows the gate's early stopping selected on (and, logged per epoch, from
whichever epoch ran last), so it is not an honest score of the gate that is exported. This module scores
the gate as it stands (the one about to be exported) on the test split, rows neither trained nor
selected on: accuracy at the routing threshold and AUROC, each with a 95% bootstrap CI over rows
(resampled within each class, so every resample has both classes and the AUROC is defined)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import numpy as np
import torch

__all__ = ["format_test_scores", "gate_scores", "held_out_gate_probs"]


@torch.no_grad()
def held_out_gate_probs(module, batches: Iterable[dict]) -> tuple[list[float], list[int]]:
    """P(route to an adapter) and the gate target of every row of ``batches``, from ``module``'s current
    gate in eval mode (no dropout): features through layers <= k only, as training computes them."""
    gate = module.gate
    was_training = gate.training
    gate.eval()
    trainer = module._trainer
    plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
    probs: list[float] = []
    targets: list[int] = []
    try:
        for batch in batches:
            ids = batch["input_ids"].to(module.device)
            attn = batch["attention_mask"].to(module.device)
            positions = batch["prompt_lengths"].to(module.device) - 1
            with plugin.forward_context() if plugin is not None else contextlib.nullcontext():
                p = module._gate_route_probs_batch(ids, attn, positions)
            probs += p.float().cpu().tolist()
            targets += [int(t) for t in batch["gate_target"].tolist()]
    finally:
        gate.train(was_training)
    return probs, targets


def _auroc_matrix(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """(n_pos, n_neg): 1 where the positive row scores above the negative, 0.5 on a tie."""
    return (pos[:, None] > neg[None, :]).astype(float) + 0.5 * (pos[:, None] == neg[None, :])


def gate_scores(
    probs: list[float],
    targets: list[int],
    threshold: float,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """``{"rows", "distill", "retain", "gate_acc": {mean, lo, hi}, "gate_auroc": {...} or None}``; accuracy
    in [0, 1] at ``threshold``. The AUROC is None when a class is absent."""
    p = np.asarray(probs, dtype=float)
    y = np.asarray(targets, dtype=int)
    out: dict = {"rows": int(len(y)), "distill": int(y.sum()), "retain": int(len(y) - y.sum())}
    if not len(y):
        out.update(gate_acc=None, gate_auroc=None)
        return out
    correct = ((p >= threshold).astype(int) == y).astype(float)
    rng = np.random.default_rng(seed)
    classes = [np.flatnonzero(y == c) for c in (0, 1) if (y == c).any()]
    draws = [np.concatenate([rng.choice(idx, size=len(idx)) for idx in classes]) for _ in range(n_resamples)]
    alpha = (1.0 - confidence) / 2.0

    def ci(point: float, values: list[float]) -> dict:
        lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
        return {"mean": float(point), "lo": float(lo), "hi": float(hi)}

    out["gate_acc"] = ci(correct.mean(), [correct[d].mean() for d in draws])
    if len(classes) < 2:
        out["gate_auroc"] = None
        return out
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    pairs = _auroc_matrix(p[pos], p[neg])
    # a stratified draw is its negatives then its positives: map them to rows/columns of ``pairs``
    where = np.empty(len(y), dtype=int)
    where[pos], where[neg] = np.arange(len(pos)), np.arange(len(neg))
    aurocs = [pairs[np.ix_(where[d[len(neg) :]], where[d[: len(neg)]])].mean() for d in draws]
    out["gate_auroc"] = ci(pairs.mean(), aurocs)
    return out


def format_test_scores(scores: dict) -> str:
    """The test-split block fit prints after its validation table."""

    def text(ci: dict | None) -> str:
        return "-" if ci is None else f"{ci['mean']:.4f} [{ci['lo']:.4f}, {ci['hi']:.4f}]"

    head = (
        f"\ntest split ({scores['rows']} rows: {scores['distill']} distill / {scores['retain']} retain; "
        "neither trained nor selected on), the exported gate [95% CI]"
    )
    return "\n".join(
        [
            head,
            f"  {'gate_acc':<22}{text(scores['gate_acc'])}",
            f"  {'gate_auroc':<22}{text(scores['gate_auroc'])}",
        ]
    )
