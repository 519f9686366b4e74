"""The model side of evaluation: generation and next-token option scoring, with the adapter off
(base), always on (lora) or decided per row by the gate inside the same forward (prism; prism_k: mode
``"gated_k"``, a K-way checkpoint's gate picks none or one of its adapters per row).

An :class:`Engine` wraps either a plain backbone (no adapter) or a loaded PRISM checkpoint
(:class:`~prism_lightning.model.inference.RoutedModel`). ``mode`` is ``"off"`` (the untouched base
model: adapter layers skipped), ``"on"`` or ``"gated"``. The judge uses the same weights in mode
``"off"`` unless a separate judge model is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prism_lightning.generation import Sampling, generate, left_pad
from prism_lightning.model.route_rule import adapter_prob

__all__ = ["Engine", "EngineOutput"]


@dataclass
class EngineOutput:
    text: str
    route: bool | None = None
    gate_prob: float | None = None
    finish_reason: str = "length"
    adapter: str | None = None  # K-way: the adapter the row ran with (None: the base model)


def _device(model) -> torch.device:
    return next(model.parameters()).device


class Engine:
    def __init__(self, model, tokenizer, formatter, controller=None, *, name: str = "model") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = formatter
        self.controller = controller
        self.name = name
        self._token_cache: dict[str, list[int]] = {}

    @classmethod
    def from_backbone(cls, bb) -> Engine:
        return cls(bb.model, bb.tokenizer, bb.formatter, None, name=bb.name)

    @classmethod
    def from_routed(cls, routed, name: str = "checkpoint") -> Engine:
        return cls(routed.model, routed.tokenizer, routed.formatter, routed.controller, name=name)

    @property
    def has_adapter(self) -> bool:
        return self.controller is not None

    @property
    def is_kway(self) -> bool:
        from prism_lightning.model.kway_routing import KWayRoutingController

        return isinstance(self.controller, KWayRoutingController)

    def _check_mode(self, mode: str) -> str:
        """The mode to run (``gated_k`` runs as ``gated`` on a K-way checkpoint)."""
        if mode not in ("off", "on", "gated", "gated_k"):
            raise ValueError(f"unknown mode {mode!r}")
        if mode != "off" and self.controller is None:
            raise ValueError(f"mode {mode!r} needs a PRISM checkpoint (--checkpoint)")
        if mode == "gated_k":
            if not self.is_kway:
                from prism_lightning.eval.settings import EvalInputError

                raise EvalInputError(
                    "condition prism_k needs a K-way checkpoint (fit with model.adapters); this one has one "
                    "adapter: use prism."
                )
            return "gated"
        return mode

    # -- generation ------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str],
        sampling: Sampling,
        *,
        mode: str = "off",
        seeds: Sequence[int] | None = None,
        route: Sequence[bool] | None = None,
        batch_size: int = 8,
    ) -> list[EngineOutput]:
        """Generate for chat-formatted prompts. ``route`` forces per-row routing (multi-turn: the
        first turn's decision holds) while the gate's probability is still recorded."""
        mode = self._check_mode(mode)
        if not prompts:
            return []
        if self.controller is None:
            outs = generate(self.model, self.tokenizer, prompts, sampling, batch_size=batch_size, seeds=seeds)
            return [EngineOutput(o.text, None, None, o.finish_reason) for o in outs]
        from prism_lightning.model.inference import routed_generate

        outs = routed_generate(
            self.model,
            self.tokenizer,
            self.controller,
            prompts,
            mode=mode,
            sampling=sampling,
            batch_size=batch_size,
            seeds=seeds,
            route=list(route) if route is not None else None,
        )
        return [
            EngineOutput(
                o.text,
                o.route if mode != "off" or route is not None else False,
                o.gate_prob if o.gate_prob == o.gate_prob else None,
                o.finish_reason,
                o.adapter,
            )
            for o in outs
        ]

    # -- scoring -----------------------------------------------------------------------------------
    def single_token(self, text: str) -> int | None:
        """The token id of ``text`` if it is exactly one token, else None."""
        if text not in self._token_cache:
            self._token_cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        toks = self._token_cache[text]
        return toks[0] if len(toks) == 1 else None

    def option_ids(self, variants: Sequence[str]) -> list[int]:
        """Token ids of the variants that are a single token (e.g. "A", " A"); duplicates dropped.
        When none is one token (a tiny test vocabulary), the first token of each variant."""
        ids: list[int] = []
        for v in variants:
            tok = self.single_token(v)
            if tok is not None and tok not in ids:
                ids.append(tok)
        if not ids:  # no one-token spelling: score each spelling's first token
            for v in variants:
                toks = self._token_cache.get(v) or []
                if toks and toks[0] not in ids:
                    ids.append(toks[0])
        if not ids:
            raise ValueError(f"none of {list(variants)} can be tokenized")
        return ids

    @torch.no_grad()
    def option_logprobs(
        self,
        prompts: Sequence[str],
        options: Sequence[Sequence[str]],
        *,
        mode: str = "off",
        batch_size: int = 16,
    ) -> tuple[torch.Tensor, list[bool | None], list[float | None]]:
        """Log-probability of each option as the next token after each prompt: one forward per
        batch (length-sorted, left-padded, only the last position's logits). An option is a list of
        spellings; its score is the logsumexp over those that are one token. Returns
        ([n, n_options] log-probs, per-row route, per-row gate probability)."""
        mode = self._check_mode(mode)
        n = len(prompts)
        option_ids = [self.option_ids(o) for o in options]
        rows = [list(r) for r in self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
        order = sorted(range(n), key=lambda i: -len(rows[i]))
        scores = torch.empty((n, len(options)), dtype=torch.float32)
        routes: list[bool | None] = [None] * n
        probs: list[float | None] = [None] * n
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = _device(self.model)
        ctl = self.controller
        old_mode = ctl.mode if ctl is not None else None
        try:
            for start in range(0, n, batch_size):
                chunk = order[start : start + batch_size]
                ids, mask = left_pad([rows[i] for i in chunk], pad_id, device)
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                if ctl is not None:
                    if mode == "off":
                        ctl.set_mask(0.0)
                    elif mode == "on" and not self.is_kway:
                        ctl.reset()
                    elif mode == "on":  # K-way: always an adapter, the gate picks which
                        ctl.mode = "on"
                        ctl.arm(decide=True)
                    else:
                        ctl.mode = "gated"
                        ctl.arm(decide=True)
                logits = self._last_logits(ids, mask, positions)
                if ctl is not None:
                    ctl.disarm()
                    if mode == "gated":
                        dec, pr = ctl.decision, ctl.probs
                        for j, i in enumerate(chunk):
                            routes[i] = bool(dec[j])
                            probs[i] = float(adapter_prob(pr)[j])
                    else:
                        for i in chunk:
                            routes[i] = mode == "on"
                logp = torch.log_softmax(logits.float(), dim=-1).cpu()
                for k, oid in enumerate(option_ids):
                    scores[chunk, k] = torch.logsumexp(logp[:, oid], dim=-1)
        finally:
            if ctl is not None:
                ctl.disarm()
                ctl.reset()
                ctl.mode = old_mode
        return scores, routes, probs

    def _last_logits(self, ids, mask, positions) -> torch.Tensor:
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        except TypeError:  # models without logits_to_keep
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions)
        return out.logits[:, -1, :]
