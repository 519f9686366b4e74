"""Can the gate's input tell the intents apart? Linear probes on the candidate gate inputs.

PRISM's gate reads the hidden state after decoder layer k at the last prompt token. Whether a gate can learn
anything depends on two things: the labels and the input. This module measures the input on its own: for
each layer k in a list and each pooling (the last prompt token, as the gate reads it, or the mean over the
prompt), it fits a logistic-regression probe with stratified k-fold cross-validation and reports the
held-out AUROC. A user picks ``gate_layer`` from these numbers before training; and when a probe separates
two prompt sets almost perfectly while a trained gate does not, the labels are the problem, not the router.

Prompts are formatted exactly as routed inference sees them (the no-persona chat prompt with the generation
prompt, left-padded with the same positions as the generation engine), and the forward stops after the
highest layer asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from prism_lightning.errors import ConfigError, PrismError, require
from prism_lightning.settings_args import (
    HelpFormatter,
    add_dataclass_arguments,
    flag,
    nested,
    settings_from_namespace,
)

POOLINGS = ("last", "mean")
BENCHMARK_SOURCES = ("mmlu", "mtbench", "jailbreakbench", "harmbench", "advbench")


@dataclass
class ProbeScore:
    """Held-out quality of one linear probe (mean and spread over the cross-validation folds)."""

    layer: int
    pooling: str
    auroc: float
    auroc_std: float
    accuracy: float
    n: int
    positives: int


class _StopAfterLayer(Exception):
    pass


@torch.no_grad()
def prompt_features(
    backbone,
    queries: Sequence[str],
    layers: Sequence[int],
    *,
    batch_size: int = 16,
) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, pooling): FloatTensor (N, hidden)}: the hidden state after each decoder layer in ``layers``,
    at the last prompt token and averaged over the prompt's tokens, for every query's no-persona prompt."""
    from prism_lightning.model.routing import decoder_layers, inner_model

    model, tokenizer, formatter = backbone.model, backbone.tokenizer, backbone.formatter
    blocks = decoder_layers(model)
    require(
        all(0 <= k < len(blocks) for k in layers),
        f"layers must lie in 0..{len(blocks) - 1} ({len(blocks)} decoder layers); got {list(layers)}",
    )
    device = next(model.parameters()).device
    last_layer = max(layers)
    captured: dict[int, torch.Tensor] = {}

    def keep(k: int):
        def hook(_module, _args, output):
            captured[k] = (output[0] if isinstance(output, tuple) else output).float()
            if k == last_layer:
                raise _StopAfterLayer

        return hook

    handles = [blocks[k].register_forward_hook(keep(k)) for k in sorted(set(layers))]
    out: dict[tuple[int, str], list[torch.Tensor]] = {(k, p): [] for k in layers for p in POOLINGS}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        for start in range(0, len(queries), batch_size):
            ids = [
                tokenizer(formatter.prompt(q), add_special_tokens=False)["input_ids"]
                for q in queries[start : start + batch_size]
            ]
            width = max(len(row) for row in ids)
            input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in ids], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids], device=device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as the generation engine's left-padded prefill
            captured.clear()
            with contextlib.suppress(_StopAfterLayer):  # the layers above the last one asked for never run
                inner_model(model)(
                    input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False
                )
            weights = mask.unsqueeze(-1).float()
            for k in layers:
                hidden = captured[k]
                out[(k, "last")].append(hidden[:, -1].cpu())
                out[(k, "mean")].append(((hidden * weights).sum(1) / weights.sum(1)).cpu())
    finally:
        for handle in handles:
            handle.remove()
    return {key: torch.cat(parts) for key, parts in out.items()}


def stratified_folds(labels: torch.Tensor, folds: int, seed: int = 0) -> list[torch.Tensor]:
    """``folds`` disjoint index sets covering every row, each with the classes in the same proportion."""
    gen = torch.Generator().manual_seed(seed)
    buckets: list[list[int]] = [[] for _ in range(folds)]
    for cls in (0, 1):
        rows = torch.nonzero(labels == cls).flatten()
        rows = rows[torch.randperm(len(rows), generator=gen)]
        for i, row in enumerate(rows.tolist()):
            buckets[i % folds].append(row)
    return [torch.tensor(sorted(b), dtype=torch.long) for b in buckets]


def fit_logistic_probe(x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-2, steps: int = 200) -> tuple:
    """A class-balanced, L2-regularised logistic regression on standardised features (LBFGS): the
    (mean, std, weight, bias) that :func:`probe_scores` applies."""
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    z, y = z.double(), y.double()
    pos = y.sum().clamp(min=1)
    neg = (len(y) - y.sum()).clamp(min=1)
    weight = torch.where(y > 0, len(y) / (2 * pos), len(y) / (2 * neg))  # balanced classes
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = z @ w + b
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, y, weight=weight)) + l2 * (
            w @ w
        ) / 2
        loss.backward()
        return loss

    opt.step(closure)
    return mean, std, w.detach(), b.detach()


def probe_scores(x: torch.Tensor, probe: tuple) -> torch.Tensor:
    mean, std, w, b = probe
    return torch.sigmoid(((x - mean) / std).double() @ w + b)


def cross_validate(
    x: torch.Tensor, y: torch.Tensor, *, folds: int = 5, seed: int = 0, l2: float = 1e-2
) -> tuple[float, float, float]:
    """(mean AUROC, its std over folds, accuracy at 0.5) of a probe scored only on rows it never saw."""
    from torchmetrics.functional.classification import binary_auroc

    aurocs, correct = [], 0
    for held_out in stratified_folds(y, folds, seed):
        train = torch.ones(len(y), dtype=torch.bool)
        train[held_out] = False
        probe = fit_logistic_probe(x[train], y[train], l2=l2)
        scores = probe_scores(x[held_out], probe)
        aurocs.append(float(binary_auroc(scores.float(), y[held_out].long())))
        correct += int(((scores >= 0.5).long() == y[held_out].long()).sum())
    t = torch.tensor(aurocs)
    return float(t.mean()), float(t.std()) if len(aurocs) > 1 else 0.0, correct / len(y)


def run_probes(
    features: dict[tuple[int, str], torch.Tensor], labels: torch.Tensor, *, folds: int = 5, seed: int = 0
) -> list[ProbeScore]:
    scores = []
    for (layer, pooling), x in sorted(features.items()):
        auroc, spread, accuracy = cross_validate(x, labels, folds=folds, seed=seed)
        scores.append(
            ProbeScore(layer, pooling, auroc, spread, accuracy, n=len(labels), positives=int(labels.sum()))
        )
    return scores


def format_scores(scores: Sequence[ProbeScore], title: str) -> str:
    lines = [title, "| layer | pooling | AUROC (mean ± sd over folds) | accuracy |", "|---|---|---|---|"]
    for s in scores:
        gate = " (the gate's input)" if s.pooling == "last" else ""
        lines.append(
            f"| {s.layer} | {s.pooling}{gate} | {s.auroc:.3f} ± {s.auroc_std:.3f} | {s.accuracy:.3f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Where the labelled prompts come from


def benchmark_prompts(name: str, limit: int | None) -> list[str]:
    """First-turn prompts of a benchmark the project ships (``benchmark:NAME``)."""
    from prism_lightning.eval import benchmarks

    if name == "mmlu":
        rows = benchmarks.load_mmlu(limit=None)
        # spread over subjects: the file is sorted by subject, its head is one topic
        step = max(1, len(rows) // (limit or len(rows)))
        picked = rows[::step][:limit] if limit else rows
        return [
            f"{r['question']}\n" + "\n".join(f"{'ABCD'[i]}. {c}" for i, c in enumerate(r["choices"]))
            for r in picked
        ]
    if name == "mtbench":
        return [r["turns"][0] for r in benchmarks.load_mtbench(limit=limit)]
    return [r["prompt"] for r in benchmarks.SAFETY_LOADERS[name](None, limit=limit)]


def read_prompts(source: str, limit: int | None) -> list[str]:
    """``benchmark:NAME`` or a JSONL file whose rows carry ``query`` (the predict file's format)."""
    from prism_lightning.files import read_input_jsonl

    if source.startswith("benchmark:"):
        name = source.split(":", 1)[1]
        require(name in BENCHMARK_SOURCES, f"unknown benchmark {name!r} in {source!r}; choose from "
                + ", ".join(f"benchmark:{b}" for b in BENCHMARK_SOURCES))  # fmt: skip
        return benchmark_prompts(name, limit)
    rows = read_input_jsonl(source, what="prompt file")
    bad = next((i for i, r in enumerate(rows, 1) if not isinstance(r.get("query"), str)), None)
    require(bad is None, f"{source}: row {bad} has no string `query`")
    return [r["query"] for r in rows][:limit]


def read_labelled(path: str, label_key: str) -> tuple[list[str], list[int]]:
    """Queries and 0/1 labels of a JSONL file, e.g. a bootstrap's verdict rows (``gate_target``)."""
    from prism_lightning.files import read_input_jsonl

    queries, labels = [], []
    for number, row in enumerate(read_input_jsonl(path, what="labelled file"), 1):
        label = row.get(label_key)
        if not isinstance(row.get("query"), str) or label not in (0, 1, True, False):
            raise ConfigError(f"{path}: row {number} needs a string `query` and `{label_key}` 0 or 1")
        queries.append(row["query"])
        labels.append(int(label))
    return queries, labels


def verdicts_of_run(run_dir: Path) -> Path:
    """The finished verdict rows of a bootstrap run directory (the newest, when settings changed)."""
    require(run_dir.is_dir(), f"--run_dir {run_dir} is not a directory")
    from prism_lightning import run_paths

    stages = run_paths.bootstrap_dir(run_dir).glob(run_paths.stage_dir_glob("verdicts"))
    done = [
        d for d in stages if (d / run_paths.STAGE_DONE).is_file() and (d / run_paths.STAGE_ROWS).is_file()
    ]
    found = sorted((d / run_paths.STAGE_ROWS for d in done), key=lambda p: p.stat().st_mtime)
    require(bool(found), f"{run_dir} holds no finished verdicts stage; run `bootstrap` first")
    return found[-1]


@dataclass(kw_only=True)
class ProbeLabels:
    """Where the labelled prompts come from: exactly one of these."""

    run_dir: Path | None = flag(None)
    """a bootstrap run directory: its verdicts (gate_target)"""
    labelled: str | None = flag(None)
    """a JSONL file of {query, <label_key>: 0|1} rows"""
    positive: list[str] | None = flag(None, many=True)
    """class-1 prompts: benchmark:NAME or JSONL files of {query}"""
    negative: list[str] | None = flag(None, many=True)
    """class-0 prompts, as --positive"""


@dataclass(kw_only=True)
class ProbeGateSettings:
    """``probe-gate``'s options, declared once: the command line is generated from these fields."""

    labels: ProbeLabels = nested(ProbeLabels, ("labelled prompts (one of)", None))
    label_key: str = flag("gate_target")
    """the label field of --labelled (default gate_target)"""
    model: str | None = flag(None)
    """model id, local directory or embedded name (default: embedded)"""
    layers: str = flag("0,1,2,4")
    """comma list of decoder layers k (default 0,1,2,4)"""
    pooling: str = flag("last,mean")
    """comma list of last, mean (default both)"""
    folds: int = flag(5)
    """cross-validation folds (default 5)"""
    limit: int = flag(100)
    """prompts per --positive/--negative source (default 100)"""
    batch_size: int = flag(16)
    """prompts per forward"""
    seed: int = flag(0)
    """seed of the folds' split and the probes"""
    dtype: str = flag("float32")
    """float32 (default), bfloat16 or auto"""
    out: Path | None = flag(None)
    """write the scores as JSON here"""


def probe_gate_main(argv: list[str] | None = None) -> int:
    """``probe-gate`` from the command line: its flags are :class:`ProbeGateSettings`'s fields."""
    ap = argparse.ArgumentParser(
        prog="python -m prism_lightning probe-gate", description=__doc__, formatter_class=HelpFormatter
    )
    add_dataclass_arguments(ap, ProbeGateSettings)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    probe_gate_command(settings_from_namespace(ProbeGateSettings, args))
    return 0


def probe_gate_command(settings: ProbeGateSettings) -> list[ProbeScore]:
    """Check every input, read the labelled prompts, fit the probes and print (and with ``out``, write)
    their scores, which it returns. Every input is checked before the model loads."""
    labels, folds = settings.labels, settings.folds
    modes = sum(x is not None for x in (labels.run_dir, labels.labelled)) + (labels.positive is not None)
    require(modes == 1, "give exactly one of --run_dir, --labelled, or --positive with --negative")
    require((labels.positive is None) == (labels.negative is None), "--positive and --negative go together")
    require(folds >= 2, f"--folds must be >= 2, got {folds}")
    require(settings.limit >= 1, f"--limit must be >= 1, got {settings.limit}")
    require(settings.batch_size >= 1, f"--batch_size must be >= 1, got {settings.batch_size}")
    try:
        layers = sorted({int(k) for k in settings.layers.split(",") if k.strip()})
    except ValueError:
        raise ConfigError(f"--layers must be a comma list of integers, got {settings.layers!r}") from None
    require(
        bool(layers) and min(layers) >= 0, f"--layers must be non-negative integers, got {settings.layers!r}"
    )
    poolings = [p.strip() for p in settings.pooling.split(",") if p.strip()]
    require(bool(poolings) and set(poolings) <= set(POOLINGS), f"--pooling takes {', '.join(POOLINGS)}")
    if settings.out is not None:
        require(not settings.out.is_dir(), f"--out {settings.out} is a directory; give a file name")

    # every input is read before the model loads
    if labels.positive is not None:
        pos = [q for src in labels.positive for q in read_prompts(src, settings.limit)]
        neg = [q for src in labels.negative for q in read_prompts(src, settings.limit)]
        queries, y = pos + neg, [1] * len(pos) + [0] * len(neg)
        what = f"{' + '.join(labels.positive)} (1) vs {' + '.join(labels.negative)} (0)"
    else:
        path = str(verdicts_of_run(labels.run_dir)) if labels.run_dir is not None else labels.labelled
        queries, y = read_labelled(path, settings.label_key)
        what = f"{path} ({settings.label_key})"
    ones = sum(y)
    require(
        min(ones, len(y) - ones) >= folds,
        f"each class needs at least --folds={folds} prompts; got {ones} of 1 and {len(y) - ones} of 0",
    )

    from prism_lightning.backbone import (
        DEFAULT_MODEL,
        default_device,
        inference_dtype,
        load_backbone,
        load_model_config,
    )

    model = settings.model or DEFAULT_MODEL
    depth = load_model_config(model)[1].num_hidden_layers  # the config only: checked before the weights load
    require(max(layers) < depth, f"--layers goes up to {max(layers)} but {model} has {depth} decoder layers")
    device = default_device()
    backbone = load_backbone(model, dtype=inference_dtype(settings.dtype, device), device=device)
    features = prompt_features(backbone, queries, layers, batch_size=settings.batch_size)
    features = {key: x for key, x in features.items() if key[1] in poolings}
    scores = run_probes(features, torch.tensor(y, dtype=torch.float32), folds=folds, seed=settings.seed)
    title = f"{backbone.name}: {what}; {len(y)} prompts, {ones} positive, {folds}-fold cross-validated"
    print(format_scores(scores, title))
    if settings.out is not None:
        settings.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": backbone.name, "labels": what, "scores": [asdict(s) for s in scores]}
        settings.out.write_text(json.dumps(payload, indent=2))
    if any(math.isnan(s.auroc) for s in scores):
        raise PrismError("a fold held one class only; lower --folds or add prompts")
    return scores
