"""Reproduction presets (``presets.yaml``): one model's fit configs, evaluate and study options, and whose
published numbers its table shows. A preset is named by its key, or given as a YAML file of one preset."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from prism_lightning.config_files import package_configs_dir
from prism_lightning.errors import ConfigError

__all__ = ["PRESETS_FILE", "STEPS", "Preset", "load_preset", "preset_names"]

PRESETS_FILE = Path(__file__).with_name("presets.yaml")
#: The steps of a reproduction, in order.
STEPS: tuple[str, ...] = ("bootstrap", "fit", "evaluate", "study", "report")
_KEYS = {
    "model", "paper_model", "paper_label", "fit_configs", "fit_args", "evaluate", "study", "steps", "shape",
}  # fmt: skip


@dataclass(frozen=True)
class Preset:
    """One model's reproduction: what each step is given (see ``presets.yaml`` for the keys)."""

    name: str
    model: str
    paper_model: str
    paper_label: str
    fit_configs: tuple[Path, ...] = ()
    fit_args: tuple[str, ...] = ()
    evaluate: tuple[str, ...] = ()
    study: tuple[str, ...] = ()
    steps: tuple[str, ...] = STEPS
    shape: dict = field(default_factory=dict)

    @property
    def trains(self) -> bool:
        return "fit" in self.steps


def _presets() -> dict[str, dict]:
    return yaml.safe_load(PRESETS_FILE.read_text(encoding="utf-8"))["presets"]


def preset_names() -> list[str]:
    """The built-in presets' names, in file order."""
    return list(_presets())


def _config_path(name: str, base: Path | None) -> Path:
    p = Path(name).expanduser()
    for cand in ([p] if p.is_absolute() else []) + ([base / p] if base else []) + [package_configs_dir() / p]:
        if cand.is_file():
            return cand
    where = f"{base} and " if base else ""
    raise ConfigError(f"preset fit config {name} not found (looked in {where}the package's configs/).")


def _build(name: str, raw: object, base: Path | None) -> Preset:
    if not isinstance(raw, dict):
        raise ConfigError(f"preset {name}: expected a mapping of {', '.join(sorted(_KEYS))}.")
    unknown = set(raw) - _KEYS
    if unknown:
        bad, valid = ", ".join(sorted(unknown)), ", ".join(sorted(_KEYS))
        raise ConfigError(f"preset {name}: unknown key(s) {bad}; valid: {valid}.")
    for key in ("model", "paper_model"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(f"preset {name}: `{key}` is required (a string).")
    steps = tuple(raw.get("steps") or STEPS)
    bad = [s for s in steps if s not in STEPS]
    if bad:
        raise ConfigError(f"preset {name}: unknown step(s) {', '.join(bad)}; choose from {', '.join(STEPS)}.")
    steps = tuple(s for s in STEPS if s in steps)  # always in pipeline order
    if "fit" in steps and not raw.get("fit_configs"):
        raise ConfigError(f"preset {name}: a preset that trains needs `fit_configs`.")
    lists = {k: tuple(str(a) for a in (raw.get(k) or ())) for k in ("fit_args", "evaluate", "study")}
    return Preset(
        name=name,
        model=raw["model"],
        paper_model=raw["paper_model"],
        paper_label=str(raw.get("paper_label") or f"the paper's {raw['paper_model']} numbers"),
        fit_configs=tuple(_config_path(str(c), base) for c in raw.get("fit_configs") or ()),
        steps=steps,
        shape=dict(raw.get("shape") or {}),
        **lists,
    )


def load_preset(name_or_file: str) -> Preset:
    """A built-in preset by name, or a preset YAML file (one preset's keys at the top level); a
    ConfigError names the valid presets otherwise."""
    presets = _presets()
    if name_or_file in presets:
        return _build(name_or_file, presets[name_or_file], None)
    path = Path(name_or_file).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"preset file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        return _build(path.stem, raw, path.parent)
    raise ConfigError(
        f"unknown preset {name_or_file!r}; choose from {', '.join(presets)}, or give a preset YAML file."
    )
