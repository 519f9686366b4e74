"""Routed inference: one prefill per batch, the gate decides after layer k inside that prefill.

Multi-turn rule (paper): the first user turn's decision holds for the whole conversation; pass
``route=`` to override it.

K-way checkpoints (:class:`~prism_lightning.model.kway_routing.KWayRoutingController`): ``route`` is
True/False (True: an adapter, the gate picks which), an adapter name, or its route number (0 = none);
each result names the adapter it ran with (``adapter``, None for the base model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from prism_lightning.generation import Sampling, SamplingConfig, balanced_batches, generate_batch, left_pad
from prism_lightning.model.kway_routing import KWayRoutingController
from prism_lightning.model.route_rule import (
    RouteSpec,
    adapter_prob,
    decide_routes,
    forced_routes,
    gate_routes,
)
from prism_lightning.model.routing import RoutingController


@dataclass
class RoutedGeneration:
    text: str
    route: bool
    gate_prob: float
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    prompt_tokens: int = 0
    adapter: str | None = None  # K-way: the adapter that ran (None: the base model)
    gate_probs: list[float] | None = None  # K-way: P(none), P(adapter 1..K)
    first_log_probs: torch.Tensor | None = None  # the prefill's next-token log-softmax, when asked for


def _tokenize(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    # Same rule as the generation engine: the chat template already holds the special tokens.
    return [list(r) for r in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def routed_generate(
    model,
    tokenizer,
    controller: RoutingController,
    prompts: Sequence[str],
    *,
    mode: str = "gated",
    threshold: float | None = None,
    sampling: Sampling = SamplingConfig(),
    batch_size: int = 8,
    seeds: Sequence[int] | None = None,
    route: Sequence[RouteSpec] | bool | str | None = None,
    stop_ids: Sequence[int] | None = None,
    keep_first_log_probs: bool = False,
    decode_compile: str = "off",
) -> list[RoutedGeneration]:
    """Generate for chat-formatted prompts with per-sequence routing decided in each prefill.

    Prompts run in length-sorted batches (longest first) through ``generate_batch``; before each
    prefill the controller is armed, so the gate reads layer k's last-prompt-token state in that same
    forward and sets the mask for the layers above it and for every decode step. ``stop_ids``,
    ``keep_first_log_probs`` and ``decode_compile`` go to ``generate_batch`` (with a static decode the
    controller's mask follows the padded batch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    n = len(prompts)
    if n == 0:
        return []
    kway = isinstance(controller, KWayRoutingController)
    if isinstance(route, bool | str):
        route = [route] * n
    forced = forced_routes(route, controller.adapter_names if kway else None)
    if forced is not None and len(forced) != n:
        raise ValueError(f"Got {len(forced)} route overrides for {n} prompts.")
    old_mode, old_threshold = controller.mode, controller.threshold
    controller.mode = mode
    if threshold is not None:
        controller.threshold = float(threshold)
    lengths = [len(r) for r in _tokenize(tokenizer, prompts)]
    order = sorted(range(n), key=lambda i: -lengths[i])
    results: list[RoutedGeneration | None] = [None] * n
    try:
        for chunk in balanced_batches(order, batch_size):
            controller.arm(decide=True, force=None if forced is None else [forced[i] for i in chunk])
            outs = generate_batch(
                model,
                tokenizer,
                [prompts[i] for i in chunk],
                sampling,
                seeds=[seeds[i] for i in chunk] if seeds is not None else None,
                on_rows_kept=controller.select,
                stop_ids=stop_ids,
                keep_first_log_probs=keep_first_log_probs,
                decode_compile=decode_compile,
            )
            controller.disarm()
            probs = controller.probs
            decision = controller.decision
            if kway:
                _kway_results(controller, chunk, outs, results)
                continue
            for j, (i, out) in enumerate(zip(chunk, outs, strict=True)):
                results[i] = RoutedGeneration(
                    text=out.text,
                    route=bool(decision[j]) if decision is not None else mode == "on",
                    gate_prob=float(probs[j]) if probs is not None else float("nan"),
                    token_ids=out.token_ids,
                    finish_reason=out.finish_reason,
                    prompt_tokens=out.prompt_tokens,
                    first_log_probs=out.first_log_probs,
                )
    finally:
        controller.disarm()
        controller.reset()
        controller.mode, controller.threshold = old_mode, old_threshold
    return results  # type: ignore[return-value]


def _kway_results(controller: KWayRoutingController, chunk, outs, results) -> None:
    """Fill ``results`` for one K-way batch (forced -1 = the gate's best adapter was used)."""
    probs, decision = controller.probs, controller.decision
    for j, (i, out) in enumerate(zip(chunk, outs, strict=True)):
        route = int(decision[j]) if decision is not None else 0
        results[i] = RoutedGeneration(
            text=out.text,
            route=route > 0,
            gate_prob=float(adapter_prob(probs)[j]) if probs is not None else float("nan"),
            token_ids=out.token_ids,
            finish_reason=out.finish_reason,
            prompt_tokens=out.prompt_tokens,
            adapter=controller.route_name(route),
            gate_probs=probs[j].tolist() if probs is not None else None,
            first_log_probs=out.first_log_probs,
        )


@torch.no_grad()
def prompt_gate_probs(
    model, tokenizer, controller: RoutingController, prompts: Sequence[str], *, batch_size: int = 32
) -> torch.Tensor:
    """Gate probabilities for chat-formatted prompts: embeddings + layers <= k only."""
    rows = _tokenize(tokenizer, prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = _device(model)
    out = []
    for start in range(0, len(rows), batch_size):
        ids, mask = left_pad(rows[start : start + batch_size], pad_id, device)
        out.append(controller.gate_probs(ids, mask).cpu())
    return torch.cat(out) if out else torch.empty(0)


class RoutedModel:
    """A base model + PRISM adapter + gate, ready for routed generation (see ``load_checkpoint``)."""

    def __init__(
        self,
        model,
        tokenizer,
        formatter,
        gate,
        *,
        gate_layer: int,
        threshold: float = 0.5,
        adapter_name: str = "default",
        meta: dict | None = None,
        merge_weights: bool = False,
        adapter_names: Sequence[str] | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.formatter = formatter
        self.gate = gate.eval()
        self.gate_layer = gate_layer
        self.threshold = threshold
        self.meta = meta or {}
        if adapter_names:  # K-way: none or one of several adapters per sequence
            self.controller = KWayRoutingController(
                model, gate, gate_layer, list(adapter_names), threshold=threshold
            )
        else:
            self.controller = RoutingController(
                model, gate, gate_layer, adapter_name=adapter_name, threshold=threshold
            )
        if merge_weights:  # all-on batches at the base model's cost, for a second copy of the projections
            self.controller.use_merged_weights()

    @property
    def device(self) -> torch.device:
        return _device(self.model)

    def prompts(self, queries: Sequence[str]) -> list[str]:
        """The no-persona prompt every stage uses."""
        return [self.formatter.prompt(q) for q in queries]

    @property
    def adapters(self) -> dict[str, list[str]] | None:
        """K-way: {adapter name: personas it holds}; None for the single adapter."""
        return self.meta.get("adapters")

    def gate_probs(self, queries: Sequence[str], *, batch_size: int = 32) -> list[float]:
        """P(adapter on) per query (K-way: P(any adapter) = 1 - P(none))."""
        return adapter_prob(self.route_probs(queries, batch_size=batch_size)).tolist()

    def route_probs(self, queries: Sequence[str], *, batch_size: int = 32) -> torch.Tensor:
        """The gate's probabilities: (N,) sigmoid, or (N, K+1) softmax (class 0 = none) for K-way."""
        return prompt_gate_probs(
            self.model, self.tokenizer, self.controller, self.prompts(queries), batch_size=batch_size
        )

    def choose_adapters(self, queries: Sequence[str], *, threshold: float | None = None) -> list[str | None]:
        """K-way: the adapter each query would run with (None: the base model), from layers <= k."""
        if not isinstance(self.controller, KWayRoutingController):
            raise ValueError("choose_adapters needs a K-way checkpoint (fit with model.adapters).")
        thr = self.threshold if threshold is None else threshold
        routes = gate_routes(self.route_probs(queries), thr)
        return [self.controller.route_name(int(r)) for r in routes]

    def routing_rate(self, queries: Sequence[str], *, threshold: float | None = None) -> float:
        thr = self.threshold if threshold is None else threshold
        routes = gate_routes(self.route_probs(queries), thr)
        return int((routes != 0).sum()) / max(1, len(queries))

    def generate(
        self,
        queries: Sequence[str],
        *,
        mode: str = "gated",
        threshold: float | None = None,
        sampling: Sampling = SamplingConfig(),
        batch_size: int = 8,
        seeds: Sequence[int] | None = None,
        route: Sequence[RouteSpec] | bool | str | None = None,
    ) -> list[RoutedGeneration]:
        return routed_generate(
            self.model,
            self.tokenizer,
            self.controller,
            self.prompts(queries),
            mode=mode,
            threshold=self.threshold if threshold is None else threshold,
            sampling=sampling,
            batch_size=batch_size,
            seeds=seeds,
            route=route,
        )

    def chat(
        self,
        turns: str | Sequence[str],
        replies: Sequence[str] = (),
        *,
        route: bool | str | None = None,
        mode: str = "gated",
        threshold: float | None = None,
        sampling: Sampling = SamplingConfig(),
        seed: int | None = None,
    ) -> RoutedGeneration:
        """Answer the last user turn of a conversation. The route is decided on the FIRST user turn
        alone (the paper's rule: the first turn's decision holds), unless ``route`` is given."""
        turns = [turns] if isinstance(turns, str) else list(turns)
        thr = self.threshold if threshold is None else threshold
        first_probs = self.route_probs([turns[0]])
        kway = isinstance(self.controller, KWayRoutingController)
        if route is None:  # the first turn's route holds for the conversation
            decided = decide_routes(first_probs, 1, mode=mode, threshold=thr, kway=kway)
            route = int(decided[0]) if kway else bool(decided[0])
        prompt = self.formatter.prompt(turns, replies=replies)
        out = routed_generate(
            self.model,
            self.tokenizer,
            self.controller,
            [prompt],
            mode=mode,
            threshold=thr,
            sampling=sampling,
            seeds=[seed] if seed is not None else None,
            route=[route],
        )[0]
        out.gate_prob = float(adapter_prob(first_probs)[0])
        return out
