"""The ``vllm`` engine: the :class:`~prism_lightning.engines.base.Engine` protocol on vLLM, so the
scorers, the item cache and the summary are shared with the hf engine.

Conditions map to requests: ``off`` (base, persona, random_persona and every judge call) is a plain
request; ``on`` (lora) sends the exported adapter (``<checkpoint>/adapter``, PEFT format) as a
``LoRARequest``; ``gated`` (prism) first runs the :class:`~prism_lightning.model.prefix_gate.PrefixGate`
(embeddings + layers <= k of the base, outside vLLM) and then sends each request with or without the
adapter. A K-way checkpoint (``<checkpoint>/adapters/<name>``) gives each request none or one of its
adapters (prism_k), by the same rule. The routes equal the hf engine's for the same prompts (the same
feature, the same gate, :mod:`~prism_lightning.model.route_rule`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from prism_lightning.backbone import BackboneConfig, meta_model
from prism_lightning.engines.base import (
    Engine,
    EngineOutput,
    OptionLogprobs,
    RowRoute,
    first_token_ids,
    option_scores,
)
from prism_lightning.engines.settings import GenerationConfig
from prism_lightning.engines.text_stream import TextStream
from prism_lightning.engines.vllm_core import VLLMCore, get_engine
from prism_lightning.generation import SamplingConfig
from prism_lightning.model.route_rule import RouteSpec, adapter_prob, decide_routes, forced_routes

__all__ = ["VLLMEngine"]


class VLLMEngine(Engine):
    """The protocol on a vLLM engine (see the module docstring). ``model`` is the base model's module
    tree on the meta device (no weights): the judge-size rule counts its parameters."""

    backend = "vllm"

    def __init__(
        self,
        engine: VLLMCore,
        model: torch.nn.Module,
        *,
        name: str,
        adapter_dir: str | Path | None = None,
        prefix_gate=None,
        adapter_dirs: dict[str, Path] | None = None,
    ) -> None:
        """``adapter_dir``: the one adapter of a PRISM checkpoint; ``adapter_dirs``: a K-way checkpoint's
        adapters by name (route j runs the j-th)."""
        super().__init__(model, engine.tokenizer, engine.formatter, name=name)
        self.engine = engine
        self.adapter_names = list(adapter_dirs or {})
        dirs = list((adapter_dirs or {}).values()) or ([adapter_dir] if adapter_dir is not None else [])
        self.loras = [engine.lora_request(d) for d in dirs]  # route j -> self.loras[j - 1]
        self.prefix_gate = prefix_gate
        self.generation_identity = {"backend": "vllm", "dtype": engine.dtype}
        self._leading_line_breaks: list[int] | None = None

    @classmethod
    def from_backbone_config(cls, backbone: BackboneConfig, generation: GenerationConfig) -> VLLMEngine:
        """A base model without adapter (``off`` conditions and judges)."""
        return cls(get_engine(generation, backbone), meta_model(backbone), name=backbone.model)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        generation: GenerationConfig,
        *,
        backbone_override: BackboneConfig | None = None,
        gate_device: str = "cpu",
    ) -> VLLMEngine:
        """The checkpoint's base on a LoRA-enabled engine + its adapter(s) + its prefix gate."""
        from prism_lightning.model.export import ADAPTER_DIR, ADAPTERS_DIR, verify_checkpoint
        from prism_lightning.model.prefix_gate import PrefixGate

        path = Path(path)
        meta = verify_checkpoint(path)
        backbone = backbone_override or BackboneConfig(**meta["base_model"]["backbone"])
        names = list(meta.get("adapters") or {})
        dirs = {n: path / ADAPTERS_DIR / n for n in names} if names else {"": path / ADAPTER_DIR}
        rank = max(
            int(json.loads((d / "adapter_config.json").read_text()).get("r", 16)) for d in dirs.values()
        )
        engine = get_engine(generation, backbone, enable_lora=True, max_lora_rank=rank, max_loras=len(dirs))
        gate = PrefixGate.from_checkpoint(path, device=gate_device, backbone_override=backbone)
        kwargs = {"adapter_dirs": dirs} if names else {"adapter_dir": dirs[""]}
        return cls(engine, meta_model(backbone), name=str(path), prefix_gate=gate, **kwargs)

    @property
    def has_adapter(self) -> bool:
        return bool(self.loras)

    @property
    def is_kway(self) -> bool:
        return bool(self.adapter_names)

    def request_routes(
        self, prompts: Sequence[str | Sequence[int]], mode: str, route: Sequence[RouteSpec] | None
    ) -> tuple[list[Any] | None, list[bool | None], list[float | None], list[str | None]]:
        """(LoRA request or None per row, route per row, gate probability per row, adapter per row), as
        the hf engine reports them: no adapter -> None routes; otherwise the routing rule's (``route``
        forces a row). The prefix gate runs where the rule needs it (gated; K-way on: which adapter)."""
        n = len(prompts)
        if not self.loras:
            return None, [None] * n, [None] * n, [None] * n
        kway = self.is_kway
        gate = (
            self.prefix_gate.gate_probs(list(prompts)) if mode == "gated" or kway and mode == "on" else None
        )
        probs = [float(x) for x in adapter_prob(gate)] if gate is not None else [None] * n
        forced = forced_routes(route, self.adapter_names if kway else None)
        decided = decide_routes(
            gate, n, mode=mode, threshold=self.prefix_gate.threshold, kway=kway, forced=forced
        ).tolist()
        lora = [self.loras[int(r) - 1] if r else None for r in decided]
        adapters = [self.adapter_names[int(r) - 1] if kway and r else None for r in decided]
        return lora, [bool(r) for r in decided], probs, adapters

    def _generate(
        self, prompts, sampling, mode, seeds, route, batch_size, stop_at_newline, score_options
    ) -> list[EngineOutput]:
        """vLLM schedules the batch itself (``batch_size`` is unused). The line-break rule: tokens with
        only whitespace before a break stop the row (the hf engine's stop ids); a merged one (``"?\\n"``)
        stops it through the ``"\\n"`` stop string, the token kept, as hf keeps it. Option scores come
        from ``logprob_token_ids`` at the first generated position of the row's own request."""
        lora, routes, probs, adapters = self.request_routes(prompts, mode, route)
        kwargs: dict[str, Any] = {"seeds": seeds, "lora": lora}
        if stop_at_newline:
            if self._leading_line_breaks is None:
                from prism_lightning.engines.line_break import line_break_token_ids

                self._leading_line_breaks = line_break_token_ids(self.tokenizer)[0]
            kwargs["stop_ids"] = list(dict.fromkeys(self.engine.stop_ids + self._leading_line_breaks))
            kwargs["stop_strings"] = ["\n"]
        scored = first_token_ids(self.tokenizer, score_options) if score_options else None
        flat = [t for toks in scored.values() for t in toks] if scored else None
        outs = self.engine.generate(prompts, sampling, score_ids=flat, **kwargs)
        return [
            EngineOutput(
                o.text,
                r,
                p,
                o.finish_reason,
                a,
                o.token_ids,
                len(o.token_ids),
                option_scores(o.first_log_probs, scored, flat) if scored else None,
            )  # fmt: skip
            for o, r, p, a in zip(outs, routes, probs, adapters, strict=True)
        ]

    def _stream(
        self,
        prompt: str,
        sampling: SamplingConfig,
        write: Callable[[str], object],
        mode: str,
        seed: int | None,
        route: RouteSpec,
        first_turn: str | None,
        on_route: Callable[[RowRoute], object] | None,
    ) -> EngineOutput:
        """The route from :meth:`request_routes` (on ``first_turn`` when given), then one request stepped
        through the engine (:meth:`~prism_lightning.engines.vllm_core.VLLMCore.stream`), its tokens turned
        into deltas by the serving engines' :class:`TextStream`."""
        lora, routes, probs, adapters = self.request_routes(
            [first_turn if first_turn is not None else prompt], mode, None if route is None else [route]
        )
        if routes[0] is not None and on_route is not None:
            on_route(RowRoute(routes[0], probs[0] if probs[0] is not None else float("nan"), adapters[0]))
        stream = TextStream(self.tokenizer)

        def on_token(token: int) -> None:
            delta = stream.add(token)
            if delta:
                write(delta)

        out = self.engine.stream(prompt, sampling, on_token, seed=seed, lora=lora[0] if lora else None)
        tail = stream.finish()
        if tail:
            write(tail)
        tokens = out.token_ids
        return EngineOutput(
            stream.text, routes[0], probs[0], out.finish_reason, adapters[0], tokens, len(tokens)
        )

    def _option_logprobs(self, prompts, options, mode, batch_size, route) -> OptionLogprobs:
        """vLLM's next-token log-probabilities of the options (``batch_size`` is unused); ``route`` forces
        rows as in :meth:`request_routes`."""
        option_ids = [self.option_ids(o) for o in options]
        flat = list(dict.fromkeys(t for ids in option_ids for t in ids))
        column = {t: j for j, t in enumerate(flat)}
        lora, routes, probs, adapters = self.request_routes(prompts, mode, route)
        logp = self.engine.next_token_logprobs(prompts, flat, lora=lora)
        scores = torch.empty((len(prompts), len(options)), dtype=torch.float32)
        for k, ids in enumerate(option_ids):
            scores[:, k] = torch.logsumexp(logp[:, [column[t] for t in ids]], dim=-1)
        return OptionLogprobs(scores, routes, probs, adapters)

    def _prompt_topk(self, sequences, k) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """vLLM's ``prompt_logprobs`` over prompt + response (the base model: no LoRA request)."""
        return self.engine.prompt_topk(sequences, min(k, len(self.tokenizer)))
