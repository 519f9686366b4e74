"""Stage 3 with verifiers beyond self-judgment (``bootstrap.verifier``) on the tiny random model: a program
decides (alone, without any judge forward, or beside the self-judge with their agreement recorded), the stage
hash follows the verifier, the default keeps its hash, and bad settings fail before any work."""

from __future__ import annotations

import re
import shutil
import textwrap

import pytest

from prism_lightning.backbone import BackboneConfig
from prism_lightning.bootstrap import run_bootstrap, stage_stores
from prism_lightning.bootstrap import verdicts as verdicts_mod
from prism_lightning.bootstrap.summary import format_summary
from prism_lightning.errors import ConfigError
from prism_lightning.testing import tiny_bootstrap_config

TRAINER = {"accelerator": "cpu", "enable_progress_bar": False}
LONGER = "checks_for_tests:longer_wins"
PROGRAMS = {"math": LONGER, "writing": LONGER}


@pytest.fixture
def program_module(tmp_path, monkeypatch):
    """A user's own verifier module, importable by name as a config would name it."""
    (tmp_path / "checks_for_tests.py").write_text(
        textwrap.dedent(
            """
            def longer_wins(query, base_answer, context_answer, context):
                if len(context_answer) == len(base_answer):
                    return "tie"
                return "persona" if len(context_answer) > len(base_answer) else "base"
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.fixture(scope="module")
def self_judged(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("verifiers") / "run"
    backbone = BackboneConfig(model=str(tiny_model_dir))
    return run_bootstrap(tiny_bootstrap_config(), backbone, run_dir, TRAINER), backbone


def _expected(answers):
    def longer(a):
        if len(a["persona_answer"]) == len(a["base_answer"]):
            return 0
        return int(len(a["persona_answer"]) > len(a["base_answer"]))

    return {a["id"]: longer(a) for a in answers}


def test_a_program_alone_labels_every_pair_without_a_judge(
    self_judged, program_module, tmp_path, monkeypatch
):
    result, backbone = self_judged
    run_dir = tmp_path / "run"
    shutil.copytree(result.run_dir, run_dir)

    def no_judge(*args, **kwargs):
        raise AssertionError("a program verifier needs no judge forward")

    monkeypatch.setattr(verdicts_mod.VerdictTask, "process", no_judge)
    config = tiny_bootstrap_config(verifier="program", verifier_programs=PROGRAMS)
    program = run_bootstrap(config, backbone, run_dir, TRAINER)
    rows = program.rows("verdicts")
    expected = _expected(program.rows("answers"))
    assert {r["id"]: r["gate_target"] for r in rows} == expected
    assert all(r["verifier"] == "program" and r["program"] == LONGER for r in rows)
    assert program.summary["verdicts"]["decided_by"] == "program"
    total = program.summary["verdicts"]["split"]["program"]["total"]
    assert total == {"distill": sum(expected.values()), "retain": len(expected) - sum(expected.values())}
    # the teacher stage follows the program's distill rows
    assert {r["id"] for r in program.rows("teacher")} == {i for i, y in expected.items() if y}


def test_program_beside_self_judge_records_both_labels_and_their_agreement(
    self_judged, program_module, tmp_path
):
    result, backbone = self_judged
    run_dir = tmp_path / "run"
    shutil.copytree(result.run_dir, run_dir)
    config = tiny_bootstrap_config(verifier=["program", "self"], verifier_programs=PROGRAMS)
    both = run_bootstrap(config, backbone, run_dir, TRAINER)
    rows = both.rows("verdicts")
    expected = _expected(both.rows("answers"))
    assert all(r["labels"] == {"program": expected[r["id"]], "self": r["logprob_label"]} for r in rows)
    assert all(r["gate_target"] == expected[r["id"]] for r in rows)
    agreement = both.summary["verdicts"]["agreement"]["program~self"]
    agree = sum(r["labels"]["program"] == r["labels"]["self"] for r in rows) / len(rows)
    assert agreement["pairs"] == len(rows) and agreement["agree"] == pytest.approx(agree, abs=1e-4)
    printed = format_summary(both.summary)
    assert "decided by program" in printed and "agreement program vs self" in printed


def test_answer_samples_keep_the_first_winning_persona_answer_for_the_teacher(
    self_judged, program_module, tmp_path
):
    """Best-of-k: every persona sample is checked by the program, the first that wins becomes the row's
    persona answer (the teacher distils exactly that text), and sample 0 is the one-answer run's answer."""
    result, backbone = self_judged
    config = tiny_bootstrap_config(verifier="program", verifier_programs=PROGRAMS, answer_samples=3)
    sampled = run_bootstrap(config, backbone, tmp_path / "run", TRAINER)
    answers = {a["id"]: a for a in sampled.rows("answers")}
    one = {a["id"]: a for a in result.rows("answers")}
    assert {i: a["persona_answer"] for i, a in answers.items()} == {
        i: a["persona_answer"] for i, a in one.items()
    }
    assert all(len(a["persona_samples"]) == 2 for a in answers.values())

    def wins(a, text):
        return len(text) > len(a["base_answer"])

    teacher = {r["id"] for r in sampled.rows("teacher")}
    for r in sampled.rows("verdicts"):
        a = answers[r["id"]]
        candidates = [a["persona_answer"]] + [s["answer"] for s in a["persona_samples"]]
        won = [wins(a, c) for c in candidates]
        assert r["gate_target"] == int(any(won)) and r["samples_won"] == sum(won)
        assert r["persona_sample"] == (won.index(True) if any(won) else 0)
        assert (r["id"] in teacher) == any(won)
    stats = sampled.summary["verdicts"]["answer_samples"]
    assert stats["rows"] == len(answers)
    one_label = _expected(list(one.values()))
    assert stats["won_by_first_sample"] == sum(one_label.values())
    # the teacher's response is the chosen sample, not sample 0
    from prism_lightning.bootstrap.answers import chosen_row

    verdicts = {r["id"]: r for r in sampled.rows("verdicts")}
    later = [i for i, r in verdicts.items() if r["gate_target"] and r["persona_sample"] > 0]
    assert later and stats["won_by_a_later_sample"] == len(later)  # the extra samples changed labels
    for i in later:
        assert (
            chosen_row(answers[i], verdicts[i])["persona_answer"]
            == answers[i]["persona_samples"][verdicts[i]["persona_sample"] - 1]["answer"]
        )
    with pytest.raises(ConfigError, match="needs bootstrap.verifier: program"):
        tiny_bootstrap_config(answer_samples=2)


def test_stage_hash_follows_the_verifier_and_the_default_keeps_its_hash(
    tiny_model_dir, program_module, tmp_path
):
    bb = BackboneConfig(model=str(tiny_model_dir))
    default = stage_stores(tiny_bootstrap_config(), bb, tmp_path)
    explicit = stage_stores(tiny_bootstrap_config(verifier="self"), bb, tmp_path)
    program = stage_stores(
        tiny_bootstrap_config(verifier="program", verifier_programs=PROGRAMS), bb, tmp_path
    )
    both = stage_stores(
        tiny_bootstrap_config(verifier=["program", "self"], verifier_programs=PROGRAMS), bb, tmp_path
    )
    assert all(default[s].hash == explicit[s].hash for s in default)
    assert "verifier" not in default["verdicts"].settings
    for other in (program, both):
        assert [default[s].hash == other[s].hash for s in ("queries", "answers", "verdicts", "teacher")] == [
            True, True, False, False,
        ]  # fmt: skip
    assert program["verdicts"].hash != both["verdicts"].hash
    sampled = stage_stores(
        tiny_bootstrap_config(verifier="program", verifier_programs=PROGRAMS, answer_samples=2), bb, tmp_path
    )
    assert [program[s].hash == sampled[s].hash for s in ("queries", "answers")] == [True, False]


def test_agreement_stats():
    assert verdicts_mod.agreement_stats([1, 0, 1, 0], [1, 0, 1, 0]) == {
        "pairs": 4,
        "agree": 1.0,
        "kappa": 1.0,
    }
    chance = verdicts_mod.agreement_stats([1, 1, 0, 0], [1, 0, 1, 0])
    assert chance["agree"] == 0.5 and chance["kappa"] == 0.0


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"verifier": "oracle"}, "Unknown bootstrap.verifier"),
        ({"verifier": ["self", "self"]}, "each verifier once"),
        ({"verifier": "program", "verifier_programs": {"math": LONGER}}, "no program for ['writing']"),
        (
            {"verifier": "program", "verifier_programs": {**PROGRAMS, "coding": LONGER}},
            "not in bootstrap.personas",
        ),
        ({"verifier_programs": PROGRAMS}, "`program` is not a bootstrap.verifier"),
        (
            {"verifier": "program", "verifier_programs": {**PROGRAMS, "math": "nowhere_xyz:f"}},
            "cannot import",
        ),
    ],
)
def test_bad_verifier_settings_fail_at_construction(settings, message, program_module):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny_bootstrap_config(**settings)


# --- through the real CLI ------------------------------------------------------------------------------


def _bootstrap_cli(work, *args: str):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": f"{root}{os.pathsep}{work}"}
    return subprocess.run(
        [sys.executable, "-m", "prism_lightning", "bootstrap", "--config", str(root / "configs/default.yaml"),
         "--config", "tiny.yaml", *args], cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.fixture
def cli_work(tiny_model_dir, tmp_path, program_module):
    from prism_lightning.testing import TINY_FIT_YAML

    (tmp_path / "tiny.yaml").write_text(TINY_FIT_YAML.format(model=tiny_model_dir))
    return tmp_path


def test_cli_bootstrap_with_a_program_and_another_local_model_as_judge(cli_work, tiny_model_dir):
    """`verifier: [program, self]` with `judge` set to a second local model: the program decides, the other
    model's two-order judgments are recorded, and the summary prints their agreement."""
    from transformers import AutoTokenizer

    from prism_lightning.testing import build_tiny_model

    judge_dir = cli_work / "judge-model"  # same tokenizer, other weights: a different model
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(judge_dir)
    build_tiny_model(len(AutoTokenizer.from_pretrained(tiny_model_dir)), seed=7).save_pretrained(judge_dir)
    programs = "{" + ", ".join(f"{name}: {LONGER}" for name in ("math", "coding", "writing")) + "}"
    result = _bootstrap_cli(
        cli_work, "--data.bootstrap.verifier", "[program, self]",
        "--data.bootstrap.verifier_programs", programs, "--data.bootstrap.judge.model", str(judge_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "decided by program" in result.stdout and "agreement program vs self" in result.stdout
    import json

    summary = json.loads((cli_work / "runs/tiny/bootstrap/summary.json").read_text())
    assert str(judge_dir) in summary["models_loaded"]
    assert summary["verdicts"]["agreement"]["program~self"]["pairs"] == summary["verdicts"]["pairs"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data.bootstrap.verifier", "program"], "bootstrap.verifier_programs has no program for"),
        (
            [
                "--data.bootstrap.verifier",
                "program",
                "--data.bootstrap.verifier_programs",
                "{math: nowhere_xyz:f, coding: a:b, writing: a:b}",
            ],
            "cannot import",
        ),  # fmt: skip
    ],
)
def test_cli_bad_verifier_settings_are_one_error_line(cli_work, args, message):
    result = _bootstrap_cli(cli_work, *args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1] and "Traceback" not in result.stderr
    assert not (cli_work / "runs/tiny/bootstrap").exists()  # refused before any stage ran
