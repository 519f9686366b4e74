"""What an exported ``prism.json`` must hold, checked when it is read, before any model loads.

Every value the load uses is read back from this file, so a hand edit or another tool's bug would
otherwise surface deep in the model code (an index error in the decoder stack, a shape error in the
gate) or, worse, load silently (a negative gate layer reads the last layer). Two checks:

* the file's own digest: export records ``meta_sha256``, the sha256 of the file's content without that
  key (keys sorted, compact separators: it follows what the file says, not its indentation), so an
  edited prism.json is refused like an edited adapter. Checkpoints exported before the digest existed
  have no such key and load as before (the same rule as the per-file hashes of ``files``);
* every value's type and range, and the gate layer and the gate file's shapes against the recorded
  architecture (hidden size, number of decoder layers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any

from prism_lightning.errors import ConfigError, PrismError

META_DIGEST = "meta_sha256"


class CheckpointError(PrismError, ValueError):
    """A checkpoint directory that is missing, incomplete or damaged."""


def meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of prism.json's content without its own digest key."""
    body = {k: v for k, v in meta.items() if k != META_DIGEST}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_digest(meta: dict[str, Any], where: Path) -> None:
    """Refuse a prism.json whose content no longer matches the digest recorded in it."""
    recorded = meta.get(META_DIGEST)
    if recorded is not None and recorded != meta_digest(meta):
        raise CheckpointError(
            f"{where} differs from the prism.json that was exported (sha256 mismatch): it was edited or "
            "damaged; export the run again (routing settings such as the threshold are command options)."
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def check_meta(meta: dict[str, Any], where: Path) -> None:
    """Types and ranges of every prism.json value the load reads, and the gate layer against the
    recorded number of decoder layers; a :class:`CheckpointError` naming the key otherwise."""
    from prism_lightning.backbone import BackboneConfig

    def refuse(key: str, expected: str) -> None:
        value = _lookup(meta, key)
        raise CheckpointError(f"{where}: {key} is {value!r}, expected {expected}; export the run again.")

    if "format_version" in meta and not _is_int(meta["format_version"]):
        refuse("format_version", "a whole number")
    base = meta["base_model"]
    if not isinstance(base, dict):
        refuse("base_model", "a mapping")
    if not isinstance(base.get("name"), str):
        refuse("base_model.name", "the model's name")
    backbone = base.get("backbone")
    if not isinstance(backbone, dict) or not isinstance(backbone.get("model"), str):
        refuse("base_model.backbone", "a mapping with the model's id")
    known = {f.name for f in dataclasses.fields(BackboneConfig)}
    unknown = sorted(set(backbone) - known)
    if unknown:
        raise CheckpointError(
            f"{where}: base_model.backbone has setting(s) {', '.join(unknown)} this version does not know "
            f"(it knows {', '.join(sorted(known))}); export the run again or upgrade prism_lightning."
        )
    fingerprint = base.get("fingerprint")
    if not isinstance(fingerprint, dict):
        refuse("base_model.fingerprint", "a mapping")
    layer = meta["gate_layer"]
    if not _is_int(layer) or layer < 0:
        refuse("gate_layer", "a decoder layer index >= 0")
    n_layers = fingerprint.get("num_hidden_layers")
    if _is_int(n_layers) and layer >= n_layers - 1:
        layers = f"the base model has {n_layers} decoder layers and LoRA needs one above the gate"
        refuse("gate_layer", f"< {n_layers - 1} ({layers})")
    if not isinstance(meta["gate_hidden"], list) or not all(
        _is_int(h) and h >= 1 for h in meta["gate_hidden"]
    ):
        refuse("gate_hidden", "a list of layer widths >= 1")
    if "gate_dropout" in meta and not (_is_number(meta["gate_dropout"]) and 0 <= meta["gate_dropout"] < 1):
        refuse("gate_dropout", "a number in [0, 1)")
    if not (_is_number(meta["threshold"]) and 0 < meta["threshold"] < 1):
        refuse("threshold", "a number in (0, 1)")
    if "adapter_name" in meta and not (isinstance(meta["adapter_name"], str) and meta["adapter_name"]):
        refuse("adapter_name", "a non-empty name")
    if "personas" in meta and not _str_list(meta["personas"]):
        refuse("personas", "a list of persona names")
    for key in ("training_config", "bootstrap_summary"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            refuse(key, "a mapping or null")
    _check_adapters(meta, where, refuse)
    files = meta.get("files")
    if files is not None and not (
        isinstance(files, dict) and all(isinstance(v, str) and _inside(k) for k, v in files.items())
    ):
        refuse("files", "a mapping of relative file names to sha256 digests")


def _check_adapters(meta: dict[str, Any], where: Path, refuse) -> None:
    """K-way: ``adapters`` maps usable adapter names (they name directories) to persona lists."""
    from prism_lightning.model.kway import check_adapter_groups

    if "adapters" not in meta:
        return
    adapters = meta["adapters"]
    if not isinstance(adapters, dict) or not all(_str_list(v) for v in adapters.values()):
        refuse("adapters", "a mapping of adapter names to persona lists")
    try:
        check_adapter_groups(adapters)
    except ConfigError as err:
        raise CheckpointError(f"{where}: {err} Export the run again.") from None


def _inside(name: Any) -> bool:
    """A relative path that stays inside the checkpoint directory."""
    if not isinstance(name, str) or not name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts


def _lookup(meta: dict[str, Any], key: str) -> Any:
    value: Any = meta
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def check_gate_shapes(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], gate_file: Path) -> None:
    """The gate file's tensors against the gate prism.json describes (recorded hidden size, gate_hidden,
    number of adapters), so a mismatch fails before the model loads, not in ``load_state_dict``."""
    import torch

    from prism_lightning.model.gate import Gate

    hidden = meta["base_model"]["fingerprint"].get("hidden_size")
    if not _is_int(hidden) or hidden < 1:
        return
    adapters = meta.get("adapters")
    with torch.device("meta"):
        gate = Gate(hidden, meta["gate_hidden"], n_classes=len(adapters) + 1 if adapters else 1)
    expected = {k: tuple(v.shape) for k, v in gate.state_dict().items()}
    if shapes != expected:
        differ = sorted(k for k in set(shapes) | set(expected) if shapes.get(k) != expected.get(k))
        name = differ[0]
        raise CheckpointError(
            f"{gate_file} does not fit prism.json's gate (hidden size {hidden}, gate_hidden "
            f"{meta['gate_hidden']}): {name} is {shapes.get(name, 'missing')}, expected "
            f"{expected.get(name, 'no such tensor')}; export the run again."
        )
