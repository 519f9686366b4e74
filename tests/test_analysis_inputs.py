"""Shared inputs of the analysis and notebook tests, produced by the REAL pipeline on the tiny model:
``fit`` (bootstrap -> training with W&B offline logs -> export), ``evaluate`` on the exported
checkpoint and ``study`` on the base model, each with ``--limit 1``.

Built once per session (:func:`get_inputs`, cached at module level) and shared by
``test_analysis.py`` and ``test_notebooks.py``, whose ``analysis_inputs`` fixtures call it.
``fit`` and ``study`` run concurrently; ``evaluate`` waits for ``fit``'s checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from prism_lightning.testing import TINY_FIT_YAML

ROOT = Path(__file__).resolve().parent.parent


# tiny evaluation: MMLU (4 domains) + one safety set, one item per sub-score group
EVAL_ARGS = [
    "--limit", "1", "--device", "cpu", "--benchmarks", "mmlu,safety", "--safety_sets", "jailbreakbench",
    "--safety_max_new_tokens", "2", "--judge_mode", "logprob", "--ci_resamples", "20",
]  # fmt: skip
STUDY_ARGS = [*EVAL_ARGS, "--personas", "math,stem,safety_monitor", "--lengths", "min,short"]


@dataclass
class AnalysisInputs:
    work: Path
    run_dir: Path
    checkpoint: Path
    eval_dir: Path | None  # None: evaluate could not run (the reason is in `missing`)
    study_dir: Path | None
    missing: dict[str, str]


_CACHE: dict[str, AnalysisInputs] = {}


def _env() -> dict[str, str]:
    # one thread each: fit and study run side by side on small CPUs (oversubscription slows both)
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return {**os.environ, **threads, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _eval_cmd(main: str, *args: str) -> list[str]:
    code = f"import sys; from prism_lightning.eval import {main}; sys.exit({main}(sys.argv[1:]))"
    return [sys.executable, "-c", code, *args]


def _eval_missing() -> str | None:
    """Why evaluate/study cannot run here, or None."""
    from conftest import benchmark_assets_missing

    try:
        from prism_lightning.eval import evaluate_main, study_main  # noqa: F401
    except ImportError as e:
        return f"the evaluate/study entry points are not importable ({e})"
    return benchmark_assets_missing()


def _wait(proc: subprocess.Popen, what: str) -> str | None:
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        return f"{what} failed (rc {proc.returncode}): {err[-2000:]}"
    return None


def build_inputs(model_dir: Path, work: Path) -> AnalysisInputs:
    key = str(model_dir)
    if key in _CACHE:
        return _CACHE[key]
    (work / "tiny.yaml").write_text(TINY_FIT_YAML.format(model=model_dir))
    popen = dict(cwd=work, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fit = subprocess.Popen(
        [sys.executable, "-m", "prism_lightning", "fit", "--config", str(ROOT / "configs/default.yaml"),
         "--config", str(work / "tiny.yaml")], **popen,
    )  # fmt: skip
    missing: dict[str, str] = {}
    reason = _eval_missing()
    study = None
    if reason is None:
        study = subprocess.Popen(
            _eval_cmd("study_main", "--model", str(model_dir), "--out", str(work / "study"), *STUDY_ARGS),
            **popen,
        )
    err = _wait(fit, "fit")
    if err:
        if study is not None:
            study.kill()
        pytest.fail(err)
    run_dir, checkpoint = work / "runs" / "tiny", work / "checkpoints" / "tiny"
    eval_dir = study_dir = None
    if reason is None:
        ev = subprocess.Popen(
            _eval_cmd(
                "evaluate_main", "--checkpoint", str(checkpoint), "--out", str(work / "eval"), *EVAL_ARGS
            ),
            **popen,
        )
        if (err := _wait(ev, "evaluate")) is None:
            eval_dir = work / "eval"
        else:
            missing["eval"] = err
        if (err := _wait(study, "study")) is None:
            study_dir = work / "study"
        else:
            missing["study"] = err
    else:
        missing["eval"] = missing["study"] = reason
    _CACHE[key] = AnalysisInputs(work, run_dir, checkpoint, eval_dir, study_dir, missing)
    return _CACHE[key]


def get_inputs(model_dir: Path, tmp_path_factory) -> AnalysisInputs:
    """Build once per session; each test module wraps this in its own session fixture."""
    if str(model_dir) in _CACHE:
        return _CACHE[str(model_dir)]
    return build_inputs(model_dir, tmp_path_factory.mktemp("analysis"))


def need(inputs: AnalysisInputs, what: str) -> Path:
    """The eval/study directory, or skip naming what is missing."""
    path = inputs.eval_dir if what == "eval" else inputs.study_dir
    if path is None:
        pytest.skip(f"no {what} output: {inputs.missing.get(what)}")
    return path
