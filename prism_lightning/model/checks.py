"""PrismModule's settings checked before any long work: value ranges at construction, and the gate layer
and LoRA targets against the model's own config (on the meta device, no weights)."""

from __future__ import annotations

from prism_lightning.backbone import BackboneConfig
from prism_lightning.errors import require
from prism_lightning.model.route_rule import MODES
from prism_lightning.model.routing import validate_routing_setup
from prism_lightning.model.schedule import LR_SCHEDULES


def check_module_settings(settings: dict) -> None:
    """Value ranges of PrismModule's settings, checked at construction so a bad value fails before the
    bootstrap starts (the model-dependent checks are in :func:`check_against_model`)."""
    s = settings
    require(s["gate_layer"] >= 0, f"model.gate_layer must be >= 0, got {s['gate_layer']}.")
    require(s["lora_rank"] >= 1, f"model.lora_rank must be >= 1, got {s['lora_rank']}.")
    require(s["lora_alpha"] > 0, f"model.lora_alpha must be > 0, got {s['lora_alpha']}.")
    for key in ("lora_dropout", "gate_dropout", "warmup_ratio"):
        require(0.0 <= s[key] < 1.0, f"model.{key} must be in [0, 1), got {s[key]}.")
    require(len(s["lora_target_modules"]) > 0, "model.lora_target_modules is empty; name at least one.")
    hidden = s["gate_hidden"]
    require(all(int(h) >= 1 for h in hidden), f"model.gate_hidden widths must be >= 1, got {hidden}.")
    for key in ("gate_lr", "lora_lr", "kl_temperature"):
        require(s[key] > 0, f"model.{key} must be > 0, got {s[key]}.")
    for key in ("weight_decay", "retain_weight", "predict_temperature"):
        require(s[key] >= 0, f"model.{key} must be >= 0, got {s[key]}.")
    chunk = s["kl_chunk_positions"]
    require(chunk >= 0, f"model.kl_chunk_positions must be >= 0 (0: full logits), got {chunk}.")
    require(0.0 < s["threshold"] < 1.0, f"model.threshold must be in (0, 1), got {s['threshold']}.")
    top_p = s["predict_top_p"]
    require(0.0 < top_p <= 1.0, f"model.predict_top_p must be in (0, 1], got {top_p}.")
    for key in ("predict_max_new_tokens", "predict_batch_size"):
        require(s[key] >= 1, f"model.{key} must be >= 1, got {s[key]}.")
    choices = {"lr_schedule": LR_SCHEDULES, "predict_mode": MODES}
    for key, allowed in choices.items():
        require(s[key] in allowed, f"Unknown model.{key} {s[key]!r}; choose one of {', '.join(allowed)}.")


def check_against_model(settings: dict, backbone: BackboneConfig) -> None:
    """Gate layer and LoRA targets against the model's own config, without loading its weights (a
    meta-device copy lists the module names), so a typo fails in seconds, not after the bootstrap."""
    from prism_lightning.backbone import meta_model

    validate_routing_setup(meta_model(backbone), settings["gate_layer"], settings["lora_target_modules"])
