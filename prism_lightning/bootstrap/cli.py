"""``python -m prism_lightning bootstrap``: run (or reuse) every bootstrap stage and print the summary.

Options: ``--config`` (the same YAML as ``fit``: ``data.run_dir``, ``data.bootstrap``,
``model.backbone`` (or ``data.backbone``) and ``trainer.devices|accelerator|strategy`` are read when
present), then ``--run_dir``, ``--bootstrap.*``, ``--backbone.*``, ``--trainer.devices``,
``--trainer.accelerator``, ``--trainer.strategy`` override it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from prism_lightning.backbone import BackboneConfig
from prism_lightning.bootstrap.config import BootstrapConfig

TRAINER_KEYS = ("devices", "accelerator", "strategy", "num_nodes")


def add_bootstrap_arguments(parser) -> None:
    """Add the bootstrap's options to a jsonargparse ``ArgumentParser``."""
    parser.add_argument(
        "--config", type=str | None, default=None, help="fit-style YAML (data/model/trainer keys)"
    )
    parser.add_argument("--run_dir", type=str, default="runs/default", help="root of the run's artifacts")
    parser.add_class_arguments(BootstrapConfig, "bootstrap")
    parser.add_class_arguments(BackboneConfig, "backbone")
    parser.add_argument("--trainer.devices", type=int | str, default=1)
    parser.add_argument("--trainer.accelerator", type=str, default="auto")
    parser.add_argument("--trainer.strategy", type=str, default="auto")
    parser.add_argument("--trainer.num_nodes", type=int, default=1)


def _config_path(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and not (prefix.endswith(".judge")):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value


def defaults_from_config(path: str | Path) -> dict[str, Any]:
    """Dotted defaults read from a fit-style YAML."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: top level must be a mapping")
    section = lambda name: data.get(name) if isinstance(data.get(name), Mapping) else {}  # noqa: E731
    d, m, t = section("data"), section("model"), section("trainer")
    # a data module given as {class_path, init_args} (LightningCLI style)
    if "init_args" in d:
        d = d["init_args"] or {}
    if "init_args" in m:
        m = m["init_args"] or {}
    out: dict[str, Any] = {}
    if "run_dir" in d:
        out["run_dir"] = d["run_dir"]
    if isinstance(d.get("bootstrap"), Mapping):
        _flatten("bootstrap", d["bootstrap"], out)
    backbone = m.get("backbone") or d.get("backbone")
    if isinstance(backbone, Mapping):
        _flatten("backbone", backbone, out)
    for key in TRAINER_KEYS:
        if key in t:
            out[f"trainer.{key}"] = t[key]
    return out


def bootstrap_main(argv: Sequence[str] | None = None) -> int:
    from jsonargparse import ArgumentParser

    from prism_lightning.bootstrap.runner import format_summary, run_bootstrap
    from prism_lightning.bootstrap.stage import global_rank

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ArgumentParser(prog="python -m prism_lightning bootstrap", description=__doc__)
    add_bootstrap_arguments(parser)
    config_path = _config_path(argv)
    if config_path:
        parser.set_defaults(defaults_from_config(config_path))
    args = parser.parse_args(argv)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    init = instantiate(args)
    bootstrap, backbone = init.bootstrap, init.backbone
    if isinstance(bootstrap.judge, Mapping):
        bootstrap.judge = BackboneConfig(**bootstrap.judge)
    devices = args.trainer.devices
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    trainer_kwargs = {
        "devices": devices,
        "accelerator": args.trainer.accelerator,
        "strategy": args.trainer.strategy,
        "num_nodes": args.trainer.num_nodes,
    }
    result = run_bootstrap(bootstrap, backbone, args.run_dir, trainer_kwargs)
    if global_rank() == 0:
        print(format_summary(result.summary))
        print(f"summary: {result.summary_path}")
    return 0
