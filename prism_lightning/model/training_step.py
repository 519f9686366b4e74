"""The PRISM training step as functions of tensors: the student forward, the gate loss, the distillation
losses and the step that joins them. ``PrismModule`` only gathers their inputs (batch, routes, class
weights) and logs what they return.

One step serves both routings. A row's *route* is 0 (retain: base model, no KL) or the adapter j in 1..K
that distils it; with one adapter K = 1, the gate has a single logit and the route is the gate target.
Shapes: B rows, T tokens per row, R response steps, k teacher top-k entries, V vocabulary, H hidden size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from prism_lightning.model.routing import decoder_layers, inner_model
from prism_lightning.model.sharding import reshard

# -- losses ---------------------------------------------------------------------------------------


def topk_kl(
    student_logits: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Per-token KL(teacher || student) on the teacher's top-k support, (N, V) x (N, k) -> (N,).

    Normalisation: both distributions are renormalised over the teacher's top-k tokens
    (softmax of the k logits / T). The teacher's mass outside its top-k was never stored, so the
    top-k support is the only one on which both distributions are known; on it this is a proper KL
    (>= 0, zero iff the student matches the teacher's top-k shape) that does not depend on how
    much mass the teacher left outside the top-k. With k = 64 and T = 2 that leftover mass is small,
    and the student starts as the same base model, so leaking mass outside the support is not an
    issue in practice (this is also the reference implementation's choice). Scaled by T^2.
    """
    t = temperature
    student = student_logits.float().gather(-1, teacher_indices) / t
    teacher = teacher_values.float() / t
    p = F.softmax(teacher, dim=-1)
    kl = (p * (F.log_softmax(teacher, dim=-1) - F.log_softmax(student, dim=-1))).sum(-1)
    return kl * (t * t)


class _TopkLogits(torch.autograd.Function):
    """(N, H) hidden x the LM head's rows at (N, k) ids -> (N, k) logits, ``chunk`` positions at a time.

    Only (chunk, k, H) gathered weight rows exist at once, and nothing of that size is kept for backward:
    the gradient of the hidden states is an ``embedding_bag`` (sum of k weight rows per position, weighted
    by the logits' gradient), and a weight that needs a gradient gets an ``index_add``."""

    @staticmethod
    def forward(ctx, hidden, weight, indices, chunk):
        ctx.save_for_backward(hidden, weight, indices)
        ctx.chunk = chunk
        out = hidden.new_empty(indices.shape, dtype=torch.promote_types(hidden.dtype, weight.dtype))
        for s in range(0, hidden.shape[0], chunk):
            rows = weight[indices[s : s + chunk]]  # (c, k, H)
            out[s : s + chunk] = torch.bmm(rows, hidden[s : s + chunk, :, None].to(rows.dtype))[..., 0]
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, indices = ctx.saved_tensors
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            per = grad.to(weight.dtype)
            grad_hidden = F.embedding_bag(indices, weight, per_sample_weights=per, mode="sum")
            grad_hidden = grad_hidden.to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight)
            for s in range(0, hidden.shape[0], ctx.chunk):
                g, h = grad[s : s + ctx.chunk], hidden[s : s + ctx.chunk]
                contrib = (g[:, :, None] * h[:, None, :]).to(weight.dtype)  # (c, k, H)
                grad_weight.index_add_(0, indices[s : s + ctx.chunk].reshape(-1), contrib.flatten(0, 1))
        return grad_hidden, grad_weight, None, None


def topk_student_logits(
    hidden: torch.Tensor, lm_head: torch.nn.Module, indices: torch.Tensor, chunk: int
) -> torch.Tensor:
    """The student's logits at the teacher's top-k ids only, (N, H) x (N, k) -> (N, k), without the
    (N, V) logits: :func:`topk_kl` renormalises the student over those k ids, so the vocabulary's
    logsumexp cancels and the other V - k logits are never needed. Equal to
    ``lm_head(hidden).gather(-1, indices)`` (up to summation order), ``chunk`` positions at a time."""
    logits = _TopkLogits.apply(hidden, lm_head.weight, indices, max(1, int(chunk)))
    if getattr(lm_head, "bias", None) is not None:
        logits = logits + lm_head.bias[indices]
    return logits


def topk_kl_from_hidden(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    temperature: float,
    chunk: int,
) -> torch.Tensor:
    """:func:`topk_kl` from the final hidden states (N, H): the LM head runs on the k teacher ids of each
    position only (:func:`topk_student_logits`), ``chunk`` positions at a time."""
    student = topk_student_logits(hidden, lm_head, teacher_indices, chunk)
    arange = torch.arange(teacher_indices.shape[-1], device=teacher_indices.device)
    return topk_kl(student, teacher_values, arange.expand_as(teacher_indices), temperature)


def full_kl(ref_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-token KL(ref || student) over the full vocabulary at temperature T, (N, V) x (N, V) -> (N,),
    scaled by T^2 (the retain loss: adapter-on student vs adapter-off reference)."""
    t = temperature
    ref = F.log_softmax(ref_logits.float() / t, dim=-1)
    stu = F.log_softmax(student_logits.float() / t, dim=-1)
    return (ref.exp() * (ref - stu)).sum(-1) * (t * t)


def gate_loss(logits: torch.Tensor, routes: torch.Tensor, class_weight: torch.Tensor) -> torch.Tensor:
    """Class-balanced gate loss, scalar. ``class_weight`` (K+1,) from :func:`balanced_class_weights`.

    One adapter, logits (B,): binary cross-entropy with the positives (distill) weighted by
    ``class_weight[1]`` = n_retain / n_distill, so both classes weigh the same whatever the split.
    K-way, logits (B, K+1): cross-entropy with class c weighted by n_retain / n_c (a weighted mean), the
    same balance over none + K adapters. ``routes`` (B,) in 0..K.
    """
    weight = class_weight.to(device=logits.device, dtype=torch.float32)
    if logits.dim() == 1:
        return F.binary_cross_entropy_with_logits(logits.float(), routes.float(), pos_weight=weight[1])
    return F.cross_entropy(logits.float(), routes.long(), weight=weight)


def balanced_class_weights(counts: Sequence[float]) -> torch.Tensor:
    """(K+1,) weights n_retain / n_c from per-route row counts (counts[0] = retain rows). Without
    retain rows every weight is 1 (no balance is possible). A class without rows gets 0 (nothing to
    weight) under K-way routing; with one adapter (two counts) the distill weight stays 1, no
    re-weighting, as the binary loss has always done."""
    n_none = float(counts[0])
    if n_none <= 0:
        return torch.ones(len(counts))
    empty = 1.0 if len(counts) == 2 else 0.0
    return torch.tensor([n_none / float(c) if c > 0 else empty for c in counts])


# -- routes ---------------------------------------------------------------------------------------


def route_targets(
    gate_target: torch.Tensor,
    persona_index: torch.Tensor | None = None,
    persona_routes: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) long routes: 0 for retain rows (``gate_target`` 0); for distill rows 1 (one adapter,
    ``persona_routes`` None) or the route of the adapter holding the row's persona, ``persona_routes``
    (P,) indexed by ``persona_index`` (B,)."""
    distill = gate_target > 0
    if persona_routes is None:
        return distill.long()
    if persona_index is None:
        raise RuntimeError("K-way routing needs each row's persona index (batch['persona_index']).")
    if bool((distill & (persona_index < 0)).any()):
        raise RuntimeError("a distill row has no persona index; K-way routing cannot place it.")
    lut = persona_routes.to(persona_index.device)
    return torch.where(distill, lut[persona_index.clamp(min=0)], torch.zeros_like(persona_index))


def route_counts(
    routes: torch.Tensor,
    n_routes: int,
    class_counts: Mapping[str, int] | None = None,
    distill_per_persona: Mapping[str, int] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> list[float]:
    """Rows per route, (K+1) floats, for :func:`balanced_class_weights`: over the train split when the
    data module counted it (``class_counts`` for one adapter; ``distill_per_persona`` summed per adapter
    group for K-way), else over the batch's ``routes`` (B,)."""
    if groups is None and class_counts:
        return [float(class_counts.get("retain", 0)), float(class_counts.get("distill", 0))]
    if groups is not None and distill_per_persona:
        retain = float((class_counts or {}).get("retain", 0))
        return [retain] + [float(sum(distill_per_persona.get(p, 0) for p in ps)) for ps in groups.values()]
    return torch.bincount(routes.long().cpu(), minlength=n_routes).float().tolist()


# -- forward ----------------------------------------------------------------------------------------


def features_until_gate(
    model: torch.nn.Module, controller, ids: torch.Tensor, attn: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """(B, H) gate features at ``positions`` (B,) of ``ids``/``attn`` (B, T): embeddings + layers <= k
    only. The controller ends the forward after layer k, before FSDP's post-forward hook of that layer,
    which is why a sharded layer k is resharded here."""
    feats = controller.gate_features(ids, attn, positions)
    reshard(decoder_layers(model)[controller.gate_layer])
    return feats


@dataclasses.dataclass(frozen=True)
class StudentOutput:
    """What the student forward gives the losses.

    Attributes:
        hidden: (B', T', H) last hidden states of the rows that ran the full stack.
        features: (B, H) gate features of every row (last prompt token after layer k).
        hidden_rows: (B,) each row's index into ``hidden``, -1 for a row that stopped after layer k.
        width: T', the number of positions in ``hidden``.
    """

    hidden: torch.Tensor
    features: torch.Tensor
    hidden_rows: torch.Tensor
    width: int


def student_forward(
    model: torch.nn.Module,
    controller,
    ids: torch.Tensor,
    attn: torch.Tensor,
    prompt_len: torch.Tensor,
    distill: torch.Tensor,
    mask: torch.Tensor | float,
    split: bool,
) -> StudentOutput:
    """The training forward of ``ids``/``attn`` (B, T) with the adapter ``mask`` set: gate features for
    every row, read by the layer-k hook at the last prompt token (``prompt_len`` (B,) - 1), and the
    decoder output. ``mask``: (B,) routes (0 = base) or one value for every row that runs the stack.

    With ``split``, only the ``distill`` (B,) rows run the full stack (``mask`` is theirs, padding trimmed);
    the others stop after the gate layer, without grad (their features need none: the gate reads them
    detached from the base, whose layers <= k carry no adapter)."""
    decoder = inner_model(model)
    bsz = ids.shape[0]
    if not split:
        controller.set_mask(mask)
        controller.arm(prompt_len - 1, decide=False)
        hidden = decoder(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        if controller.features is None:
            raise RuntimeError("The gate-layer hook did not capture features.")
        return StudentOutput(hidden, controller.features, torch.arange(bsz, device=ids.device), ids.shape[1])
    retain = ~distill
    with torch.no_grad():
        width_r = int(attn[retain].sum(-1).max())
        feats_r = features_until_gate(
            model, controller, ids[retain, :width_r], attn[retain, :width_r], prompt_len[retain] - 1
        )
    width = int(attn[distill].sum(-1).max())
    controller.set_mask(mask)
    controller.arm(prompt_len[distill] - 1, decide=False)
    hidden = decoder(
        input_ids=ids[distill, :width], attention_mask=attn[distill, :width], use_cache=False
    ).last_hidden_state
    if controller.features is None:
        raise RuntimeError("The gate-layer hook did not capture features.")
    feats = feats_r.new_empty((bsz, feats_r.shape[-1]))
    feats[retain], feats[distill] = feats_r, controller.features.to(feats_r.dtype)
    hidden_rows = torch.full((bsz,), -1, dtype=torch.long, device=ids.device)
    hidden_rows[distill] = torch.arange(int(distill.sum()), device=ids.device)
    return StudentOutput(hidden, feats, hidden_rows, width)


# -- the step -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """Losses of one batch (scalars) and the gate's logits, (B,) or (B, K+1), for the metrics."""

    loss: torch.Tensor
    gate_loss: torch.Tensor
    kl: torch.Tensor
    retain_kl: torch.Tensor
    n_tokens: int
    gate_logits: torch.Tensor

    def logged(self) -> dict[str, torch.Tensor | int]:
        """The values ``PrismModule`` logs, by name."""
        names = ("loss", "gate_loss", "kl", "retain_kl", "n_tokens")
        return {name: getattr(self, name) for name in names}


def distill_step(
    model: torch.nn.Module,
    controller,
    gate: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    routes: torch.Tensor,
    class_weight: torch.Tensor,
    *,
    kl_temperature: float,
    retain_weight: float = 0.0,
    sharded: bool = False,
    kl_chunk_positions: int = 0,
) -> StepOutput:
    """One joint training step: gate loss on every row + top-k KL on the distill rows, each under its
    own adapter (+ ``retain_weight`` x the retain KL, one adapter only).

    ``batch`` holds the data module's tensors: ``input_ids``/``attention_mask`` (B, T), ``prompt_lengths``
    and ``response_lengths`` (B,), ``teacher_values``/``teacher_indices`` (B, R, k) and ``teacher_mask``
    (B, R). ``routes`` (B,): 0 retain, j the adapter of a distill row (:func:`route_targets`);
    ``class_weight`` (K+1,): :func:`gate_loss`. The student's logits at prompt_len - 1 + j predict
    response token j, and the LM head runs only at those positions.

    Passes: without a retain loss, retain rows need nothing above layer k, so they stop after the gate
    layer and only distill rows (padding trimmed) run the full stack; a batch without distill rows runs
    layers <= k only. With a retain loss, an adapter-off
    reference pass over the retain rows, then one forward over every row with the adapter on. Sharded
    (FSDP), every rank must run the same layer forwards (each one all-gathers its weights), so the passes
    may not depend on a rank's rows: one pass over all rows (the losses equal the split path's), and with
    a retain loss a reference pass over all rows.

    ``kl_chunk_positions`` 0: the LM head gives full (N, V) logits at the response positions, then the
    top-k KL; > 0: the LM head runs on the teacher's k ids only, that many positions at a time
    (:func:`topk_kl_from_hidden`; the same loss and gradients). The retain KL needs the full
    vocabulary either way.
    """
    ids, attn = batch["input_ids"], batch["attention_mask"]
    prompt_len, resp_len = batch["prompt_lengths"], batch["response_lengths"]
    t_values, t_indices, t_mask = batch["teacher_values"], batch["teacher_indices"], batch["teacher_mask"]
    bsz, width = ids.shape
    n_resp = t_values.shape[1]
    steps = torch.arange(n_resp, device=ids.device)
    pos = (prompt_len[:, None] - 1 + steps[None]).clamp(max=width - 1)  # (B, R)
    rows = torch.arange(bsz, device=ids.device)[:, None].expand(bsz, n_resp)
    lm_head = model.get_base_model().get_output_embeddings()
    distill = routes > 0

    ref_logits = retain_sel = None
    use_retain = retain_weight > 0 and (sharded or bool((~distill).any()))
    if use_retain:  # adapter-off reference for retain rows: no grad, adapters skipped
        retain_sel = ~distill[:, None] & (steps[None] < resp_len[:, None])  # (B, R)
        ref_rows = torch.ones_like(distill) if sharded else ~distill
        with torch.no_grad():
            controller.set_mask(0.0)
            h_ref = inner_model(model)(
                input_ids=ids[ref_rows], attention_mask=attn[ref_rows], use_cache=False
            )
            sub = retain_sel[ref_rows]
            ref_logits = lm_head(h_ref.last_hidden_state[rows[: sub.shape[0]][sub], pos[ref_rows][sub]])

    if not (sharded or use_retain or bool(distill.any())):
        # no row needs the layers above the gate: gate features only. The zero KL over the trainable
        # weights gives each the zero gradient a full pass would give (DDP expects one per parameter).
        features = features_until_gate(model, controller, ids, attn, prompt_len - 1)
        gate_logits = gate(features)
        g_loss = gate_loss(gate_logits, routes, class_weight)
        start = torch.zeros((), device=ids.device)  # a tensor even when nothing trains (validate)
        zero = sum((p.sum() for p in model.parameters() if p.requires_grad), start) * 0.0
        return StepOutput(g_loss + zero, g_loss, zero, torch.zeros((), device=ids.device), 0, gate_logits)

    split = not (sharded or use_retain or bool(distill.all()))
    # the retain loss compares adapter-on with the reference on retain rows: adapter on for every row
    mask = routes[distill] if split else (torch.ones_like(routes) if use_retain else routes)
    out = student_forward(model, controller, ids, attn, prompt_len, distill, mask, split)
    pos = pos.clamp(max=out.width - 1)
    gate_logits = gate(out.features)
    g_loss = gate_loss(gate_logits, routes, class_weight)

    sel = t_mask.bool() & distill[:, None]  # (B, R)
    n_tok = int(sel.sum())
    if n_tok > 0:
        hidden = out.hidden[out.hidden_rows[rows[sel]], pos[sel]]
        if kl_chunk_positions > 0:
            kl = topk_kl_from_hidden(
                hidden, lm_head, t_values[sel], t_indices[sel], kl_temperature, kl_chunk_positions
            ).mean()
        else:
            kl = topk_kl(lm_head(hidden), t_values[sel], t_indices[sel], kl_temperature).mean()
    else:  # distill rows without response tokens: every adapter parameter in the graph with a zero loss
        kl = out.hidden.sum() * 0.0
    loss = g_loss + kl
    retain = torch.zeros((), device=ids.device)
    if use_retain and ref_logits.shape[0] > 0:
        student = lm_head(out.hidden[rows[retain_sel], pos[retain_sel]])
        retain = full_kl(ref_logits, student, kl_temperature).mean()
        loss = loss + retain_weight * retain
    return StepOutput(loss, g_loss, kl, retain, n_tok, gate_logits)


def compile_layers(layers: Sequence[torch.nn.Module], enabled: bool = True) -> None:
    """``torch.compile`` each of ``layers`` (dynamic shapes, so new batch widths do not recompile) or undo
    it. The layers share one code path, so they share the compiled graph; the routing hooks on their LoRA
    modules are traced into it, guarded on the controller's state."""
    for layer in layers:
        if enabled:
            layer.compile(dynamic=True)
        else:
            layer._compiled_call_impl = None  # what nn.Module.compile set; back to the eager call
