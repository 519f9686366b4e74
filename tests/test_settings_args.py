"""Flags generated from the settings dataclasses (``prism_lightning.settings_args``): the command line and
a Python caller build the same settings, older spellings still parse, and a bad preset option is one
ConfigError."""

import argparse
from pathlib import Path

import pytest

from prism_lightning.errors import ConfigError
from prism_lightning.eval.cli import EngineSettings, EvaluateSettings, StudySettings
from prism_lightning.eval.settings import EvalSettings
from prism_lightning.settings_args import (
    HelpFormatter,
    add_dataclass_arguments,
    parse_settings,
    settings_from_namespace,
)


def _parse(cls, *args):
    ap = argparse.ArgumentParser(formatter_class=HelpFormatter)
    add_dataclass_arguments(ap, cls)
    return settings_from_namespace(cls, ap.parse_args(list(args)))


def test_flags_build_what_python_builds(tmp_path):
    mmlu = tmp_path / "mmlu.jsonl"
    parsed = _parse(
        EvaluateSettings,
        "--out", "o", "--benchmarks", "mmlu, safety", "--persona-length", "min", "--bootstrap", "50",
        "--mmlu_file", str(mmlu), "--safety_sets", "advbench", "--vllm", "max_num_seqs=8", "--vllm",
        "dtype=float16", "--threads", "2", "--merge_weights",
    )  # fmt: skip
    built = EvaluateSettings(
        out=Path("o"),
        benchmarks=("mmlu", "safety"),
        persona_length="min",
        merge_weights=True,
        engine=EngineSettings(threads=2, vllm=["max_num_seqs=8", "dtype=float16"]),
        scoring=EvalSettings(n_resamples=50, paths={"mmlu": str(mmlu)}, safety_sets=("advbench",)),
    )
    assert parsed == built


def test_defaults_are_the_dataclass_defaults():
    assert _parse(StudySettings, "--out", "s") == StudySettings(out=Path("s"))


def test_a_bad_preset_option_is_one_config_error():
    with pytest.raises(ConfigError, match=r"^preset p: evaluate: .*--judge_mode"):
        parse_settings(EvaluateSettings, ["--judge_mode=free"], "preset p: evaluate", out=Path("o"))
    with pytest.raises(ConfigError, match="unrecognized arguments: --no_such_flag"):
        parse_settings(StudySettings, ["--no_such_flag=1"], "preset p: study", out=Path("o"))
    # the given values are defaults the preset's own options override
    settings = parse_settings(StudySettings, ["--model=m2"], "preset p: study", out=Path("o"), model="m1")
    assert settings.engine.model == "m2" and settings.out == Path("o")


def test_the_wandb_config_names_each_scalar_option_by_its_flag():
    from prism_lightning.eval.cli import _wandb_config

    settings = EvaluateSettings(out=Path("o"), checkpoint=Path("ckpt"), scoring=EvalSettings(n_resamples=50))
    config = _wandb_config(settings, "float32")
    assert config["checkpoint"] == "ckpt" and config["ci_resamples"] == 50 and config["dtype"] == "float32"
    assert config["benchmarks"] == "mtbench,mmlu,safety" and "out" not in config
