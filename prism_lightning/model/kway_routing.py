"""K-way routing: K named adapters on the same layers and a (K+1)-way gate that sends each sequence to
none of them or to exactly one, inside the same prefill as the binary gate (see ``routing.py``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prism_lightning.errors import ConfigError
from prism_lightning.model.routing import RoutingController, RoutingMode


class KWayRoutingController(RoutingController):
    """Routes each sequence to no adapter or to one of K adapters (see the module docstring).

    A route is an int per row: 0 = none (the base model), j = ``adapter_names[j - 1]``.
    ``set_mask`` takes a (B,) tensor of routes or one int for every row; ``decision`` is the (B,)
    long routes of the last armed pass and ``probs`` the gate's (B, K+1) softmax. Modes: ``gated``
    routes a row when P(some adapter) = 1 - P(none) >= threshold, to its most probable adapter;
    ``on`` always to the most probable adapter; ``off`` never. ``force`` in :meth:`arm` is one route
    or None per row (-1: an adapter, the gate picks which); the rule is
    :func:`~prism_lightning.model.route_rule.decide_routes`. Outside autograd only the adapters some
    row uses run; under autograd every adapter runs (an unused one times 0), so all adapter parameters
    stay in the graph (DDP).
    """

    kway = True

    def __init__(
        self,
        model: nn.Module,
        gate: nn.Module | None,
        gate_layer: int,
        adapter_names: Sequence[str],
        *,
        mode: RoutingMode = "gated",
        threshold: float = 0.5,
    ) -> None:
        names = list(adapter_names)
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"K-way routing needs >= 2 distinct adapter names, got {names}.")
        self.adapter_names = names
        self._routes: torch.Tensor | None = None  # (B,) long when mixed
        self._uniform: int | None = 0  # the route of every row when not mixed
        self._route_masks: dict[int, torch.Tensor] = {}
        self._active: tuple[str, ...] | None = None
        super().__init__(model, gate, gate_layer, adapter_name=names[0], mode=mode, threshold=threshold)
        for name in names:
            if any(name not in layer.lora_A for layer in self._lora_layers):
                raise ValueError(f"Adapter {name!r} is not on every LoRA layer of adapter {names[0]!r}.")
        self._route_of = {layer.lora_A[n]: j for layer in self._lora_layers for j, n in enumerate(names, 1)}
        for layer in self._lora_layers:
            for name in names[1:]:
                self._handles.append(layer.lora_A[name].register_forward_hook(self._lora_hook))
        self._set_routes(0)

    @property
    def n_routes(self) -> int:
        """K + 1 (none + each adapter)."""
        return len(self.adapter_names) + 1

    def route_name(self, route: int) -> str | None:
        """The adapter name of a route, None for route 0."""
        return self.adapter_names[route - 1] if route else None

    # -- routes ---------------------------------------------------------------------------------------
    @property
    def mask(self) -> torch.Tensor | None:
        """The (B,) routes when mixed; None when every row has the same route (see ``state``)."""
        return self._routes

    @property
    def state(self) -> str:
        if self._routes is not None:
            return "mixed"
        return "off" if self._uniform == 0 else f"adapter:{self.route_name(self._uniform)}"

    def set_mask(self, mask: torch.Tensor | int | float | bool) -> None:
        """Set the routes: a (B,) tensor of ints in 0..K or one int for every row."""
        self._set_routes(mask)

    def _set_routes(self, routes) -> None:
        if not torch.is_tensor(routes):
            route = int(routes)
            self._check_route_range(route, route)
            self._routes, self._uniform, self._route_masks = None, route, {}
            self._activate(() if route == 0 else (self.adapter_names[route - 1],))
            return
        routes = routes.detach().reshape(-1).long()
        lo, hi = (int(v) for v in torch.aminmax(routes)) if routes.numel() else (0, 0)  # one host sync
        self._check_route_range(lo, hi)
        if lo == hi:
            self._set_routes(lo)
            return
        used = sorted(int(v) for v in torch.unique(routes) if int(v) > 0)
        self._routes, self._uniform = routes, None
        self._route_masks = {j: routes == j for j in used}
        self._activate(tuple(self.adapter_names[j - 1] for j in used))

    def _check_route_range(self, lo: int, hi: int) -> None:
        if lo < 0 or hi > len(self.adapter_names):
            raise ValueError(f"routes must be in 0..{len(self.adapter_names)}, got {lo}..{hi}.")

    def _activate(self, used: tuple[str, ...]) -> None:
        """Outside autograd run only the used adapters (none: adapter layers off); under autograd all."""
        names = tuple(self.adapter_names) if torch.is_grad_enabled() else used
        if names == self._active:
            return
        for layer in self._lora_layers:
            layer._disable_adapters = not names  # set directly: peft's setters also flip requires_grad
            if names:
                layer._active_adapter = list(names)
        self._active = names
        self._skipping = not names

    def _set_uniform(self, state: str) -> None:
        self._set_routes(0 if state == "off" else 1)

    def reset(self) -> None:
        """Back to no adapter for every sequence (the base model)."""
        self._set_routes(0)
        self._armed = False
        self._stop_after = False

    def select(self, kept: torch.Tensor) -> None:
        if self._routes is not None:
            self._set_routes(self._routes[kept.to(self._routes.device)])

    def use_merged_weights(self, enabled: bool = True) -> None:
        if enabled:
            raise ConfigError("merged weights serve one adapter; K-way routing keeps the adapters unmerged.")

    # -- hooks ----------------------------------------------------------------------------------------
    def _lora_hook(self, module, args, output):
        route = self._route_of[module]
        if self._routes is None:
            return None if route == self._uniform else output * 0.0
        mask = self._route_masks.get(route)
        if mask is None:  # an adapter no row uses (runs only under autograd)
            return output * 0.0
        return output * mask.to(output.dtype).view(-1, *([1] * (output.dim() - 1)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self._lora_layers:
            layer._disable_adapters = False
            layer._active_adapter = list(self.adapter_names)
        self._active = tuple(self.adapter_names)
        self._skipping = False
