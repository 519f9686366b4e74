"""Every user mistake on ``evaluate`` / ``study`` ends as one ``error: ...`` line and exit code 2, through
the real command line, before any model loads (so each case takes only the import time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = "mtbench, mmlu, safety"
CONDITIONS = "base, persona, random_persona, lora, prism"


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "prism_lightning", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def _assert_one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), proc.stderr
    assert sum(line.startswith("error:") for line in lines) == 1, proc.stderr
    return lines[-1]


EVALUATE_CASES = {
    "unknown benchmark": (["--benchmarks", "mmlu,mmlux"], ["'mmlux'", BENCHMARKS]),
    "no benchmark": (["--benchmarks", ","], ["no benchmark", BENCHMARKS]),
    "unknown condition": (["--conditions", "prisma"], ["'prisma'", CONDITIONS]),
    "prism without checkpoint": (["--conditions", "base,prism"], ["prism", "--checkpoint"]),
    "lora without checkpoint": (["--conditions", "lora"], ["lora", "--checkpoint"]),
    "missing checkpoint": (["--checkpoint", "no/such/dir"], ["no/such/dir", "does not exist"]),
    "checkpoint without prism.json": (["--checkpoint", "empty"], ["empty", "prism.json"]),
    "negative limit": (["--limit", "-1"], ["limit", ">= 1", "-1"]),
    "zero limit": (["--limit", "0"], ["limit", ">= 1", "got 0"]),  # would evaluate nothing
    "merge_weights without checkpoint": (["--merge_weights"], ["--merge_weights", "--checkpoint"]),
    "vllm settings without vllm": (["--vllm", "max_num_seqs=8"], ["--vllm", "--backend vllm"]),
    "checkpoint is a file": (["--checkpoint", "a_file"], ["a_file", "is a file"]),
    "benchmark file is a directory": (["--mmlu_file", "empty"], ["--mmlu_file", "is a directory"]),
    "persona length without a persona condition": (
        ["--persona_length", "long", "--conditions", "base"],
        ["--persona_length", "persona or random_persona"],
    ),
    "out under a file": (["--out", "a_file/eval"], ["a_file/eval", "under a_file"]),
    "checkpoint gate layer out of range": (["--checkpoint", "gate-layer-99"], ["gate_layer is 99", "< 3"]),
    "checkpoint with edited prism.json": (["--checkpoint", "edited"], ["prism.json differs", "sha256"]),
    "unknown safety set": (["--safety_sets", "jailbreakbench,foo"], ["'foo'", "harmbench"]),
    "missing benchmark file": (["--mmlu_file", "missing.jsonl"], ["--mmlu_file", "missing.jsonl"]),
    "zero batch size": (["--batch_size", "0"], ["batch_size", ">= 1"]),
    "zero judge batch size": (["--judge_batch_size", "0"], ["judge_batch_size", ">= 1"]),
    "zero resamples": (["--ci_resamples", "0"], ["--ci_resamples", ">= 1"]),
    "zero threads": (["--threads", "0"], ["--threads", ">= 1"]),
    "out is a file": (["--out", "a_file"], ["a_file", "directory"]),
    # the old dashed spellings still parse, and reach the same checks
    "dashed aliases": (["--persona-length", "min", "--safety-sets", "foo"], ["'foo'"]),
}


@pytest.fixture(scope="module")
def cwd(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli-errors")
    (d / "empty").mkdir()
    (d / "a_file").write_text("not a directory\n")
    _write_meta(d / "gate-layer-99", gate_layer=99)
    _write_meta(d / "edited", gate_layer=1)
    meta = json.loads((d / "edited" / "prism.json").read_text())
    (d / "edited" / "prism.json").write_text(json.dumps({**meta, "threshold": 0.9}))  # digest kept
    return d


def _write_meta(directory: Path, **values) -> None:
    """A prism.json alone (evaluate reads it before anything else of the checkpoint), with its digest."""
    from prism_lightning.model.checkpoint_meta import META_DIGEST, meta_digest

    fingerprint = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4, "vocab_size": 384}
    base = {"name": "tiny", "backbone": {"model": "tiny"}, "fingerprint": fingerprint}
    meta = {"base_model": base, "gate_layer": 0, "gate_hidden": [8], "threshold": 0.5, **values}
    directory.mkdir()
    (directory / "prism.json").write_text(json.dumps({**meta, META_DIGEST: meta_digest(meta)}))


@pytest.mark.parametrize("case", list(EVALUATE_CASES))
def test_evaluate_input_errors(cwd, case):
    args, wanted = EVALUATE_CASES[case]
    out = [] if "--out" in args else ["--out", "out"]
    line = _assert_one_error(_run(cwd, "evaluate", *out, *args))
    for text in wanted:
        assert text in line
    assert not (cwd / "out").exists()  # nothing was started


STUDY_CASES = {
    "unknown persona": (["--personas", "math,nobody"], ["'nobody'", "matched", "safety_monitor"]),
    "unknown length": (["--lengths", "min,huge"], ["'huge'", "min, short, long"]),
    "unknown placement": (["--placements", "sideways"], ["'sideways'", "system, user, none"]),
    "unknown benchmark": (["--benchmarks", "mmlux"], ["'mmlux'", BENCHMARKS]),
    "negative limit": (["--limit", "-2"], ["limit", "-2"]),
    "zero limit": (["--limit", "0"], ["limit", ">= 1", "got 0"]),
    "vllm settings without vllm": (["--vllm", "max_num_seqs=8"], ["--vllm", "--backend vllm"]),
}


@pytest.mark.parametrize("case", list(STUDY_CASES))
def test_study_input_errors(cwd, case):
    args, wanted = STUDY_CASES[case]
    line = _assert_one_error(_run(cwd, "study", "--out", "study", *args))
    for text in wanted:
        assert text in line
    assert not (cwd / "study").exists()


def test_help_lists_underscore_flags(cwd):
    proc = _run(cwd, "evaluate", "--help")
    assert proc.returncode == 0
    for flag in ("--persona_length", "--batch_size", "--judge_mode", "--judge_batch_size", "--ci_resamples",
                 "--safety_max_new_tokens", "--mtbench_file"):  # fmt: skip
        assert flag in proc.stdout
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  -")]
    assert "--persona_length" in listed and not {"--persona-length", "--bootstrap"} & set(listed)
