"""``python -m prism_lightning bootstrap``: run (or reuse) every bootstrap stage and print the summary.

It parses exactly what ``fit`` parses (the same YAML files, ``--data.bootstrap.*``,
``--model.backbone.*``, ``--trainer.devices`` ...), so a ``bootstrap`` followed by a ``fit`` with the
same arguments finds every stage cached.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from prism_lightning.backbone import BackboneConfig
from prism_lightning.bootstrap.config import BootstrapConfig


def bootstrap_main(argv: Sequence[str] | None = None) -> int:
    from prism_lightning.bootstrap.runner import run_bootstrap
    from prism_lightning.bootstrap.stage import global_rank
    from prism_lightning.bootstrap.summary import format_summary
    from prism_lightning.lightning_cli import parse_config, trainer_kwargs_from
    from prism_lightning.model.checks import check_against_model, check_module_settings

    cfg = parse_config("bootstrap", list(sys.argv[1:] if argv is None else argv))
    data = cfg.data
    bootstrap = BootstrapConfig(**data.bootstrap.as_dict())
    backbone = BackboneConfig(**data.backbone.as_dict())
    # the model settings that fit will use are checked now, so fit cannot fail on them after this work
    model_settings = cfg.model.as_dict()
    check_module_settings(model_settings)
    check_against_model(model_settings, backbone)
    result = run_bootstrap(bootstrap, backbone, data.run_dir, trainer_kwargs_from(cfg.trainer))
    if global_rank() == 0:
        print(format_summary(result.summary))
        print(f"summary: {result.summary_path}")
    return 0
