"""The routing rule, written once: from the gate's probabilities (and any route a caller forces) to the
route each sequence runs with. Every path that routes asks this module: the hf prefill hook
(:mod:`~prism_lightning.model.routing`), the vLLM prefix gate, ``serve``, ``chat``, ``evaluate`` and the
training step's route metrics.

Routes. One adapter: a bool per row (adapter on/off). K-way: an int per row, 0 = no adapter (the base
model), j = the j-th adapter; a forced -1 means "an adapter, the gate picks which".

Modes. ``gated``: the gate decides (one adapter: P(on) >= threshold; K-way: the most probable adapter
when P(some adapter) = 1 - P(none) >= threshold, else none). ``on``: always the adapter (K-way: the
gate's most probable one). ``off``: never.

Conversations (the paper's rule): the route is decided on the FIRST user turn alone and then holds for
every later turn. Callers pass the first turn's probabilities (or the route the first turn got) as the
forced route of the later turns.

This module sits in ``model/`` (not ``engines/``) because the controller's layer-k hook and the
training step's metrics need it, and both live below the engines.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MODES: tuple[str, ...] = ("gated", "on", "off")

RouteSpec = bool | int | str | None
"""A route a caller may force for one row: None (the gate decides), True/False (adapter on/off; K-way:
on = the gate's most probable adapter), an adapter's name or its route number (K-way only)."""


def check_mode(mode: str) -> str:
    """``mode`` if it is a routing mode, else a ValueError naming the choices."""
    if mode not in MODES:
        raise ValueError(f"Unknown routing mode {mode!r}; choose one of {', '.join(MODES)}.")
    return mode


def gate_routes(probs: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """The gate's own routes. ``probs`` (N,) sigmoid -> (N,) bool: p >= threshold. ``probs`` (N, K+1)
    softmax (class 0 = none) -> (N,) long: the most probable adapter where 1 - P(none) >= threshold,
    else 0. No threshold: always route (one adapter: on; K-way: the most probable adapter)."""
    if probs.dim() == 1:
        if threshold is None:
            return torch.ones_like(probs, dtype=torch.bool)
        return probs >= threshold
    best = probs[:, 1:].argmax(-1) + 1
    if threshold is None:
        return best
    return torch.where(1.0 - probs[:, 0] >= threshold, best, torch.zeros_like(best))


def adapter_prob(probs: torch.Tensor) -> torch.Tensor:
    """P(an adapter runs) per row: the sigmoid itself, or 1 - P(none) for a K-way softmax."""
    return 1.0 - probs[:, 0] if probs.dim() == 2 else probs


def route_number(spec: bool | int | str, adapter_names: Sequence[str]) -> int:
    """A K-way forced route as a route number (-1 = an adapter, the gate picks which)."""
    if isinstance(spec, str):
        if spec not in adapter_names:
            raise ValueError(f"unknown adapter {spec!r}; this model has {', '.join(adapter_names)}.")
        return list(adapter_names).index(spec) + 1
    if isinstance(spec, bool):
        return -1 if spec else 0
    if not 0 <= int(spec) <= len(adapter_names):
        raise ValueError(f"route {spec} is out of range 0..{len(adapter_names)}.")
    return int(spec)


def forced_routes(
    specs: Sequence[RouteSpec] | None, adapter_names: Sequence[str] | None
) -> list[bool | int | None] | None:
    """Forced route specs in the form :func:`decide_routes` takes: bools for one adapter (a name is
    refused), route numbers for K-way (``adapter_names`` given); None stays None (the gate decides)."""
    if specs is None:
        return None
    if adapter_names:
        return [None if s is None else route_number(s, adapter_names) for s in specs]
    out: list[bool | int | None] = []
    for s in specs:
        if isinstance(s, str):
            raise ValueError(f"route {s!r} names an adapter, but this checkpoint has one adapter.")
        out.append(None if s is None else bool(s))
    return out


def decide_routes(
    probs: torch.Tensor | None,
    n: int,
    *,
    mode: str = "gated",
    threshold: float = 0.5,
    kway: bool = False,
    forced: Sequence[bool | int | None] | torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The route of each of ``n`` rows: (n,) bool (one adapter) or (n,) long (K-way).

    ``probs`` are the gate's probabilities for these rows ((n,) or (n, K+1); None when there is no
    gate, which only forced rows and the ``off`` mode (and ``on`` with one adapter) can do without).
    ``forced`` holds one entry per row: None (the mode decides) or the row's route (see
    :func:`forced_routes`); a forced route wins over the mode."""
    check_mode(mode)
    if probs is not None:
        device = probs.device
    dtype = torch.long if kway else torch.bool
    if torch.is_tensor(forced):
        forced = forced.tolist()
    known = [f is not None for f in forced] if forced is not None else [False] * n
    if len(known) != n:
        raise ValueError(f"Got {len(known)} forced routes for {n} rows.")

    if all(known) or mode == "off":
        routes = torch.zeros(n, dtype=dtype, device=device)
    elif mode == "on" and not kway:
        routes = torch.ones(n, dtype=dtype, device=device)
    elif probs is None:
        raise RuntimeError(f"Routing mode {mode!r} needs a gate.")
    else:
        routes = gate_routes(probs, threshold if mode == "gated" else None).to(dtype)
    if not any(known):
        return routes
    values = torch.tensor([int(f) if f is not None else 0 for f in forced], dtype=torch.long, device=device)
    if kway and bool((values < 0).any()):  # -1: an adapter, the gate picks which
        if probs is None:
            raise RuntimeError("Routing a row to the gate's best adapter needs a gate.")
        values = torch.where(values < 0, gate_routes(probs, None), values)
    mask = torch.tensor(known, dtype=torch.bool, device=device)
    return torch.where(mask, values.to(dtype), routes)
