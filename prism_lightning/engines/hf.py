"""The ``hf`` engine: this package's own decode loop (:mod:`prism_lightning.generation`) on a plain
backbone or a loaded PRISM checkpoint (:class:`~prism_lightning.model.inference.RoutedModel`), with the
gate deciding each row's route inside the same prefill (single-pass routing). ``off`` runs the untouched
base model (adapter layers skipped).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from prism_lightning.engines.base import (
    Engine,
    EngineOutput,
    OptionLogprobs,
    RowRoute,
    first_token_ids,
    option_scores,
)
from prism_lightning.engines.line_break import StopAfterLineBreak, line_break_token_ids
from prism_lightning.engines.text_stream import TextStream
from prism_lightning.generation import SamplingConfig, generate, generate_batch, left_pad, stop_token_ids
from prism_lightning.model.route_rule import adapter_prob, forced_routes

__all__ = ["HFEngine", "topk_over_response"]


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def topk_over_response(model, prompt_ids: list[int], response_ids: list[int], k: int):
    """(values fp16 (n, k), indices int32 (n, k)) of the logits predicting each response token."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + response_ids], dtype=torch.long, device=device)
    n = len(response_ids)
    try:
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=n + 1).logits[0, :-1]
    except TypeError:
        logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1 : -1]
    values, indices = logits.float().topk(min(k, logits.shape[-1]), dim=-1)
    return values.to(torch.float16).cpu(), indices.to(torch.int32).cpu()


class HFEngine(Engine):
    """The protocol on this package's decode loop; ``controller`` is the checkpoint's routing
    controller (None: a plain backbone); ``routed`` the loaded checkpoint it came from, which
    :meth:`stream` runs on (its gate layer and threshold). ``decode_compile`` (auto, on, off) is the
    batched generation's static-cache compiled decode (``generation.decode_compile``); streaming keeps
    the eager loop."""

    backend = "hf"

    def __init__(
        self,
        model,
        tokenizer,
        formatter,
        controller=None,
        *,
        name: str = "model",
        routed=None,
        decode_compile: str = "off",
    ) -> None:
        super().__init__(model, tokenizer, formatter, name=name)
        self.decode_compile = decode_compile
        self.controller = controller
        self.routed = routed
        self._runner = None  # the streaming path's RoutedBatchRunner, made on the first routed stream
        self._line_breaks: tuple[list[int], list[int]] | None = None

    @classmethod
    def from_backbone(cls, bb, *, decode_compile: str = "off") -> HFEngine:
        return cls(bb.model, bb.tokenizer, bb.formatter, None, name=bb.name, decode_compile=decode_compile)

    @classmethod
    def from_routed(cls, routed, name: str = "checkpoint", *, decode_compile: str = "off") -> HFEngine:
        return cls(
            routed.model, routed.tokenizer, routed.formatter, routed.controller, name=name, routed=routed,
            decode_compile=decode_compile,
        )  # fmt: skip

    @property
    def has_adapter(self) -> bool:
        return self.controller is not None

    @property
    def is_kway(self) -> bool:
        from prism_lightning.model.kway_routing import KWayRoutingController

        return isinstance(self.controller, KWayRoutingController)

    # -- generation ------------------------------------------------------------------------------
    def _generate(
        self, prompts, sampling, mode, seeds, route, batch_size, stop_at_newline, score_options
    ) -> list[EngineOutput]:
        """Rows run in length-sorted batches of ``batch_size``."""
        stop_ids, guard = self._line_stop() if stop_at_newline else (None, contextlib.nullcontext())
        scored = first_token_ids(self.tokenizer, score_options) if score_options else None
        kwargs = {"batch_size": batch_size, "seeds": seeds, "stop_ids": stop_ids}
        kwargs["decode_compile"] = self.decode_compile
        kwargs["keep_first_log_probs"] = scored is not None
        with guard:
            if self.controller is None:
                outs = generate(self.model, self.tokenizer, prompts, sampling, **kwargs)
            else:
                from prism_lightning.model.inference import routed_generate

                forced = list(route) if route is not None else None
                outs = routed_generate(
                    self.model, self.tokenizer, self.controller, prompts, mode=mode, sampling=sampling,
                    route=forced, **kwargs,
                )  # fmt: skip
        results = []
        for o in outs:
            scores = option_scores(o.first_log_probs, scored) if scored is not None else None
            row = EngineOutput(
                o.text, None, None, o.finish_reason, None, o.token_ids, len(o.token_ids), scores
            )
            if self.controller is not None:
                row.route = o.route if mode != "off" or route is not None else False
                row.gate_prob = o.gate_prob if o.gate_prob == o.gate_prob else None
                row.adapter = o.adapter
            results.append(row)
        return results

    def _stream(
        self,
        prompt: str,
        sampling: SamplingConfig,
        write: Callable[[str], object],
        mode: str,
        seed: int | None,
        route,
        first_turn: str | None,
        on_route: Callable[[RowRoute], object] | None,
    ) -> EngineOutput:
        """One row through ``generate_batch`` (a plain backbone) or the checkpoint's
        :class:`~prism_lightning.engines.hf_stream.RoutedBatchRunner`, whose prefill settles the route;
        tokens become text deltas through a :class:`TextStream` (the serving engine's own)."""
        stream = TextStream(self.tokenizer)

        def on_step(new_tokens: dict[int, int], finished: dict[int, str]) -> None:
            for token in new_tokens.values():
                delta = stream.add(token)
                if delta:
                    write(delta)

        decided: list[RowRoute] = []
        if self.controller is None:
            seeds = [seed] if seed is not None else None
            (out,) = generate_batch(
                self.model, self.tokenizer, [prompt], sampling, seeds=seeds, on_step=on_step
            )
        else:
            out = self._stream_routed(
                prompt, sampling, mode, seed, route, first_turn, on_step, decided, on_route
            )
        tail = stream.finish()
        if tail:
            write(tail)
        row = EngineOutput(
            stream.text, None, None, out.finish_reason, None, out.token_ids, len(out.token_ids)
        )
        if decided:
            got = decided[0]
            row.route, row.adapter = got.route, got.adapter
            row.gate_prob = got.gate_prob if got.gate_prob == got.gate_prob else None
        return row

    def _stream_routed(self, prompt, sampling, mode, seed, route, first_turn, on_step, decided, on_route):
        """The routed row: ``mode`` on/off forces the route unless ``route`` does (K-way ``on``: the gate
        picks the adapter); ``first_turn`` decides it otherwise."""
        from prism_lightning.engines.hf_stream import RoutedBatchRunner, RowSpec

        if self.routed is None:
            raise ValueError("streaming a checkpoint needs the engine made by HFEngine.from_routed")
        if self._runner is None:
            self._runner = RoutedBatchRunner(self.routed)
        forced = route if route is not None else {"on": True, "off": False}.get(mode)

        def encode(text: str) -> list[int]:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

        first_ids = encode(first_turn) if first_turn is not None else None
        if seed is None:  # as generate_batch without seeds
            seed = 0 if sampling.greedy else int(torch.randint(0, 2**62, (1,)))
        row = RowSpec(encode(prompt), sampling, seed=seed, route=forced, first_turn_ids=first_ids)

        def heard(routes: list[RowRoute]) -> None:
            decided.append(routes[0])
            if on_route is not None:
                on_route(routes[0])

        (out,), _ = self._runner.run([row], on_route=heard, on_step=on_step)
        return out

    def _line_stop(self):
        """(stop ids, forward-hook guard) of the line-break rule on this model."""
        if self._line_breaks is None:
            self._line_breaks = line_break_token_ids(self.tokenizer)
        leading, merged = self._line_breaks
        # a token with only whitespace before its break stops the row at once: nothing is lost
        stop_ids = list(dict.fromkeys(stop_token_ids(self.tokenizer, self.model) + leading))
        if not (merged and stop_ids):
            return stop_ids, contextlib.nullcontext()
        return stop_ids, StopAfterLineBreak(self.model, merged, stop_ids[0])

    def _prompt_topk(self, sequences, k) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One forward per row: the logits of a whole response are large (n x vocab)."""
        ctl = self.controller
        if ctl is not None:
            ctl.set_mask(0.0)
        try:
            return [topk_over_response(self.model, p, r, k) for p, r in sequences]
        finally:
            if ctl is not None:
                ctl.reset()

    # -- scoring ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _option_logprobs(self, prompts, options, mode, batch_size, route) -> OptionLogprobs:
        """One forward per batch (length-sorted, left-padded, only the last position's logits). The gate
        decides inside that forward when the mode needs it or a route is forced (the rule then applies
        the forced routes)."""
        n = len(prompts)
        option_ids = [self.option_ids(o) for o in options]
        rows = [list(r) for r in self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
        order = sorted(range(n), key=lambda i: -len(rows[i]))
        scores = torch.empty((n, len(options)), dtype=torch.float32)
        routes: list[bool | None] = [None] * n
        probs: list[float | None] = [None] * n
        adapters: list[str | None] = [None] * n
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = _device(self.model)
        ctl = self.controller
        kway = self.is_kway if ctl is not None else False
        forced = forced_routes(route, ctl.adapter_names if kway else None) if ctl is not None else None
        # the gate runs when it picks a route: gated, K-way on (which adapter), or a route is forced
        decides = ctl is not None and (mode == "gated" or (mode == "on" and kway) or forced is not None)
        old_mode = ctl.mode if ctl is not None else None
        try:
            for start in range(0, n, batch_size):
                chunk = order[start : start + batch_size]
                ids, mask = left_pad([rows[i] for i in chunk], pad_id, device)
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                if decides:
                    ctl.mode = mode
                    ctl.arm(decide=True, force=None if forced is None else [forced[i] for i in chunk])
                elif ctl is not None:
                    ctl.set_mask(1.0 if mode == "on" else 0.0)
                logits = self._last_logits(ids, mask, positions)
                if ctl is not None:
                    ctl.disarm()
                    for j, i in enumerate(chunk):
                        r = int(ctl.decision[j]) if decides else int(mode == "on")
                        routes[i] = r > 0
                        adapters[i] = ctl.route_name(r) if kway else None
                        if mode == "gated":
                            probs[i] = float(adapter_prob(ctl.probs)[j])
                logp = torch.log_softmax(logits.float(), dim=-1).cpu()
                for k, oid in enumerate(option_ids):
                    scores[chunk, k] = torch.logsumexp(logp[:, oid], dim=-1)
        finally:
            if ctl is not None:
                ctl.disarm()
                ctl.reset()
                ctl.mode = old_mode
        return OptionLogprobs(scores, routes, probs, adapters)

    def _last_logits(self, ids, mask, positions) -> torch.Tensor:
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        except TypeError:  # models without logits_to_keep
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions)
        return out.logits[:, -1, :]
