"""Evaluation on vLLM: an :class:`~prism_lightning.eval.engine.Engine` with the same methods (generate,
option_logprobs, single_token/option_ids), so the scorers, the item cache and the summary are shared
with the hf backend.

Conditions map to requests: ``off`` (base, persona, random_persona and every judge call) is a plain
request; ``on`` (lora) sends the exported adapter (``<checkpoint>/adapter``, PEFT format) as a
``LoRARequest``; ``gated`` (prism) first runs the :class:`~prism_lightning.model.prefix_gate.PrefixGate`
(embeddings + layers <= k of the base, outside vLLM) and then sends each request with or without the
adapter. The routes equal the hf backend's for the same prompts (the same feature, the same gate).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from prism_lightning.backbone import BackboneConfig, meta_model
from prism_lightning.backends import GenerationConfig
from prism_lightning.backends.vllm_engine import VLLMEngine, get_engine
from prism_lightning.eval.engine import Engine, EngineOutput
from prism_lightning.generation import Sampling
from prism_lightning.model.route_rule import decide_routes

__all__ = ["VLLMEvalEngine"]


class VLLMEvalEngine(Engine):
    """The eval engine interface on a vLLM engine (see the module docstring). ``model`` is the base
    model's module tree on the meta device (no weights): the judge-size rule counts its parameters."""

    backend = "vllm"

    def __init__(
        self,
        engine: VLLMEngine,
        model: torch.nn.Module,
        *,
        name: str,
        adapter_dir: str | Path | None = None,
        prefix_gate=None,
    ) -> None:
        super().__init__(model, engine.tokenizer, engine.formatter, None, name=name)
        self.engine = engine
        self.lora = engine.lora_request(adapter_dir) if adapter_dir is not None else None
        self.prefix_gate = prefix_gate
        self.generation_identity = {"backend": "vllm", "dtype": engine.dtype}

    @classmethod
    def from_backbone_config(cls, backbone: BackboneConfig, generation: GenerationConfig) -> VLLMEvalEngine:
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
    ) -> VLLMEvalEngine:
        """The checkpoint's base on a LoRA-enabled engine + its adapter + its prefix gate."""
        from prism_lightning.model.export import ADAPTER_DIR, verify_checkpoint
        from prism_lightning.model.prefix_gate import PrefixGate

        path = Path(path)
        meta = verify_checkpoint(path)
        backbone = backbone_override or BackboneConfig(**meta["base_model"]["backbone"])
        adapter = path / ADAPTER_DIR
        rank = int(json.loads((adapter / "adapter_config.json").read_text()).get("r", 16))
        engine = get_engine(generation, backbone, enable_lora=True, max_lora_rank=rank)
        gate = PrefixGate.from_checkpoint(path, device=gate_device, backbone_override=backbone)
        return cls(engine, meta_model(backbone), name=str(path), adapter_dir=adapter, prefix_gate=gate)

    @property
    def has_adapter(self) -> bool:
        return self.lora is not None

    @property
    def is_kway(self) -> bool:
        return False

    def _check_mode(self, mode: str) -> str:
        if mode == "gated_k":
            from prism_lightning.eval.settings import EvalInputError

            raise EvalInputError("condition prism_k (K-way routing) runs on the hf backend only.")
        if mode not in ("off", "on", "gated"):
            raise ValueError(f"unknown mode {mode!r}")
        if mode != "off" and self.lora is None:
            raise ValueError(f"mode {mode!r} needs a PRISM checkpoint (--checkpoint)")
        return mode

    def _routing(
        self, prompts: Sequence[str], mode: str, route: Sequence[bool] | None
    ) -> tuple[list[Any] | None, list[bool | None], list[float | None]]:
        """(LoRA request or None per row, route per row, gate probability per row), as the hf engine
        reports them: no adapter -> None routes; otherwise the routing rule's (``route`` forces a row)."""
        n = len(prompts)
        if self.lora is None:
            return None, [None] * n, [None] * n
        gate = self.prefix_gate.gate_probs(list(prompts)) if mode == "gated" else None
        probs = [float(x) for x in gate] if gate is not None else [None] * n
        decided = decide_routes(gate, n, mode=mode, threshold=self.prefix_gate.threshold, forced=route)
        routes = [bool(r) for r in decided.tolist()]
        return [self.lora if r else None for r in routes], routes, probs

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
        """As :meth:`Engine.generate`; vLLM schedules the batch itself (``batch_size`` is unused)."""
        self._check_mode(mode)
        if not prompts:
            return []
        lora, routes, probs = self._routing(prompts, mode, route)
        outs = self.engine.generate(list(prompts), sampling, seeds=seeds, lora=lora)
        return [
            EngineOutput(o.text, r, p, o.finish_reason) for o, r, p in zip(outs, routes, probs, strict=True)
        ]

    def option_logprobs(
        self,
        prompts: Sequence[str],
        options: Sequence[Sequence[str]],
        *,
        mode: str = "off",
        batch_size: int = 16,
    ) -> tuple[torch.Tensor, list[bool | None], list[float | None]]:
        """As :meth:`Engine.option_logprobs`: each option's logsumexp over its one-token spellings."""
        self._check_mode(mode)
        option_ids = [self.option_ids(o) for o in options]
        flat = list(dict.fromkeys(t for ids in option_ids for t in ids))
        column = {t: j for j, t in enumerate(flat)}
        lora, routes, probs = self._routing(prompts, mode, None)
        logp = self.engine.next_token_logprobs(list(prompts), flat, lora=lora)
        scores = torch.empty((len(prompts), len(options)), dtype=torch.float32)
        for k, ids in enumerate(option_ids):
            scores[:, k] = torch.logsumexp(logp[:, [column[t] for t in ids]], dim=-1)
        return scores, routes, probs
