"""Export a trained PrismModule to ``<out>/{adapter/, gate.safetensors, prism.json}`` and load it back.

The adapter is plain peft (``PeftModel.from_pretrained(base, out / "adapter")`` works without this
package); the gate is safetensors; PRISM's own settings are JSON. No pickles.

K-way runs (``model.adapters``) write ``adapters/<name>/`` instead of ``adapter/``, one plain peft
adapter per group (``PeftModel.from_pretrained(base, out / "adapters" / name)`` loads any one alone),
a (K+1)-way gate, and ``adapters: {name: [persona, ...]}`` in prism.json (format version 2).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from prism_lightning.backbone import BackboneConfig, public_model_name
from prism_lightning.errors import PrismError
from prism_lightning.files import sha256_file
from prism_lightning.model.checkpoint_meta import (
    META_DIGEST,
    CheckpointError,
    check_digest,
    check_gate_shapes,
    check_meta,
    meta_digest,
)
from prism_lightning.model.fingerprint import check_weight_fingerprint, weight_fingerprint
from prism_lightning.model.gate import Gate
from prism_lightning.run_paths import ADAPTER_DIR, ADAPTERS_DIR, GATE_FILE, PRISM_JSON  # importable from here

FORMAT_VERSION = 2  # what this version reads; single-adapter exports are still written as 1
KWAY_FORMAT_VERSION = 2


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
    trainable_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write adapter + gate + prism.json atomically (temporary sibling directory, then rename).

    ``trainable_state``: the module's adapter + gate tensors, gathered whole (keys ``model.*`` and
    ``gate.*``, see ``sharding.trainable_state_dict``); needed when the module is sharded, whose own
    parameters are only this rank's shards. Default: the module's own weights.
    """
    from safetensors.torch import save_file

    module._require_model()
    groups = getattr(module, "adapter_groups", None)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if trainable_state is None:
            from prism_lightning.model.sharding import is_sharded

            if is_sharded(module):
                raise ValueError(
                    "export_checkpoint of a sharded module needs trainable_state: call "
                    "sharding.trainable_state_dict(module) on every rank and pass rank 0's result."
                )
            adapter_state = None
            gate_state = module.gate.state_dict()
        else:
            adapter_state = {k[6:]: v for k, v in trainable_state.items() if k.startswith("model.")}
            gate_state = {k[5:]: v for k, v in trainable_state.items() if k.startswith("gate.")}
        public = public_model_name(module.backbone_name)
        if groups:
            for name in groups:  # one plain peft directory per adapter
                _save_one_adapter(module.model, tmp / ADAPTERS_DIR, name, adapter_state)
                _record_public_base_name(tmp / ADAPTERS_DIR / name, public)
        else:
            extra = {} if adapter_state is None else {"state_dict": adapter_state}
            module.model.save_pretrained(tmp / ADAPTER_DIR, **extra)
            _record_public_base_name(tmp / ADAPTER_DIR, public)
        gate_state = {k: v.detach().cpu().contiguous() for k, v in gate_state.items()}
        save_file(gate_state, str(tmp / GATE_FILE))
        hp = module.hparams
        meta = {
            "format_version": KWAY_FORMAT_VERSION if groups else 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "base_model": {
                "name": module.backbone_name,
                "source": module.backbone_source,
                "backbone": _backbone_dict(module.backbone_config),
                "fingerprint": base_fingerprint(module.base_model.config),
                # taken before sharding (a sharded rank holds only slices of the embedding)
                "weights": getattr(module, "base_weights_fingerprint", None)
                or weight_fingerprint(module.base_model),
            },
            "gate_layer": int(hp.gate_layer),
            "gate_hidden": [int(h) for h in hp.gate_hidden],
            "gate_dropout": float(hp.gate_dropout),
            "threshold": float(hp.threshold),
            "adapter_name": "default",
            "personas": list(personas),
            **({"adapters": {k: list(v) for k, v in groups.items()}} if groups else {}),
            "training_config": training_config if training_config is not None else module.training_config(),
            "bootstrap_summary": bootstrap_summary,
            "files": _file_hashes(tmp),
        }
        meta = json.loads(json.dumps(meta, default=str))  # the digest covers what the file holds
        meta[META_DIGEST] = meta_digest(meta)
        (tmp / PRISM_JSON).write_text(json.dumps(meta, indent=2))
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


def _save_one_adapter(model, root: Path, name: str, state: dict[str, torch.Tensor] | None) -> None:
    """``root/<name>/`` with adapter ``name`` alone: peft writes a non-default adapter to a sub-folder of
    its name, so the folder is a complete plain peft adapter."""
    extra = {}
    if state is not None:  # gathered tensors of every adapter: peft picks this adapter's keys
        extra["state_dict"] = state
    model.save_pretrained(root, selected_adapters=[name], **extra)
    if not (root / name / "adapter_config.json").is_file():
        raise RuntimeError(f"peft did not write adapter {name!r} to {root / name}.")


def _record_public_base_name(adapter_dir: Path, name: str) -> None:
    """peft writes the local path the base was loaded from; another machine needs its public name."""
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = name
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every weight and adapter file, checked again at load time (prism.json carries its own
    digest, ``meta_sha256``)."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != PRISM_JSON
    }


def read_meta(path: str | Path) -> dict:
    """prism.json of an exported run; a missing or unreadable one is a :class:`CheckpointError`."""
    path = Path(path)
    if path.is_file():
        raise CheckpointError(f"checkpoint {path} is a file; give the directory written by `fit`.")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist (expected a directory written by `fit`).")
    meta_path = path / PRISM_JSON
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a PRISM checkpoint (no {PRISM_JSON}).")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path} is damaged ({exc}); export the run again.") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} is damaged (not a JSON object); export the run again.")
    version = meta.get("format_version", 0)
    if isinstance(version, int) and version > FORMAT_VERSION:  # before the digest: a newer file's rules
        raise CheckpointError(
            f"{path} has checkpoint format {meta['format_version']}; "
            f"this version reads up to {FORMAT_VERSION}: upgrade prism_lightning."
        )
    check_digest(meta, meta_path)
    missing = [k for k in ("base_model", "gate_layer", "gate_hidden", "threshold") if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_path} lacks {', '.join(missing)}; export the run again.")
    check_meta(meta, meta_path)
    return meta


def verify_checkpoint(path: str | Path) -> dict:
    """prism.json after checking every file the load needs, before any model is loaded: present,
    readable, and (checkpoints since the file hashes were added) unchanged since export."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    meta = read_meta(path)
    adapters = meta.get("adapters")
    configs = [f"{ADAPTERS_DIR}/{n}/adapter_config.json" for n in adapters] if adapters else None
    needed = [GATE_FILE, *(configs or [f"{ADAPTER_DIR}/adapter_config.json"])]
    recorded = meta.get("files") or {}
    for name in sorted(set(needed) | set(recorded)):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} has no {name}; export the run again.")
    for name, digest in recorded.items():
        if sha256_file(path / name) != digest:
            raise CheckpointError(
                f"{path / name} differs from the file that was exported (sha256 mismatch): it is damaged; "
                "export the run again."
            )
    adapter_files = sorted((path / (ADAPTERS_DIR if adapters else ADAPTER_DIR)).rglob("*.safetensors"))
    shapes: dict[Path, dict[str, tuple[int, ...]]] = {}
    for file in [path / GATE_FILE, *adapter_files]:
        try:
            with safe_open(str(file), framework="pt") as fh:
                keys = fh.keys()
                shapes[file] = {key: tuple(fh.get_slice(key).get_shape()) for key in keys}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{file} is damaged ({exc}); export the run again.") from None
    check_gate_shapes(meta, shapes[path / GATE_FILE], path / GATE_FILE)
    return meta


def load_checkpoint(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    backbone_override: BackboneConfig | None = None,
    check_weights: bool = True,
    merge_weights: bool = False,
):
    """Load base model (from prism.json unless overridden) + adapter + gate into a RoutedModel.

    The base must be the one the checkpoint was trained on: same architecture and, for checkpoints that
    recorded it, the same weights (a fingerprint of a few embedding rows and the first layer), so an
    adapter trained on one model never loads silently onto a fine-tune of the same shape.
    ``check_weights=False`` skips the weight check (on purpose, e.g. a re-quantised copy).
    ``merge_weights=True`` serves batches routed all on with merged weights (see
    :meth:`RoutingController.use_merged_weights`)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from prism_lightning.model.inference import RoutedModel

    path = Path(path)
    meta = verify_checkpoint(path)
    groups = meta.get("adapters")
    if groups and merge_weights:
        raise CheckpointError("merge_weights serves one adapter; a K-way checkpoint keeps its adapters.")
    cfg = backbone_override or BackboneConfig(**meta["base_model"]["backbone"])
    bb = cfg.load(device=device)
    expected = meta["base_model"]["fingerprint"]
    got = base_fingerprint(bb.model.config)
    if expected != got:
        raise CheckpointMismatchError(
            f"Checkpoint {path} was trained on {meta['base_model']['name']!r} ({expected}), "
            f"but you loaded {cfg.model!r} ({got}). Load the base model it was trained on."
        )
    from prism_lightning.model.routing import decoder_layers

    n_layers = len(decoder_layers(bb.model))
    if not meta["gate_layer"] < n_layers - 1:  # when prism.json records no layer count to check it
        raise CheckpointMismatchError(
            f"{path / PRISM_JSON}: gate_layer {meta['gate_layer']} does not fit {cfg.model!r}, which has "
            f"{n_layers} decoder layers (the gate must sit below the last one); load the base model it "
            "was trained on."
        )
    if check_weights:
        check_weight_fingerprint(
            meta["base_model"].get("weights"),
            bb.model,
            checkpoint=str(path),
            override="load_checkpoint(..., check_weights=False)",
        )
    # Keep the adapter in the base model's dtype: peft would otherwise upcast a bf16 model's adapter
    # to fp32 (for training stability), and every LoRA matmul would run in fp32 with casts around it.
    if groups:
        names = list(groups)
        model = PeftModel.from_pretrained(
            bb.model, path / ADAPTERS_DIR / names[0], adapter_name=names[0], autocast_adapter_dtype=False
        )
        for name in names[1:]:
            model.load_adapter(path / ADAPTERS_DIR / name, adapter_name=name, autocast_adapter_dtype=False)
    else:
        model = PeftModel.from_pretrained(
            bb.model,
            path / ADAPTER_DIR,
            adapter_name=meta.get("adapter_name", "default"),
            autocast_adapter_dtype=False,
        )
    model.eval()
    extra = {"n_classes": len(groups) + 1} if groups else {}
    gate = Gate(bb.hidden_size, meta["gate_hidden"], dropout=meta.get("gate_dropout", 0.1), **extra)
    try:
        gate.load_state_dict(load_file(str(path / GATE_FILE)))
    except RuntimeError as exc:  # shapes prism.json could not check (it records no hidden size)
        first = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{path / GATE_FILE} does not fit {cfg.model!r} ({first}).") from None
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
        merge_weights=merge_weights,
        adapter_names=list(groups) if groups else None,
    )
