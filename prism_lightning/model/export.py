"""Export a trained PrismModule to ``<out>/{adapter/, gate.safetensors, prism.json}`` and load it back.

The adapter is plain peft (``PeftModel.from_pretrained(base, out / "adapter")`` works without this
package); the gate is safetensors; PRISM's own settings are JSON. No pickles.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from prism_lightning.backbone import BackboneConfig
from prism_lightning.errors import PrismError
from prism_lightning.model.gate import Gate

FORMAT_VERSION = 1
PRISM_JSON = "prism.json"
GATE_FILE = "gate.safetensors"
ADAPTER_DIR = "adapter"


class CheckpointMismatchError(PrismError, ValueError):
    """The loaded base model is not the one the checkpoint was trained on."""


def base_fingerprint(config) -> dict:
    return {
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": getattr(config, "vocab_size", None),
    }


def _backbone_dict(cfg: BackboneConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


def export_checkpoint(
    module,
    out_dir: str | Path,
    *,
    personas: list[str],
    bootstrap_summary: dict | None = None,
    training_config: dict | None = None,
) -> Path:
    """Write adapter + gate + prism.json atomically (temporary sibling directory, then rename)."""
    from safetensors.torch import save_file

    module._require_model()
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        module.model.save_pretrained(tmp / ADAPTER_DIR)
        gate_state = {k: v.detach().cpu().contiguous() for k, v in module.gate.state_dict().items()}
        save_file(gate_state, str(tmp / GATE_FILE))
        hp = module.hparams
        meta = {
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "base_model": {
                "name": module.backbone_name,
                "source": module.backbone_source,
                "backbone": _backbone_dict(module.backbone_config),
                "fingerprint": base_fingerprint(module.base_model.config),
            },
            "gate_layer": int(hp.gate_layer),
            "gate_hidden": [int(h) for h in hp.gate_hidden],
            "gate_dropout": float(hp.gate_dropout),
            "threshold": float(hp.threshold),
            "adapter_name": "default",
            "personas": list(personas),
            "training_config": training_config if training_config is not None else module.training_config(),
            "bootstrap_summary": bootstrap_summary,
        }
        (tmp / PRISM_JSON).write_text(json.dumps(meta, indent=2, default=str))
        if out.exists():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_path = path / PRISM_JSON
    if not meta_path.exists():
        raise FileNotFoundError(f"{path} is not a PRISM checkpoint (no {PRISM_JSON}).")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format {meta['format_version']}; "
            f"this version reads up to {FORMAT_VERSION}."
        )
    return meta


def load_checkpoint(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    backbone_override: BackboneConfig | None = None,
):
    """Load base model (from prism.json unless overridden) + adapter + gate into a RoutedModel."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from prism_lightning.model.inference import RoutedModel

    path = Path(path)
    meta = read_meta(path)
    cfg = backbone_override or BackboneConfig(**meta["base_model"]["backbone"])
    bb = cfg.load(device=device)
    expected = meta["base_model"]["fingerprint"]
    got = base_fingerprint(bb.model.config)
    if expected != got:
        raise CheckpointMismatchError(
            f"Checkpoint {path} was trained on {meta['base_model']['name']!r} ({expected}), "
            f"but you loaded {cfg.model!r} ({got}). Load the base model it was trained on."
        )
    # Keep the adapter in the base model's dtype: peft would otherwise upcast a bf16 model's adapter
    # to fp32 (for training stability), and every LoRA matmul would run in fp32 with casts around it.
    model = PeftModel.from_pretrained(
        bb.model,
        path / ADAPTER_DIR,
        adapter_name=meta.get("adapter_name", "default"),
        autocast_adapter_dtype=False,
    )
    model.eval()
    gate = Gate(bb.hidden_size, meta["gate_hidden"], dropout=meta.get("gate_dropout", 0.1))
    gate.load_state_dict(load_file(str(path / GATE_FILE)))
    gate.to(next(model.parameters()).device).eval()
    return RoutedModel(
        model,
        bb.tokenizer,
        bb.formatter,
        gate,
        gate_layer=meta["gate_layer"],
        threshold=meta["threshold"],
        adapter_name=meta.get("adapter_name", "default"),
        meta=meta,
    )
