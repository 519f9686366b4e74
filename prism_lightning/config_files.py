"""Where the shipped configs are, and the rule that a command with no ``--config`` takes the default."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def package_configs_dir() -> Path:
    """The configs inside the installed package (``configs/`` at the top of a checkout links here), so
    ``fit`` works from any directory after a plain ``pip install``."""
    return Path(__file__).resolve().parent / "configs"


def with_default_config(args: Sequence[str]) -> list[str]:
    """A command with no --config takes the embedded default, ``configs/default.yaml``."""
    has_config = any(a in ("-c", "--config") or a.startswith("--config=") for a in args)
    if not has_config and "--help" not in args and "-h" not in args:
        return ["--config", str(package_configs_dir() / "default.yaml"), *args]
    return list(args)
