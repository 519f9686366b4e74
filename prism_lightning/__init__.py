"""PRISM on PyTorch Lightning: persona routing via intent-based self-modeling.

The public Python API (imported lazily, so ``python -m prism_lightning --help`` stays fast)::

    from prism_lightning import load_checkpoint
    routed = load_checkpoint("checkpoints/default")
    out = routed.generate(["Write a haiku about rain."])[0]   # .text, .route, .gate_prob

    import lightning as L
    from prism_lightning import PrismDataModule, PrismExport, PrismModule
    L.Trainer(max_epochs=6, callbacks=[PrismExport("checkpoints/mine")]).fit(
        PrismModule(), PrismDataModule(run_dir="runs/mine"))   # bootstraps, trains, exports
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "BackboneConfig": "prism_lightning.backbone",
    "BootstrapConfig": "prism_lightning.bootstrap.config",
    "run_bootstrap": "prism_lightning.bootstrap.runner",
    "PrismDataModule": "prism_lightning.data.datamodule",
    "PrismModule": "prism_lightning.model.module",
    "PrismExport": "prism_lightning.callbacks",
    "export_checkpoint": "prism_lightning.model.export",
    "load_checkpoint": "prism_lightning.model.export",
    "verify_checkpoint": "prism_lightning.model.export",
    "RoutedModel": "prism_lightning.model.inference",
    "SamplingConfig": "prism_lightning.generation",
    "PrismError": "prism_lightning.errors",
}
__all__ = [
    "BackboneConfig",
    "BootstrapConfig",
    "PrismDataModule",
    "PrismError",
    "PrismExport",
    "PrismModule",
    "RoutedModel",
    "SamplingConfig",
    "__version__",
    "export_checkpoint",
    "load_checkpoint",
    "run_bootstrap",
    "verify_checkpoint",
]

if TYPE_CHECKING:
    from prism_lightning.backbone import BackboneConfig
    from prism_lightning.bootstrap.config import BootstrapConfig
    from prism_lightning.bootstrap.runner import run_bootstrap
    from prism_lightning.callbacks import PrismExport
    from prism_lightning.data.datamodule import PrismDataModule
    from prism_lightning.errors import PrismError
    from prism_lightning.generation import SamplingConfig
    from prism_lightning.model.export import export_checkpoint, load_checkpoint, verify_checkpoint
    from prism_lightning.model.inference import RoutedModel
    from prism_lightning.model.module import PrismModule


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'prism_lightning' has no attribute {name!r}")
