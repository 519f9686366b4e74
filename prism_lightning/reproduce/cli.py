"""``python -m prism_lightning reproduce --preset NAME [--limit N] [--run_dir D]``: the paper's pipeline
for one model in one command (bootstrap -> fit -> evaluate -> study -> report, each resumable), then the
published numbers beside this run's.

Everything lands in one run directory (default ``runs/reproduce-<preset>``)::

    D/run/          fit's data.run_dir: bootstrap stages, Lightning checkpoints, W&B files
    D/checkpoint/   the exported PRISM checkpoint
    D/eval/         evaluate: items, summary.json/csv        D/study/  the persona-effect grid
    D/report/       figures and report.md                    D/comparison.md, comparison.json
    D/reproduce.json  which steps finished with which arguments (what a rerun skips)

Rerunning the same command resumes: finished steps are skipped, a killed one picks up its partial work.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from prism_lightning import files
from prism_lightning.errors import ConfigError
from prism_lightning.reproduce.compare import compare, format_table, paper_numbers
from prism_lightning.reproduce.presets import Preset, load_preset, preset_names
from prism_lightning.reproduce.steps import adapter_conditions, build_plan, run_steps
from prism_lightning.settings_args import (
    HelpFormatter,
    add_dataclass_arguments,
    flag,
    settings_from_namespace,
)

__all__ = ["ReproduceSettings", "reproduce_command", "reproduce_main", "validate_preset"]


def _at_least_one(flag: str, meaning: str):
    """A converter for ``--<flag>``: a whole number >= 1, else a ConfigError saying what the flag counts."""

    def convert(text: str | int) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"--{flag} must be a whole number >= 1, got {text!r}.") from None
        if value < 1:
            raise ConfigError(f"--{flag} must be >= 1 ({meaning}), got {value}.")
        return value

    return convert


_seeds = _at_least_one("seeds", "training seeds")
_limit_value = _at_least_one("limit", "items per sub-score group")


def _limit(text: str | int | None) -> int | None:
    """``--limit`` as a whole number >= 1, or None: the full sizes."""
    return None if text is None else _limit_value(text)


def _extra_seeds(preset: Preset, n: int) -> list[int]:
    """The training seeds after the preset's own (its fit configs' ``seed_everything``), ``n`` in all."""
    if n == 1:
        return []
    if not preset.trains:
        steps = " ".join(preset.steps)
        raise ConfigError(f"--seeds {n} needs a preset that trains; {preset.name} runs {steps}.")
    if "evaluate" in preset.steps and not adapter_conditions(preset.evaluate):
        raise ConfigError(f"--seeds {n}: preset {preset.name} evaluates no condition that runs the adapter.")
    from prism_lightning.lightning_cli import parse_config

    args = [a for c in preset.fit_configs for a in ("--config", str(c))] + list(preset.fit_args)
    seed = parse_config("reproduce", args).seed_everything
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"--seeds {n} needs a fixed seed_everything in the fit configs, not {seed!r}.")
    return [seed + k for k in range(1, n)]


@dataclass(kw_only=True)
class ReproduceSettings:
    """``reproduce``'s options, declared once: the command line is generated from these fields."""

    preset: str | None = flag(None)
    """a built-in preset (listed by --list) or a preset YAML file"""
    limit: int | None = flag(None, convert=_limit)
    """items per sub-score group in evaluate and study, and at most this many bootstrap queries per
    persona (default: the full sizes)"""
    backend: str = flag("hf", choices=("hf", "vllm"))
    """generation backend of the bootstrap, evaluate and study (training is Lightning's either way)"""
    vllm: list[str] = flag(append=True, metavar="KEY=VALUE", default_factory=list)
    """a vLLM engine setting (repeatable), e.g. tensor_parallel_size=2 (docs/backends.md)"""
    seeds: int = flag(1, convert=_seeds)
    """training seeds: N fits (seed_everything = the preset's seed, +1, ...) on one bootstrap, each
    evaluated; the table adds the spread across them"""
    run_dir: str | None = flag(None)
    """the run directory (default: runs/reproduce-<preset>)"""
    list_presets: bool = flag(False, name="list")
    """list the presets and exit"""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m prism_lightning reproduce", description=__doc__, formatter_class=HelpFormatter
    )
    add_dataclass_arguments(ap, ReproduceSettings)
    return ap


def _run_dir(text: str | None, preset: Preset) -> Path:
    root = Path(text).expanduser() if text else Path("runs") / f"reproduce-{preset.name}"
    return files.check_output_dir(root, "--run_dir")


def _generation_args(backend: str, pairs: list[str]) -> list[str]:
    """The backend and vLLM settings as ``KEY=VALUE`` pairs, checked now (a typo or a missing vLLM fails
    before any step runs); none for the default hf backend, so its step fingerprints stay as they were."""
    from prism_lightning.engines import parse_overrides

    config = parse_overrides(pairs, backend)
    if config.backend == "hf":
        if pairs:
            raise ConfigError("--vllm settings need --backend vllm.")
        return []
    from prism_lightning.engines.vllm_core import require_vllm

    require_vllm()
    return [f"backend={config.backend}", *pairs]


def validate_preset(preset: Preset, *, shape_only: bool = False) -> int | None:
    """Check everything a preset's steps will be given before any long work: the fit configs parse
    against the real classes (a typo'd key fails here), the model settings pass their range checks and
    the gate layer and LoRA targets fit the model (on the meta device, no weights: with ``shape_only``
    the preset's recorded architecture stands in for the model's config.json, for machines without the
    hub), and the paper numbers it names exist. Returns the configured bootstrap queries per persona."""
    paper_numbers(preset.paper_model)
    if not preset.trains:
        return None
    from prism_lightning.backbone import BackboneConfig
    from prism_lightning.lightning_cli import parse_config
    from prism_lightning.model.checks import check_against_model, check_module_settings

    args = [a for c in preset.fit_configs for a in ("--config", str(c))] + list(preset.fit_args)
    cfg = parse_config("reproduce", args)
    settings = cfg.model.as_dict()
    check_module_settings(settings)
    if cfg.model.backbone.model != preset.model:
        raise ConfigError(
            f"preset {preset.name}: its fit configs train {cfg.model.backbone.model}, not {preset.model}."
        )
    if shape_only:
        _check_shape(preset, settings)
    else:
        check_against_model(settings, BackboneConfig(**cfg.data.backbone.as_dict()))
    return int(cfg.data.bootstrap.queries_per_persona)


def _check_shape(preset: Preset, settings: dict) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from prism_lightning.model.routing import validate_routing_setup

    if not preset.shape:
        raise ConfigError(f"preset {preset.name} records no `shape` to validate against.")
    shape = dict(preset.shape)
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    validate_routing_setup(model, settings["gate_layer"], settings["lora_target_modules"])


def reproduce_main(argv: list[str] | None = None) -> int:
    """``reproduce`` from the command line: its flags are :class:`ReproduceSettings`'s fields."""
    ns = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    reproduce_command(settings_from_namespace(ReproduceSettings, ns))
    return 0


def reproduce_command(settings: ReproduceSettings) -> None:
    """Run (or resume) the preset's steps in its run directory, then print and write the comparison with
    the paper's numbers. Every input is checked before a model loads."""
    if settings.list_presets:
        for name in preset_names():
            p = load_preset(name)
            print(f"{name:<30} {p.model:<42} steps: {' '.join(p.steps)}")
        return
    if not settings.preset:
        raise ConfigError(f"give --preset NAME (one of {', '.join(preset_names())}) or a preset YAML file.")
    preset = load_preset(settings.preset)
    limit = _limit(settings.limit)
    root = _run_dir(settings.run_dir, preset)
    generation = _generation_args(settings.backend, settings.vllm)
    n_seeds = _seeds(settings.seeds)
    queries = validate_preset(preset)
    extra = _extra_seeds(preset, n_seeds)
    plan = build_plan(preset, root, limit, queries, generation, extra)

    root.mkdir(parents=True, exist_ok=True)
    size = f"--limit {limit}" if limit else "full sizes"
    steps = " -> ".join(spec.name for spec in plan.steps)
    print(f"reproduce {preset.name} ({preset.model}, {size}) in {root}: {steps}", flush=True)
    start = time.perf_counter()
    timings = run_steps(plan, announce=lambda line: print(line, flush=True))
    rows = compare(plan.paths, preset.paper_model, preset.model, seeds=plan.seed_paths)
    title = f"{preset.name}: paper = {preset.paper_label}; this run = {preset.model}, {size}"
    if extra:
        title += f", {n_seeds} training seeds (the CI column: the first seed's)"
    if rows and not rows[0].comparable:
        title += " (a different model from the paper's: no verdicts)"
    table = format_table(rows, title=title)
    print("\n" + table)
    markdown = format_table(rows, title=title, markdown=True)
    files.atomic_write_text(plan.paths.comparison_md, markdown + "\n")
    files.atomic_write_json(
        plan.paths.comparison_json,
        {"preset": preset.name, "model": preset.model, "paper_model": preset.paper_model, "limit": limit,
         "extra_seeds": extra, "rows": [asdict(r) for r in rows]},
    )  # fmt: skip
    took = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    total = time.perf_counter() - start
    written = f"{plan.paths.comparison_md} and {plan.paths.comparison_json.name}"
    print(f"\nwrote {written}; this invocation {total:.0f} s ({took})")
