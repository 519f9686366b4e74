"""The hf engine's streaming path (``serve``, ``chat``): chat rows through a routed model, with every
row's route settled in its prefill, and tokens streamed as they come. ``RoutedBatchRunner`` runs one
batch to its end; ``RoutedRunningBatch`` lets rows join a running batch between decode steps (continuous
batching), each with its own prefill and route, the controller's per-row mask following the rows.

Routing rule (the paper's): a conversation is routed on its first user turn. A one-turn prompt IS the
first-turn prompt, so the gate decides inside the prefill itself (single-pass routing). A longer
conversation's first turn is a different prompt: its gate probability comes from a layers-<=k pass
over that first turn alone, before the prefill. Rows may also force their route (``:on`` / ``:off``, or
one adapter by name on a K-way checkpoint, whose gate picks none or one of its adapters per row).
The rows whose route is already known go to the controller as forced routes, so one prefill serves
gated, forced and multi-turn rows together (the rule: :mod:`~prism_lightning.model.route_rule`); a hook
placed after the controller's own gate hook reports every row's route as soon as the prefill settled it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from prism_lightning.engines.base import RowRoute
from prism_lightning.engines.running_batch import RunningBatch, StepResult
from prism_lightning.generation import Generation, SamplingConfig, StepCallback, generate_batch, left_pad
from prism_lightning.model.route_rule import RouteSpec, adapter_prob, decide_routes, forced_routes
from prism_lightning.model.routing import decoder_layers

__all__ = ["RoutedBatchRunner", "RoutedRunningBatch", "RowRoute", "RowSpec"]


@dataclass
class RowSpec:
    """One conversation to answer. ``first_turn_ids`` is the first user turn's own prompt when the
    prompt holds more than that turn (None: the prompt is the first-turn prompt)."""

    prompt_ids: list[int]
    sampling: SamplingConfig
    seed: int = 0
    route: RouteSpec = None  # None: the gate decides; True/False; K-way: an adapter's name
    first_turn_ids: list[int] | None = None


RouteCallback = Callable[[list[RowRoute]], None]


class RoutedBatchRunner:
    """Runs batches of :class:`RowSpec` on a ``RoutedModel`` (one caller at a time: the model and its
    routing controller hold per-batch state)."""

    def __init__(self, routed) -> None:
        self.routed = routed
        self.controller = routed.controller
        self._on_route: RouteCallback | None = None
        self._routes: list[RowRoute] = []
        self._pending = False  # the next pass through the gate layer is this batch's prefill
        self._first_probs: list[float | None] = []
        self.adapter_names: list[str] = list(getattr(self.controller, "adapter_names", []))
        self.kway = self.controller.kway
        gate_layer = decoder_layers(routed.model)[routed.gate_layer]
        # Registered after the controller's hook, so it runs after the routes are settled.
        self._handle = gate_layer.register_forward_hook(self._after_gate)

    def close(self) -> None:
        self._handle.remove()

    @torch.no_grad()
    def run(
        self,
        rows: Sequence[RowSpec],
        *,
        on_route: RouteCallback | None = None,
        on_step: StepCallback | None = None,
    ) -> tuple[list[Generation], list[RowRoute]]:
        """Answer ``rows`` as one batch. ``on_route`` gets every row's route as soon as the prefill has
        decided it (before the first token); ``on_step`` streams tokens (see ``generate_batch``)."""
        if not rows:
            return [], []
        routed, ctl = self.routed, self.controller
        forced = self._known_routes(rows)
        self._on_route = on_route
        self._routes = []
        old_mode, old_threshold = ctl.mode, ctl.threshold
        ctl.mode, ctl.threshold = "gated", routed.threshold
        ctl.arm(decide=True, force=forced)
        self._pending = True
        try:
            outs = generate_batch(
                routed.model,
                routed.tokenizer,
                [row.prompt_ids for row in rows],
                [row.sampling for row in rows],
                seeds=[row.seed for row in rows],
                on_rows_kept=ctl.select,
                on_step=on_step,
            )
        finally:
            ctl.disarm()
            ctl.reset()
            ctl.mode, ctl.threshold = old_mode, old_threshold
            self._on_route, self._pending = None, False
        return outs, self._routes

    def _known_routes(self, rows: Sequence[RowSpec]) -> list:
        """Each row's route where it is known before the prefill (forced, or decided by a conversation's
        first turn), None where the prefill's gate decides; also keeps the first turns' probabilities
        for the route reports."""
        first = self._first_turn_probs(rows)
        forced = forced_routes([row.route for row in rows], self.adapter_names if self.kway else None)
        # a conversation's first turn decides its route (K-way ``:on``: which adapter)
        todo = [i for i, p in enumerate(first) if p is not None and forced[i] in (None, -1)]
        if todo:
            probs = torch.stack([first[i] for i in todo]).double()
            decided = decide_routes(
                probs,
                len(todo),
                threshold=self.routed.threshold,
                kway=self.kway,
                forced=[forced[i] for i in todo],
            ).tolist()
            for i, route in zip(todo, decided, strict=True):
                forced[i] = route
        self._first_probs = [None if p is None else float(adapter_prob(p[None])[0]) for p in first]
        return forced

    def _first_turn_probs(self, rows: Sequence[RowSpec]) -> list[torch.Tensor | None]:
        """The gate's probabilities of the first user turn (a scalar, or (K+1,) for K-way) for the rows
        whose prompt holds more than it."""
        todo = [i for i, row in enumerate(rows) if row.first_turn_ids is not None]
        probs: list[torch.Tensor | None] = [None] * len(rows)
        if not todo:
            return probs
        tok = self.routed.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids, mask = left_pad([rows[i].first_turn_ids for i in todo], pad_id, self.routed.device)
        for i, p in zip(todo, self.controller.gate_probs(ids, mask).cpu(), strict=True):
            probs[i] = p
        return probs

    def _after_gate(self, module, args, output) -> None:
        """After the gate layer in this batch's prefill (and only there): report the routes."""
        if not self._pending:
            return
        self._pending = False
        ctl = self.controller
        decision = ctl.decision
        n = decision.shape[0]
        probs = adapter_prob(ctl.probs).tolist() if ctl.probs is not None else [float("nan")] * n
        names = [None, *self.adapter_names]
        self._routes = [
            RowRoute(bool(r), first if first is not None else float(p), names[int(r)] if self.kway else None)
            for r, p, first in zip(decision.tolist(), probs, self._first_probs, strict=True)
        ]
        if self._on_route is not None:
            self._on_route(self._routes)


class RoutedRunningBatch:
    """Continuous batching on a routed model: rows join the running batch between decode steps, each
    with its route settled in its own prefill (single-pass routing, the newcomers' gate pass only) and
    kept while it runs; the controller's per-row mask follows the batch as rows join and leave."""

    def __init__(self, runner: RoutedBatchRunner) -> None:
        self.runner = runner
        self.batch = RunningBatch(runner.routed.model, runner.routed.tokenizer)
        self._route_of: dict[Hashable, int] = {}  # each running row's route (K-way: its route number)
        self._mask_version = -1  # the batch layout the controller's mask was set for

    def __len__(self) -> int:
        return len(self.batch)

    @property
    def can_admit(self) -> bool:
        return self.batch.can_admit

    @torch.no_grad()
    def admit(
        self, keys: Sequence[Hashable], rows: Sequence[RowSpec], on_route: RouteCallback | None = None
    ) -> StepResult:
        """Prefill ``rows`` (named by ``keys``) and add them to the running batch; ``on_route`` hears
        their routes as soon as the gate has decided them, before their first tokens."""
        runner, ctl = self.runner, self.runner.controller
        forced = runner._known_routes(rows)
        old_mode, old_threshold = ctl.mode, ctl.threshold
        ctl.mode, ctl.threshold = "gated", runner.routed.threshold
        ctl.arm(decide=True, force=forced)
        runner._on_route, runner._routes, runner._pending = on_route, [], True
        try:
            tokens, finished = self.batch.admit(
                keys, [r.prompt_ids for r in rows], [r.sampling for r in rows], [r.seed for r in rows]
            )
            decisions = ctl.decision.tolist()
        finally:
            ctl.disarm()
            ctl.mode, ctl.threshold = old_mode, old_threshold
            runner._on_route, runner._pending = None, False
            self._mask_version = -1  # the prefill set the mask for the newcomers alone
        for key, route in zip(keys, decisions, strict=True):
            if key not in finished:
                self._route_of[key] = int(route)
        return tokens, finished

    @torch.no_grad()
    def step(self) -> StepResult:
        """One decode step of every running row under its own route."""
        if self._mask_version != self.batch.version:
            routes = [self._route_of[key] for key in self.batch.keys]
            self.runner.controller.set_mask(torch.tensor(routes, device=self.batch.device))
            self._mask_version = self.batch.version
        tokens, finished = self.batch.step()
        for key in finished:
            del self._route_of[key]
        if not self.batch:
            self.runner.controller.reset()
        return tokens, finished

    def drop(self, keys: Sequence[Hashable]) -> None:
        """End rows now (their clients left, a stop string matched)."""
        self.batch.drop(keys)
        for key in keys:
            self._route_of.pop(key, None)
        if not self.batch:
            self.runner.controller.reset()

    def reset(self) -> None:
        """Forget every row (after a failed step)."""
        self.batch.reset()
        self._route_of.clear()
        self._mask_version = -1
        self.runner.controller.reset()
