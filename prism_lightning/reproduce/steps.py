"""The steps of a reproduction, each through the existing commands' Python entry points, and the run
state that makes them resumable.

``<run_dir>/reproduce.json`` records, per step, the arguments it ran with (a fingerprint) and whether it
finished. A finished step whose fingerprint matches and whose outputs are there is skipped, unless a step
it needs ran in this invocation; any other step runs, and the command it calls picks up its own partial
work: bootstrap stages resume from their shards, ``fit`` resumes from Lightning's ``last.ckpt`` of the same
settings, ``evaluate`` and ``study`` reuse every scored row of their item files.

More training seeds (``reproduce --seeds N``) add a ``fit-seed<S>`` and an ``evaluate-seed<S>`` step per
extra seed: the same fit arguments with ``--seed_everything=S``, on the first seed's bootstrap (linked into
their run directory), evaluated under the conditions that run the adapter (the others do not change with
the training seed).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from prism_lightning import files, run_paths
from prism_lightning.reproduce.presets import Preset
from prism_lightning.run_paths import RunPaths
from prism_lightning.settings_args import parse_settings

if TYPE_CHECKING:
    from prism_lightning.eval.cli import EvaluateSettings, StudySettings

log = logging.getLogger(__name__)
S = TypeVar("S", "EvaluateSettings", "StudySettings")

__all__ = ["Plan", "RunState", "StepSpec", "adapter_conditions", "build_plan", "run_steps"]


@dataclass
class StepSpec:
    """One step: the arguments it runs with (as flags: what reproduce.json records and the fingerprint
    hashes), the file that says it finished, and the call that runs it."""

    name: str
    args: list[str]
    done_file: Path
    run: Callable[[], None]
    needs: tuple[str, ...] = ()  # steps whose rerun in this invocation makes this one run again

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([self.name, self.args]).encode()).hexdigest()[:16]


@dataclass
class RunState:
    """``reproduce.json``: the preset, the limit and each step's status (rewritten atomically)."""

    path: Path
    data: dict = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path) -> RunState:
        path = RunPaths(root).state
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            log.warning("%s is unreadable; every step's outputs are checked again", path)
            data = {}
        return cls(path, data if isinstance(data, dict) else {})

    def step(self, name: str) -> dict:
        return self.data.setdefault("steps", {}).setdefault(name, {})

    def save(self) -> None:
        files.atomic_write_json(self.path, self.data)


@dataclass
class Plan:
    preset: Preset
    paths: RunPaths
    limit: int | None
    steps: list[StepSpec]
    seed_paths: list[RunPaths] = field(default_factory=list)  # the extra training seeds' (``--seeds``)


# ------------------------------------------------------------------------------------------------
# the step runners: the commands' own Python entry points, in this process


def _free_memory() -> None:
    """A step's models go out of scope when it returns; release their memory before the next loads."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def _bootstrap_runner(args: list[str]) -> Callable[[], None]:
    def run() -> None:
        from prism_lightning.lightning_cli import bootstrap_main

        bootstrap_main(list(args))

    return run


def _fit_runner(paths: RunPaths, args: list[str], first: RunPaths | None = None) -> Callable[[], None]:
    """``first``: the first seed's paths, whose bootstrap this (extra seed's) fit uses through a link."""

    def run() -> None:
        from prism_lightning.lightning_cli import run_lightning_cli

        if first is not None:
            _link_bootstrap(paths, first)
        last = run_paths.last_checkpoint(paths.run)
        extra = ["--ckpt_path", str(last)] if last.exists() else []
        if extra:
            print(f"  fit resumes from {last}", flush=True)
        try:
            run_lightning_cli("fit", [*args, *extra])
        finally:
            _finish_wandb()

    return run


def _finish_wandb() -> None:
    """End the fit's W&B run: the next fit of this process (another training seed) would otherwise log into
    it (a WandbLogger reuses a run in progress) instead of starting its own under its run directory."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def _link_bootstrap(paths: RunPaths, first: RunPaths) -> None:
    """``<run-seed<S>>/bootstrap`` -> the first seed's bootstrap (relative): every seed trains on the same
    stages, and the fit finds them finished instead of generating its own."""
    link, target = run_paths.bootstrap_dir(paths.run), run_paths.bootstrap_dir(first.run)
    if link.exists() or link.is_symlink():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(Path("..") / target.relative_to(first.root), target_is_directory=True)


def _with_run_options(settings: S, limit: int | None, generation: list[str]) -> S:
    """``evaluate``/``study`` settings with reproduce's own ``--limit`` and generation backend on top of
    the preset's options."""
    engine, scoring = settings.engine, settings.scoring
    if limit is not None:
        scoring = replace(scoring, limit=limit)
    for pair in generation:
        key, _, value = pair.partition("=")
        if key == "backend":
            engine = replace(engine, backend=value)
        else:
            engine = replace(engine, vllm=[*(engine.vllm or []), pair])
    return replace(settings, engine=engine, scoring=scoring)


def _evaluate_runner(settings: EvaluateSettings) -> Callable[[], None]:
    def run() -> None:
        from prism_lightning.eval.cli import evaluate_command

        evaluate_command(settings)

    return run


def _study_runner(settings: StudySettings) -> Callable[[], None]:
    def run() -> None:
        from prism_lightning.eval.cli import study_command

        study_command(settings)

    return run


def _report_runner(paths: RunPaths) -> Callable[[], None]:
    def run() -> None:
        import matplotlib.pyplot as plt

        from prism_lightning.analysis.report import write_report

        plt.switch_backend("Agg")
        result = write_report(
            paths.run if paths.run.exists() else paths.root,
            paths.report,
            eval_dir=paths.eval if run_paths.eval_summary(paths.eval).exists() else None,
            study_dir=paths.study if run_paths.study_csv(paths.study).exists() else None,
            checkpoint=paths.checkpoint if (paths.checkpoint / run_paths.PRISM_JSON).exists() else None,
        )
        print(f"  {len(result['written'])} figures written, {len(result['skipped'])} skipped")

    return run


def adapter_conditions(evaluate_args: tuple[str, ...] | list[str]) -> list[str]:
    """The conditions of an evaluate run (its last ``--conditions``, else the default set) that run the
    adapter: the ones a training seed changes."""
    from prism_lightning.eval.conditions import CONDITIONS, Condition

    names = list(CONDITIONS)
    for i, arg in enumerate(evaluate_args):
        if arg.startswith("--conditions="):
            names = arg.partition("=")[2].split(",")
        elif arg == "--conditions" and i + 1 < len(evaluate_args):
            names = evaluate_args[i + 1].split(",")
    return [n for n in (x.strip() for x in names) if n and Condition(n).needs_checkpoint]


def build_plan(
    preset: Preset,
    root: Path,
    limit: int | None,
    queries_per_persona: int | None,
    generation: list[str] | None = None,
    extra_seeds: list[int] | tuple[int, ...] = (),
) -> Plan:
    """Every step's arguments. ``limit`` caps evaluate/study items per sub-score group and the bootstrap's
    queries per persona (``queries_per_persona`` is the preset's own value). ``generation`` holds the
    generation backend's ``KEY=VALUE`` settings (``backend=vllm`` first), for the bootstrap
    (``data.bootstrap.generation``) and for evaluate/study (``--backend``, ``--vllm``). ``extra_seeds``: the
    training seeds after the preset's own, each fitted on the same bootstrap and evaluated."""
    paths = RunPaths(root)
    common = [a for c in preset.fit_configs for a in ("--config", str(c))] + list(preset.fit_args)
    tail: list[str] = []  # after data.run_dir
    if limit is not None and queries_per_persona is not None and limit < queries_per_persona:
        tail.append(f"--data.bootstrap.queries_per_persona={limit}")
    lim = [f"--limit={limit}"] if limit is not None else []
    gen_eval: list[str] = []
    for pair in generation or []:
        key, _, value = pair.partition("=")
        tail.append(f"--data.bootstrap.generation.{key}={value}")
        gen_eval.append(f"--backend={value}" if key == "backend" else f"--vllm={pair}")
    lim += gen_eval
    fit_args = [*common, f"--data.run_dir={paths.run}", *tail]
    fit_export = [*fit_args, f"--export_dir={paths.checkpoint}"]
    # evaluate and study run through their Python entry points, with settings objects: the preset's
    # options parsed once here (a bad one fails before any step runs), reproduce's own set in Python
    from prism_lightning.eval.cli import EvaluateSettings, StudySettings

    trained = "fit" in preset.steps  # without a checkpoint evaluate runs the base-model conditions only
    where = {"checkpoint": paths.checkpoint} if trained else {"model": preset.model}
    eval_settings = parse_settings(
        EvaluateSettings, preset.evaluate, f"preset {preset.name}: evaluate", out=paths.eval, **where
    )
    study_settings = parse_settings(
        StudySettings, preset.study, f"preset {preset.name}: study", out=paths.study, model=preset.model
    )
    generation = list(generation or [])
    eval_settings = _with_run_options(eval_settings, limit, generation)
    study_settings = _with_run_options(study_settings, limit, generation)
    first = f"--checkpoint={paths.checkpoint}" if trained else f"--model={preset.model}"
    specs = {
        "bootstrap": StepSpec(
            "bootstrap", fit_args, run_paths.bootstrap_summary(paths.run), _bootstrap_runner(fit_args)
        ),
        "fit": StepSpec(
            "fit", fit_export, paths.checkpoint / run_paths.PRISM_JSON, _fit_runner(paths, fit_export),
            needs=("bootstrap",),
        ),
        "evaluate": StepSpec(
            "evaluate", [first, f"--out={paths.eval}", *preset.evaluate, *lim],
            run_paths.eval_summary(paths.eval), _evaluate_runner(eval_settings), needs=("bootstrap", "fit"),
        ),
        "study": StepSpec(
            "study", [f"--model={preset.model}", f"--out={paths.study}", *preset.study, *lim],
            run_paths.study_json(paths.study), _study_runner(study_settings), needs=("bootstrap", "fit"),
        ),
        "report": StepSpec(
            "report", [], run_paths.report_md(paths.report), _report_runner(paths), needs=("bootstrap", "fit")
        ),
    }  # fmt: skip
    steps = [specs[s] for s in preset.steps if s not in ("study", "report")]
    seed_paths = [paths.for_seed(s) for s in extra_seeds]
    seed_conditions = adapter_conditions(preset.evaluate) if extra_seeds else []
    for sp in seed_paths:
        fit_name, eval_name = f"fit-seed{sp.seed}", f"evaluate-seed{sp.seed}"
        args = [*common, f"--seed_everything={sp.seed}", f"--data.run_dir={sp.run}", *tail]
        seed_export = [*args, f"--export_dir={sp.checkpoint}"]
        steps.append(StepSpec(
            fit_name, seed_export, sp.checkpoint / run_paths.PRISM_JSON,
            _fit_runner(sp, seed_export, paths), needs=("bootstrap",),
        ))  # fmt: skip
        if "evaluate" in preset.steps:
            eval_args = [f"--checkpoint={sp.checkpoint}", f"--out={sp.eval}", *preset.evaluate, *lim,
                         f"--conditions={','.join(seed_conditions)}"]  # fmt: skip
            seed_settings = replace(
                eval_settings, checkpoint=sp.checkpoint, out=sp.eval, conditions=tuple(seed_conditions)
            )
            done = run_paths.eval_summary(sp.eval)
            steps.append(
                StepSpec(
                    eval_name, eval_args, done, _evaluate_runner(seed_settings), needs=("bootstrap", fit_name)
                )
            )
    steps += [specs[s] for s in preset.steps if s in ("study", "report")]
    return Plan(preset, paths, limit, steps, seed_paths)


def run_steps(plan: Plan, *, announce: Callable[[str], None] = print) -> dict[str, float]:
    """Run (or skip) every step in order; returns the seconds each step took in this invocation."""
    state = RunState.load(plan.paths.root)
    state.data.update(preset=plan.preset.name, limit=plan.limit)
    ran: set[str] = set()
    timings: dict[str, float] = {}
    n = len(plan.steps)
    for k, spec in enumerate(plan.steps, 1):
        entry = state.step(spec.name)
        finished = entry.get("status") == "done" and entry.get("fingerprint") == spec.fingerprint
        if finished and spec.done_file.exists() and not ran.intersection(spec.needs):
            announce(f"[{k}/{n}] {spec.name}: done earlier ({entry.get('seconds', 0):.0f} s), skipped")
            timings[spec.name] = 0.0
            continue
        resumed = entry.get("fingerprint") == spec.fingerprint and entry.get("status") == "running"
        announce(f"[{k}/{n}] {spec.name}: {'resuming' if resumed else 'running'}")
        entry.update(status="running", fingerprint=spec.fingerprint, args=spec.args)
        entry.pop("seconds", None)
        state.save()
        start = time.perf_counter()
        spec.run()
        _free_memory()
        seconds = time.perf_counter() - start
        entry.update(status="done", seconds=round(seconds, 1), finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        state.save()
        timings[spec.name] = seconds
        ran.add(spec.name)
        announce(f"[{k}/{n}] {spec.name}: done in {seconds:.0f} s")
    return timings
