"""Which base-model *weights* a checkpoint was trained on, not only which architecture.

Fine-tunes of one base (Qwen2.5-7B-Instruct, DeepSeek-R1-Distill-Qwen-7B, ...) share every config
value, so an adapter trained on one would load silently onto another. ``weight_fingerprint`` hashes
a few fixed rows of the input embedding and of every weight of the first decoder layer: fine-tuning
changes essentially all of them, and reading a few rows costs milliseconds even for a 7B model on a
GPU (only the slices are copied to the host).

Dtype: the rows are rounded to bf16, and magnitudes below fp16's smallest normal number (2**-14) are
flushed to zero, before hashing. So weights stored in bf16 (every current 7-8B release) give the same
fingerprint loaded in float32, bfloat16 or float16, and fp32-stored weights the same one in float32
or bfloat16. (fp32-stored weights loaded in float16 may differ: float16 rounds them differently.)
"""

from __future__ import annotations

import hashlib

import torch

from prism_lightning.errors import PrismError

METHOD = "sha256-bf16-rows-v1"
# Rows taken from every hashed matrix, as fractions of its row count (never the first or last row:
# padding and unused vocabulary rows barely move in fine-tuning).
ROW_FRACTIONS = (0.125, 0.375, 0.625, 0.875)
_FLUSH_BELOW = 2.0**-14


class WeightFingerprintError(PrismError, ValueError):
    """The loaded base model has the checkpoint's architecture but other weights."""


def _rows(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() < 2:
        return weight.reshape(-1)
    n = weight.shape[0]
    idx = sorted({min(n - 1, int(f * n)) for f in ROW_FRACTIONS})
    return weight[idx]


def _digest(named: list[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, weight in named:
        rows = _rows(weight.detach()).to(torch.bfloat16)
        rows = torch.where(rows.abs() < _FLUSH_BELOW, torch.zeros_like(rows), rows)
        h.update(f"{name}:{tuple(weight.shape)}\x00".encode())
        h.update(rows.cpu().contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def _layer0_weights(model) -> list[tuple[str, torch.Tensor]]:
    """The first decoder layer's parameters by their base-model name (peft's ``base_layer.`` dropped,
    LoRA weights skipped), so a peft-wrapped and a plain model hash alike."""
    from prism_lightning.model.routing import decoder_layers

    named = {}
    for name, param in decoder_layers(model)[0].named_parameters():
        if "lora_" in name:
            continue
        named[name.replace(".base_layer.", ".").replace("base_layer.", "")] = param
    return sorted(named.items())


def weight_fingerprint(model) -> dict | None:
    """``{"method", "embedding", "layer0"}`` hex digests for a (possibly peft-wrapped) causal LM; None
    when the weights cannot be read as plain floats (meta device, quantized or sharded parameters)."""
    embedding = model.get_input_embeddings().weight
    layer0 = _layer0_weights(model)
    for _, weight in [("embedding", embedding), *layer0]:
        if weight.is_meta or not weight.is_floating_point() or type(weight.data) is not torch.Tensor:
            return None
    return {
        "method": METHOD,
        "embedding": _digest([("embedding", embedding)]),
        "layer0": _digest(layer0),
    }


def check_weight_fingerprint(
    expected: dict | None,
    model,
    *,
    checkpoint: str = "the checkpoint",
    override: str = "check_weights=False",
) -> None:
    """Raise :class:`WeightFingerprintError` when ``model``'s weights are not the ones ``expected``
    (from prism.json) was computed on. Skipped for checkpoints without a fingerprint, for an
    unknown fingerprint method and for a model whose weights cannot be read."""
    if not isinstance(expected, dict) or expected.get("method") != METHOD:
        return
    got = weight_fingerprint(model)
    if got is None or all(got[k] == expected.get(k) for k in ("embedding", "layer0")):
        return
    raise WeightFingerprintError(
        f"checkpoint {checkpoint} was trained on weights with fingerprint {_short(expected)}; the loaded "
        f"model's weights differ ({_short(got)}, same architecture): load the base model it was trained "
        f"on, or pass {override} to override."
    )


def _short(fp: dict) -> str:
    return f"embedding {str(fp.get('embedding'))[:12]}, layer0 {str(fp.get('layer0'))[:12]}"
