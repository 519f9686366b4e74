"""The PRISM gate without the rest of the model: embeddings + decoder layers 0..k + the exported gate.

A serving engine that runs the adapter per request (vLLM's ``LoRARequest``) cannot stop its forward
after layer k to ask the gate, so the decision is made before the request is sent: this module loads
only the first ``k + 1`` decoder layers of the base model (a config with ``num_hidden_layers = k + 1``,
so the later layers' weights are never materialised) and the gate, and computes the routing
probability of each prompt from the same feature the in-model :class:`RoutingController` reads (the
output of decoder layer k at the last prompt token, left-padded batches, positions from the mask).
Its routes therefore equal the hf backend's routes for the same prompts.

Cost: ``(k + 1) / L`` of a prefill (gate layer 0 on SmolLM2: 1 of 30 layers) and that fraction of the
weights in memory.

Usage::

    gate = PrefixGate.from_checkpoint("checkpoints/default")
    prompts = [gate.formatter.prompt("How do I sort a list in Python?")]
    probs = gate.gate_probs(prompts)   # (B,) P(adapter on); (B, K+1) for a K-way gate
    routes = gate.routes(prompts)      # [True/False] per prompt (K-way: the adapter index, 0 = none)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from prism_lightning.backbone import BackboneConfig, load_model_config, prepare_tokenizer, resolve_dtype
from prism_lightning.chat_format import ChatFormatter
from prism_lightning.generation import left_pad
from prism_lightning.model.gate import Gate
from prism_lightning.model.route_rule import gate_routes

__all__ = ["PrefixGate", "truncated_config"]

log = logging.getLogger(__name__)


def truncated_config(config, n_layers: int):
    """A copy of a transformers config that builds only the first ``n_layers`` decoder layers."""
    import copy

    cfg = copy.deepcopy(config)
    full = int(cfg.num_hidden_layers)
    if not 1 <= n_layers <= full:
        raise ValueError(f"n_layers must be in 1..{full}, got {n_layers}.")
    cfg.num_hidden_layers = n_layers
    for name in ("layer_types", "sliding_window_pattern_layers"):  # per-layer lists (Qwen2, Gemma ...)
        value = getattr(cfg, name, None)
        if isinstance(value, list) and len(value) == full:
            setattr(cfg, name, value[:n_layers])
    return cfg


class PrefixGate:
    """Routing decisions from layers <= k only (see the module docstring)."""

    def __init__(
        self,
        decoder: torch.nn.Module,
        tokenizer,
        formatter: ChatFormatter,
        gate: Gate,
        *,
        gate_layer: int,
        threshold: float = 0.5,
    ) -> None:
        self.decoder = decoder.eval()
        self.tokenizer = tokenizer
        self.formatter = formatter
        self.gate = gate.eval()
        self.gate_layer = int(gate_layer)
        self.threshold = float(threshold)
        self._features: torch.Tensor | None = None
        self.decoder.layers[self.gate_layer].register_forward_hook(self._keep_features)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        backbone_override: BackboneConfig | None = None,
    ) -> PrefixGate:
        """Load layers 0..k of the checkpoint's base model (same dtype rule as ``load_checkpoint``) and
        its gate. The checkpoint's files are verified first (a damaged one is a CheckpointError)."""
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        from prism_lightning.model.export import GATE_FILE, verify_checkpoint

        path = Path(path)
        meta = verify_checkpoint(path)
        cfg = backbone_override or BackboneConfig(**meta["base_model"]["backbone"])
        source, config = load_model_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
        k = int(meta["gate_layer"])
        kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
        previous = logging.getLogger("transformers.modeling_utils").level
        # the later layers' weights are left out on purpose: no "unused weights" warning
        logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)
        try:
            decoder = AutoModel.from_pretrained(
                source,
                config=truncated_config(config, k + 1),
                dtype=resolve_dtype(cfg.dtype, device),
                trust_remote_code=cfg.trust_remote_code,
                **kwargs,
            )
        finally:
            logging.getLogger("transformers.modeling_utils").setLevel(previous)
        decoder.to(device)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        prepare_tokenizer(tokenizer)
        state = load_file(str(path / GATE_FILE))
        n_classes = int(state[f"net.{3 * len(meta['gate_hidden'])}.bias"].shape[0])  # the last Linear
        extra = {"n_classes": n_classes} if n_classes > 1 else {}
        dropout = meta.get("gate_dropout", 0.1)
        gate = Gate(int(config.hidden_size), meta["gate_hidden"], dropout=dropout, **extra)
        gate.load_state_dict(state)
        gate.to(device)
        formatter = ChatFormatter(tokenizer, base_system_prompt=cfg.base_system_prompt)
        return cls(decoder, tokenizer, formatter, gate, gate_layer=k, threshold=meta["threshold"])

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def _keep_features(self, module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        self._features = hidden[:, -1].detach()

    @torch.no_grad()
    def gate_probs(self, prompts: Sequence[str | Sequence[int]], *, batch_size: int = 32) -> torch.Tensor:
        """Routing probabilities of chat-formatted prompts (strings, tokenized without added special
        tokens, or token-id lists): (B,) for the on/off gate, (B, K+1) for a K-way gate, on the CPU."""
        rows = [
            list(p) if not isinstance(p, str) else self.tokenizer(p, add_special_tokens=False)["input_ids"]
            for p in prompts
        ]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = []
        for start in range(0, len(rows), batch_size):
            ids, mask = left_pad(rows[start : start + batch_size], pad_id, self.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            self._features = None
            self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
            if self._features is None:
                raise RuntimeError("the gate layer did not run")
            logits = self.gate(self._features).float()
            out.append((torch.sigmoid(logits) if logits.dim() == 1 else torch.softmax(logits, -1)).cpu())
        if not out:
            return torch.empty(0)
        return torch.cat(out)

    def routes(self, prompts: Sequence[str | Sequence[int]], *, batch_size: int = 32) -> list:
        """Per prompt: whether the adapter runs (probability >= the checkpoint's threshold); for a
        K-way gate the adapter index (0 = none), as :func:`~prism_lightning.model.route_rule.gate_routes`
        decides it."""
        return gate_routes(self.gate_probs(prompts, batch_size=batch_size), self.threshold).tolist()
