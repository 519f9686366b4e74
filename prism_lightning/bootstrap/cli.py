"""``python -m prism_lightning bootstrap``: run (or reuse) every bootstrap stage and print the summary.

It parses exactly what ``fit`` parses (the same YAML files, ``--data.bootstrap.*``,
``--model.backbone.*``, ``--trainer.devices`` ...), so a ``bootstrap`` followed by a ``fit`` with the
same arguments finds every stage cached.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from prism_lightning.backbone import BackboneConfig
from prism_lightning.bootstrap.config import BootstrapConfig


def trainer_kwargs_from(trainer) -> dict[str, Any]:
    """The predict Trainers get the fit's devices; a strategy object (FSDP) falls back to Lightning's
    default, which is DDP for several devices: generation needs no sharding of a frozen model."""
    strategy = trainer.strategy if isinstance(trainer.strategy, str) else "auto"
    return {
        "accelerator": trainer.accelerator,
        "devices": trainer.devices,
        "strategy": strategy,
        "num_nodes": trainer.num_nodes,
    }


def bootstrap_main(argv: Sequence[str] | None = None) -> int:
    from prism_lightning.bootstrap.runner import format_summary, run_bootstrap
    from prism_lightning.bootstrap.stage import global_rank
    from prism_lightning.lightning_cli import parse_config

    cfg = parse_config("bootstrap", list(sys.argv[1:] if argv is None else argv))
    data = cfg.data
    bootstrap = BootstrapConfig(**data.bootstrap.as_dict())
    backbone = BackboneConfig(**data.backbone.as_dict())
    result = run_bootstrap(bootstrap, backbone, data.run_dir, trainer_kwargs_from(cfg.trainer))
    if global_rank() == 0:
        print(format_summary(result.summary))
        print(f"summary: {result.summary_path}")
    return 0
