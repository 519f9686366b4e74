"""The engine layer: one protocol (:class:`~prism_lightning.engines.base.Engine`) with two
implementations, ``hf`` (:mod:`~prism_lightning.engines.hf`) and ``vllm``
(:mod:`~prism_lightning.engines.vllm`), opened by :func:`open_engine`, plus an OpenAI-compatible endpoint
(:mod:`~prism_lightning.engines.endpoint`, a bootstrap judge); ``evaluate``, ``study`` and the bootstrap's
stages run on it, ``chat`` streams through :meth:`~prism_lightning.engines.base.Engine.stream`, and
``serve`` routes and streams through this layer's parts (:mod:`~prism_lightning.engines.hf_stream`,
:meth:`~prism_lightning.engines.vllm.VLLMEngine.request_routes`).
Routes are decided by :mod:`prism_lightning.model.route_rule`. This layer imports ``model/`` and the
foundation only, never the pipelines (``bootstrap/``, ``eval/``) or the commands above them. vLLM is
imported only when the ``vllm`` engine is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from prism_lightning.engines.settings import BACKENDS, GenerationConfig, parse_overrides

if TYPE_CHECKING:
    from prism_lightning.engines.base import Engine

__all__ = ["BACKENDS", "GenerationConfig", "open_engine", "parse_overrides"]


def open_engine(
    source: Any,
    generation: GenerationConfig | dict | None = None,
    *,
    device: str = "cpu",
    backbone_override: Any = None,
    merge_weights: bool = False,
) -> Engine:
    """An engine for ``source``: a checkpoint directory (its base + adapter + gate), a
    :class:`~prism_lightning.backbone.BackboneConfig` (a plain base model), or, for ``hf`` only, an
    already loaded backbone or :class:`~prism_lightning.model.inference.RoutedModel`. ``generation``
    picks the engine (default ``hf``) and holds its settings; ``device`` is where hf runs (and the
    vLLM engine's prefix gate)."""
    from prism_lightning.backbone import BackboneConfig
    from prism_lightning.errors import ConfigError

    generation = GenerationConfig.from_value(generation)
    on_vllm = generation.backend == "vllm"
    if on_vllm:
        from prism_lightning.engines.vllm import VLLMEngine

        if isinstance(source, str | Path):
            return VLLMEngine.from_checkpoint(
                source, generation, backbone_override=backbone_override, gate_device=device
            )
        if isinstance(source, BackboneConfig):
            return VLLMEngine.from_backbone_config(source, generation)
        raise ConfigError("the vllm engine opens a checkpoint directory or a BackboneConfig, not a model.")
    from prism_lightning.engines.hf import HFEngine

    compiled = generation.decode_compile
    if isinstance(source, str | Path):
        from prism_lightning.model.export import load_checkpoint

        routed = load_checkpoint(
            source, device=device, backbone_override=backbone_override, merge_weights=merge_weights
        )
        return HFEngine.from_routed(routed, name=str(source), decode_compile=compiled)
    if isinstance(source, BackboneConfig):
        return HFEngine.from_backbone(source.load(device), decode_compile=compiled)
    if hasattr(source, "controller"):  # a RoutedModel
        return HFEngine.from_routed(source, decode_compile=compiled)
    return HFEngine.from_backbone(source, decode_compile=compiled)
