"""Single-pass routing on a PEFT LoRA model.

The gate reads the hidden state of the last prompt token after decoder layer ``k``; the LoRA adapter
lives only on layers ``k+1 .. L-1``. So inside one forward pass the gate can decide after layer k
and set a per-sequence mask that scales the adapter's contribution in every later layer and every
decode step. One batch can hold routed and unrouted sequences.

How the mask is applied (peft 0.21, ``lora.Linear.forward``): ``result = base_layer(x) +
lora_B(lora_A(dropout(x))) * scaling``. A forward hook on each ``lora_A[adapter]`` multiplies its
(B, T, r) output by ``mask[:, None, None]`` - the rank-r intermediate, which is far cheaper than
scaling the (B, T, out) delta and just as exact: a 1.0 factor leaves the value bit-identical, a 0.0
factor makes the delta exactly zero and ``base + 0`` is exactly ``base``. An all-ones mask skips the
multiply; an all-zero mask outside autograd switches the adapter layers off (no adapter compute).

K-way routing (``kway_routing.KWayRoutingController``): K named adapters on the same layers and a (K+1)-way
gate (class 0 = no adapter, class j = adapter j). Every adapter used by some row of the batch is
active, and adapter j's rank-r activation is scaled by ``routes == j``, so a row routed to j gets
``((base + 0) + delta_j) + 0`` = ``base + delta_j``: bit for bit what adapter j alone gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from prism_lightning.errors import ConfigError
from prism_lightning.model.route_rule import check_mode, decide_routes

RoutingMode = Literal["gated", "on", "off"]
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder block list of a (possibly peft-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    n = base.config.num_hidden_layers
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"Cannot find the decoder layers of {type(base).__name__}.")


def inner_model(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (``LlamaModel`` inside ``LlamaForCausalLM``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "get_decoder"):
        return base.get_decoder()
    return base.model


def linear_module_names(model: nn.Module) -> list[str]:
    """Short names of the linear projections inside the decoder layers (valid LoRA targets)."""
    names: set[str] = set()
    for name, module in decoder_layers(model)[0].named_modules():
        if isinstance(module, nn.Linear):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def validate_routing_setup(model: nn.Module, gate_layer: int, target_modules: Sequence[str]) -> None:
    """Clear errors for a gate layer out of range or a LoRA target the model does not have."""
    n_layers = model.config.num_hidden_layers
    if not 0 <= gate_layer < n_layers - 1:
        raise ConfigError(
            f"gate_layer={gate_layer} is out of range for a model with {n_layers} decoder layers: "
            f"it must satisfy 0 <= gate_layer < {n_layers - 1} so that LoRA has layers above it "
            f"(valid choices: 0..{n_layers - 2})."
        )
    valid = linear_module_names(model)
    unknown = [t for t in target_modules if t not in valid]
    if unknown:
        raise ConfigError(
            f"LoRA target module(s) {unknown} do not exist in {type(model).__name__}; "
            f"valid choices: {', '.join(valid)}."
        )


def apply_lora(
    model: nn.Module,
    *,
    gate_layer: int,
    rank: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    adapter_name: str = "default",
    adapter_names: Sequence[str] | None = None,
):
    """Wrap ``model`` in a peft LoRA model with adapters on decoder layers ``gate_layer+1 .. L-1`` only.

    ``adapter_names`` (K-way routing): one adapter per name, same settings, all trainable; the
    ``kway_routing.KWayRoutingController`` then decides per sequence which of them runs."""
    from peft import get_peft_model

    validate_routing_setup(model, gate_layer, target_modules)
    config = _lora_config(model, gate_layer, rank, alpha, dropout, target_modules)
    if not adapter_names:
        return get_peft_model(model, config, adapter_name=adapter_name)
    names = list(adapter_names)
    peft_model = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, _lora_config(model, gate_layer, rank, alpha, dropout, target_modules))
    peft_model.base_model.set_adapter(names)  # every adapter active and trainable
    return peft_model


def _lora_config(model, gate_layer, rank, alpha, dropout, target_modules):
    from peft import LoraConfig

    n_layers = model.config.num_hidden_layers
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        layers_to_transform=list(range(gate_layer + 1, n_layers)),
        task_type="CAUSAL_LM",
        bias="none",
    )


def lora_layers(model: nn.Module, adapter_name: str = "default") -> list[nn.Module]:
    """Every peft LoRA layer that holds ``adapter_name``."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A]


class _StopForward(Exception):
    """Raised by the layer-k hook to end a features-only forward after layer k."""


class RoutingController:
    """Per-sequence adapter mask + the layer-k gate hook for one peft LoRA model.

    State: ``mask`` (B,) of 0/1 (or a uniform on/off state without a tensor), ``armed`` (the next
    pass through layer k is a prefill: read features and, in ``decide`` mode, set the mask from the
    gate), the last gate probabilities and features. Arming is one-shot: the hook disarms itself
    after firing, so decode steps and activation-checkpointing recomputation leave the state alone.
    """

    kway = False  # routes are bools (one adapter); the K-way controller's are route numbers

    def __init__(
        self,
        model: nn.Module,
        gate: nn.Module | None,
        gate_layer: int,
        *,
        adapter_name: str = "default",
        mode: RoutingMode = "gated",
        threshold: float = 0.5,
    ) -> None:
        self.model = model
        self.gate = gate
        self.gate_layer = gate_layer
        self.adapter_name = adapter_name
        self.mode = mode
        self.threshold = threshold
        self._lora_layers = lora_layers(model, adapter_name)
        if not self._lora_layers:
            raise ValueError(f"Model has no LoRA layers for adapter {adapter_name!r}.")
        self._state = "on"  # "on" | "off" | "mixed"
        self._mask: torch.Tensor | None = None
        self._skipping = False
        self._armed = False
        self._decide = False
        self._positions: torch.Tensor | None = None
        self._stop_after = False
        self._force: torch.Tensor | None = None
        # merged-weights fast path (use_merged_weights): per LoRA layer (base weight, merged weight)
        self._merged: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] | None = None
        self._weights_merged = False
        self.probs: torch.Tensor | None = None  # gate probabilities of the last armed pass (its rows)
        self.decision: torch.Tensor | None = None  # routed rows of the last armed pass (bool)
        self.features: torch.Tensor | None = None
        self._handles = [
            layer.lora_A[adapter_name].register_forward_hook(self._lora_hook) for layer in self._lora_layers
        ]
        self._handles.append(decoder_layers(model)[gate_layer].register_forward_hook(self._gate_hook))

    # -- mode / threshold -------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = check_mode(value)

    # -- mask ---------------------------------------------------------------------------------------
    @property
    def mask(self) -> torch.Tensor | None:
        """The (B,) 0/1 mask when mixed; None when uniform (see ``state``)."""
        return self._mask

    @property
    def state(self) -> str:
        return self._state

    def set_mask(self, mask: torch.Tensor | float | bool) -> None:
        """Set the adapter mask: a (B,) tensor of 0/1 (any dtype) or a scalar for every sequence."""
        if not torch.is_tensor(mask):
            self._set_uniform("on" if float(mask) else "off")
            return
        mask = mask.detach().reshape(-1)
        on = mask != 0
        n_on = int(on.sum())  # one host sync per prefill; buys skipping adapter compute when all off
        if n_on == mask.numel():
            self._set_uniform("on")
        elif n_on == 0:
            self._set_uniform("off")
        else:
            self._state = "mixed"
            self._mask = on
            self._swap_weights(False)
            self._set_skipping(False)

    def _set_uniform(self, state: str) -> None:
        self._state = state
        self._mask = None
        merged = state == "on" and self._merged is not None and not torch.is_grad_enabled()
        self._swap_weights(merged)
        self._set_skipping(merged or (state == "off" and not torch.is_grad_enabled()))

    def _set_skipping(self, skip: bool) -> None:
        # Toggle the layers' flag directly: peft's enable_adapters() would also flip requires_grad.
        if skip != self._skipping:
            for layer in self._lora_layers:
                layer._disable_adapters = skip
            self._skipping = skip

    # -- merged-weights fast path ---------------------------------------------------------------------
    @torch.no_grad()
    def use_merged_weights(self, enabled: bool = True) -> None:
        """Serve batches whose rows are all routed on with merged weights (W + scaling * B A: one matmul
        per projection instead of three), so an all-on prefill and its decode steps cost what the base
        model costs. Mixed batches keep the masked path and all-off batches the base weights.

        Costs a second copy of every adapted projection (the layers above the gate layer). Inference
        only (never while autograd records). An all-on batch then equals peft's own merged model bit
        for bit (the merged weight is computed as ``peft`` merges it), not the unmerged adapter: the
        two differ by rounding."""
        if enabled and self._merged is None:
            self._merged = []
            for layer in self._lora_layers:
                weight = layer.get_base_layer().weight
                delta = layer.get_delta_weight(self.adapter_name).to(weight.dtype)
                self._merged.append((layer, weight.data, weight.data + delta))
        elif not enabled and self._merged is not None:
            self._swap_weights(False)
            self._merged = None
        if self._state != "mixed":
            self._set_uniform(self._state)

    def _swap_weights(self, merged: bool) -> None:
        """Point each adapted projection at its merged or its base weight (no copy: ``.data`` swap)."""
        if merged == self._weights_merged or self._merged is None:
            return
        for layer, base, fused in self._merged:
            layer.get_base_layer().weight.data = fused if merged else base
        self._weights_merged = merged

    def reset(self) -> None:
        """Back to adapter-on for every sequence (a plain always-on LoRA model)."""
        self._set_uniform("on")
        self._armed = False
        self._stop_after = False

    def select(self, kept: torch.Tensor) -> None:
        """Follow the generation engine when it drops finished rows (``on_rows_kept``)."""
        if self._mask is not None:
            self.set_mask(self._mask[kept.to(self._mask.device)])

    # -- arming -------------------------------------------------------------------------------------
    def arm(
        self,
        positions: torch.Tensor | None = None,
        *,
        decide: bool = True,
        force: Sequence[bool | int | None] | torch.Tensor | None = None,
    ) -> None:
        """The next pass through layer k reads gate features at ``positions`` (per row; default: the
        last position, i.e. left-padded prompts). With ``decide`` the mask follows
        :func:`~prism_lightning.model.route_rule.decide_routes` for ``mode``/``threshold`` and ``force``
        (one forced route or None per row), while the gate's probabilities are still recorded."""
        self._armed = True
        self._decide = decide
        self._positions = positions
        self._force = force
        self.features = None
        if decide:
            self.probs = None
            self.decision = None

    def disarm(self) -> None:
        self._armed = False

    # -- hooks --------------------------------------------------------------------------------------
    def _lora_hook(self, module, args, output):
        if self._state == "on":
            return None
        if self._state == "off":
            return output * 0.0
        mask = self._mask.to(output.dtype).view(-1, *([1] * (output.dim() - 1)))
        return output * mask

    def _gate_hook(self, module, args, output):
        if not self._armed:
            return None
        self._armed = False
        # Detached before indexing: under gradient checkpointing the hook runs again during the backward
        # recomputation (disarmed then), and an indexing op recorded only the first time would make the
        # two passes save different tensors.
        hidden = (output[0] if isinstance(output, tuple) else output).detach()
        if self._positions is None:
            feats = hidden[:, -1]
        else:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            feats = hidden[rows, self._positions.to(hidden.device)]
        self.features = feats.detach()
        if self._decide:
            self._route(self.features)
        if self._stop_after:
            raise _StopForward
        return None

    def _route(self, features: torch.Tensor) -> None:
        self.probs = self._gate_output(features) if self.gate is not None else None
        self.decision = decide_routes(
            self.probs,
            features.shape[0],
            mode=self.mode,
            threshold=self.threshold,
            kway=self.kway,
            forced=self._force,
            device=features.device,
        )
        self.set_mask(self.decision)

    def _gate_output(self, features: torch.Tensor) -> torch.Tensor:
        """The gate's probabilities for ``features`` (eval mode, no autograd): a (B,) sigmoid, or a
        (B, K+1) softmax for a K-way gate."""
        was_training = self.gate.training
        self.gate.eval()
        with torch.no_grad():
            logits = self.gate(features).float()
            probs = torch.sigmoid(logits) if logits.dim() == 1 else torch.softmax(logits, dim=-1)
        self.gate.train(was_training)
        return probs

    # -- features-only forward ----------------------------------------------------------------------
    @torch.no_grad()
    def gate_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embeddings + layers 0..k only: the forward stops right after the gate layer."""
        self.arm(positions, decide=False)
        self._stop_after = True
        kwargs = {}
        if attention_mask is not None:  # same positions as the generation engine's left-padded prefill
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        try:
            inner_model(self.model)(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
            )
        except _StopForward:
            pass
        finally:
            self._stop_after = False
            self._armed = False
        if self.features is None:
            raise RuntimeError("The gate layer did not run.")
        return self.features

    def gate_probs(self, input_ids, attention_mask=None, positions=None) -> torch.Tensor:
        """The gate's probabilities from layers <= k only."""
        return self._gate_output(self.gate_features(input_ids, attention_mask, positions))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._swap_weights(False)
        self._merged = None
        self._set_skipping(False)
