"""``reproduce``: every paper preset parses and validates (meta device, no weights), the published numbers
cover the paper's tables, bad input is one error line, and a whole reproduction on a tiny model runs,
is killed after its fit and resumes; plus the raw MMLU format it defaults to."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import benchmark_assets_missing

from prism_lightning.config_files import package_configs_dir
from prism_lightning.errors import ConfigError
from prism_lightning.eval import benchmarks as B
from prism_lightning.eval.scoring import mmlu_prompt as chat_question
from prism_lightning.lightning_cli import parse_config
from prism_lightning.reproduce.cli import reproduce_main, validate_preset
from prism_lightning.reproduce.compare import measured, paper_numbers
from prism_lightning.reproduce.presets import load_preset, preset_names
from prism_lightning.reproduce.steps import build_plan
from prism_lightning.testing import TINY_FIT_YAML

ROOT = Path(__file__).resolve().parent.parent
_MISSING = benchmark_assets_missing()
needs_assets = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")
PAPER_PRESETS = [n for n in preset_names() if n != "smollm2-135m-instruct"]


def _cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", "prism_lightning", "reproduce", *args], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# presets and the published numbers


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_preset_parses_and_validates(name):
    """The fit configs parse against the real classes, the module settings pass their checks and the gate
    layer and LoRA targets fit the model's architecture (built on the meta device from the preset's
    recorded shape: no hub, no weights); the 7B presets carry the paper's evaluation defaults."""
    preset = load_preset(name)
    queries = validate_preset(preset, shape_only=True)
    assert paper_numbers(preset.paper_model) is not None
    assert "--mmlu_format=raw" in preset.study
    if preset.trains:
        assert queries == 50  # the paper's 50 queries per persona
        assert {"--mmlu_format=raw", "--mtbench_max_new_tokens=1024"} <= set(preset.evaluate)


def test_7b_presets_sample_and_ask_for_queries_as_the_reference():
    """Bootstrap sampling follows each model's generation_config.json (what the reference inherits) and
    the query writer sees the persona's text."""
    expected = {"qwen2.5-7b": (0.8, 20, 1.05), "llama3.1-8b": (0.9, 0, 1.0), "mistral-7b": (1.0, 0, 1.0)}
    for name, (top_p, top_k, penalty) in expected.items():
        preset = load_preset(name)
        args = [a for c in preset.fit_configs for a in ("--config", str(c))] + list(preset.fit_args)
        boot = parse_config("reproduce", args).data.bootstrap
        assert (boot.top_p, boot.top_k, boot.repetition_penalty) == (top_p, top_k, penalty), name
        assert boot.query_prompt == "persona_text"


def test_vllm_backend_reaches_every_generating_step(tmp_path):
    preset = load_preset("smollm2-135m-instruct")
    plain = build_plan(preset, tmp_path, 5, 4)
    vllm = build_plan(preset, tmp_path, 5, 4, ["backend=vllm", "max_num_seqs=8"])
    steps = {s.name: s for s in vllm.steps}
    for name in ("bootstrap", "fit"):
        assert {
            "--data.bootstrap.generation.backend=vllm",
            "--data.bootstrap.generation.max_num_seqs=8",
        } <= set(steps[name].args)
    for name in ("evaluate", "study"):
        assert {"--backend=vllm", "--vllm=max_num_seqs=8"} <= set(steps[name].args)
    # the fit config takes the keys, and the hf default leaves the fingerprints as they were
    cfg = parse_config("reproduce", steps["fit"].args[:-1])
    assert cfg.data.bootstrap.generation.backend == "vllm" and cfg.data.bootstrap.generation.max_num_seqs == 8
    assert [s.fingerprint for s in plain.steps] == [
        s.fingerprint for s in build_plan(preset, tmp_path, 5, 4, []).steps
    ]
    changed = [a.name for a, b in zip(plain.steps, vllm.steps, strict=True) if a.fingerprint != b.fingerprint]
    assert changed == ["bootstrap", "fit", "evaluate", "study"]


def test_a_preset_whose_configs_train_another_model_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"model": "Qwen/Qwen2.5-7B-Instruct", "paper_model": "qwen2.5-7b",
                        "fit_configs": ["mistral-7b.yaml"], "shape": load_preset("qwen2.5-7b").shape})
    )  # fmt: skip
    with pytest.raises(ConfigError, match="not Qwen/Qwen2.5-7B-Instruct"):
        validate_preset(load_preset(str(bad)), shape_only=True)


def test_paper_numbers_cover_the_tables(tmp_path):
    qwen = paper_numbers("qwen2.5-7b")
    metrics = {n["metric"] for n in qwen}
    scores = ("mtbench", "mmlu", "safety", "overall")
    main = {f"eval:{c}:{s}" for c in ("base", "persona", "lora", "prism") for s in scores}
    assert main <= metrics  # the Overall table, all 16 cells
    assert {f"effect:mtbench/{c}" for c in B.MTBENCH_CATEGORIES} <= metrics  # persona effect per category
    assert {f"routing:mtbench/{c}" for c in B.MTBENCH_CATEGORIES} | {"routing:mmlu"} <= metrics
    assert {"correlation:pearson", "correlation:spearman", "split:distill_pct", "gate_acc"} <= metrics
    assert {"study_mmlu:none", "study_mmlu:min", "study_mmlu:long"} <= metrics
    values = {n["metric"]: n.get("value") for n in qwen}
    assert values["eval:prism:overall"] == 73.5 and values["correlation:spearman"] == 0.75
    mistral = {n["metric"]: n.get("value") for n in paper_numbers("mistral-7b")}
    assert mistral["eval:prism:mtbench"] == 8.99
    for model in ("qwen2.5-7b", "mistral-7b", "llama3.1-8b"):
        for n in paper_numbers(model):
            assert n["source"] and n["label"]
            assert sum(k in n for k in ("value", "range", "direction")) == 1
            assert measured(ROOT_EMPTY(tmp_path), n["metric"]) is None  # every metric kind is understood


def ROOT_EMPTY(tmp_path):  # noqa: N802 - a run directory with nothing in it
    from prism_lightning.reproduce.compare import RunPaths

    return RunPaths(tmp_path / "empty")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "gpt-5"], "unknown preset 'gpt-5'; choose from qwen2.5-7b"),
        (["--preset", "smollm2-135m-instruct", "--limit", "0"], "--limit must be >= 1"),
        (["--preset", "smollm2-135m-instruct", "--limit", "two"], "--limit must be a whole number"),
        ([], "give --preset NAME"),
        (["--preset", "smollm2-135m-instruct", "--run_dir", f"{__file__}/run"], "which is a file"),
        (["--preset", "smollm2-135m-instruct", "--vllm", "max_num_seqs=8"], "--vllm settings need --backend"),
        (["--preset", "smollm2-135m-instruct", "--seeds", "0"], "--seeds must be >= 1"),
        (["--preset", "qwen1.5-moe-a2.7b", "--seeds", "2"], "--seeds 2 needs a preset that trains"),
        (
            ["--preset", "smollm2-135m-instruct", "--backend", "vllm", "--vllm", "tensor_parallel_size=0"],
            "tensor_parallel_size must be >= 1",
        ),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, args, message):
    proc = _cli(*args, cwd=tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "runs").exists()  # nothing was started


# ------------------------------------------------------------------------------------------------
# a whole reproduction on a tiny model: killed after fit, resumed


@pytest.fixture(scope="module")
def tiny_preset(tiny_model_dir, tmp_path_factory) -> Path:
    """A preset file of the built-in schema for a tiny random model: every step, small sizes."""
    d = tmp_path_factory.mktemp("preset")
    fit = d / "tiny-fit.yaml"
    gate_schedule = (
        "callbacks: [{class_path: prism_lightning.model.schedule.GateEarlyStopping,"
        " init_args: {patience: 1}}]"
    )
    fit.write_text(TINY_FIT_YAML.format(model=tiny_model_dir).replace("callbacks: []", gate_schedule))
    preset = {
        "model": str(tiny_model_dir),
        "paper_model": "qwen2.5-7b",
        "paper_label": "the paper's Qwen2.5-7B numbers (a tiny test model)",
        "fit_configs": [str(package_configs_dir() / "default.yaml"), str(fit)],
        "fit_args": ["--data.bootstrap.personas=[math, writing]", "--trainer.max_epochs=1",
                     "--data.bootstrap.persona_length=long"],
        "evaluate": ["--device=cpu", "--benchmarks=mmlu,safety", "--safety_sets=jailbreakbench",
                     "--safety_max_new_tokens=3", "--ci_resamples=50", "--mmlu_format=raw"],
        "study": ["--device=cpu", "--personas=matched", "--lengths=min", "--placements=system",
                  "--benchmarks=mmlu", "--ci_resamples=50", "--mmlu_format=raw"],
    }  # fmt: skip
    path = d / "tiny-preset.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


@needs_assets
def test_reproduce_end_to_end_killed_after_fit_and_resumed(tiny_preset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    proc = _cli("--preset", str(tiny_preset), "--limit", "2", "--run_dir", str(run_dir), cwd=tmp_path)
    state_file = run_dir / "reproduce.json"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:  # kill it once fit has finished
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        if state.get("steps", {}).get("fit", {}).get("status") == "done":
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.5)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"not killed after fit:\n{out[-2000:]}\n{err[-3000:]}"
    assert "[1/5] bootstrap: running" in out and "[2/5] fit: done" in out
    assert "gate schedule: best val/gate_auroc" in out  # the gate's own early stopping ran in the joint loop
    ckpt = run_dir / "checkpoint" / "prism.json"
    stamp = ckpt.stat().st_mtime_ns

    assert reproduce_main(["--preset", str(tiny_preset), "--limit", "2", "--run_dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "[1/5] bootstrap: done earlier" in out and "[2/5] fit: done earlier" in out  # skipped, not redone
    assert "[3/5] evaluate: r" in out and "[5/5] report: done" in out
    assert ckpt.stat().st_mtime_ns == stamp  # the checkpoint was not rewritten
    assert re.search(r"paper\s*\|\s*this run \[95% CI\]\s*\|\s*difference", out)
    assert "Base MMLU" in out and "71.7" in out  # the paper's number beside this run's
    table = json.loads((run_dir / "comparison.json").read_text())["rows"]
    by_metric = {r["metric"]: r for r in table}
    assert by_metric["eval:base:mmlu"]["value"] is not None and by_metric["eval:base:mmlu"]["lo"] is not None
    assert by_metric["study_mmlu:min"]["value"] is not None  # from the study step
    assert by_metric["split:distill_pct"]["value"] is not None  # from the bootstrap summary
    assert by_metric["gate_acc"]["value"] is not None  # from the checkpoint
    assert by_metric["eval:base:mtbench"]["ours"] == "-"  # not evaluated here: said, not invented
    assert (run_dir / "report" / "report.md").exists()
    # evaluate's Expert-Prompting condition uses the persona length the checkpoint distilled
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert summary["conditions_config"]["persona"]["persona_length"] == "long"
    assert summary["settings"]["mmlu_format"] == "raw"

    # a third run with everything finished redoes nothing
    assert reproduce_main(["--preset", str(tiny_preset), "--limit", "2", "--run_dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier") == 5


@needs_assets
@pytest.mark.second_tier
def test_reproduce_with_two_training_seeds(tiny_preset, tmp_path, capsys):
    """``--seeds 2``: one bootstrap, two fits (seed_everything 0 and 1), each evaluated (the second under the
    adapter conditions only), the spread across them beside the first seed's CI; a rerun redoes nothing and
    a third seed added later runs only its own fit and evaluation."""
    run_dir = tmp_path / "run"
    args = ["--preset", str(tiny_preset), "--limit", "2", "--run_dir", str(run_dir)]
    assert reproduce_main([*args, "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "bootstrap -> fit -> evaluate -> fit-seed1 -> evaluate-seed1 -> study -> report" in out
    assert "[4/7] fit-seed1: done" in out and "[5/7] evaluate-seed1: done" in out
    link = run_dir / "run-seed1" / "bootstrap"
    assert link.is_symlink() and link.resolve() == (run_dir / "run" / "bootstrap").resolve()  # one bootstrap
    assert list((run_dir / "run-seed1" / "wandb").glob("offline-run-*"))  # its own W&B run, not seed 0's
    gates = [(run_dir / d / "gate.safetensors").read_bytes() for d in ("checkpoint", "checkpoint-seed1")]
    assert gates[0] != gates[1]  # another training seed, another gate
    seed_summary = json.loads((run_dir / "eval-seed1" / "summary.json").read_text())
    assert set(seed_summary["conditions"]) == {"lora", "prism"}
    result = json.loads((run_dir / "comparison.json").read_text())
    assert result["extra_seeds"] == [1]
    by = {r["metric"]: r for r in result["rows"]}
    assert len(by["routing:mmlu"]["seed_values"]) == 2 and by["routing:mmlu"]["seeds"].count("[") == 1
    assert by["routing:mmlu"]["value"] == by["routing:mmlu"]["seed_values"][0]  # the CI column: seed 0's
    assert by["gate_acc"]["seed_values"][1] is not None  # from checkpoint-seed1
    assert by["eval:base:mmlu"]["seeds"].startswith("same for every seed")
    assert re.search(r"this run \[95% CI\]\s*\|\s*2 seeds: mean \[min, max\]\s*\|\s*difference", out)

    assert reproduce_main([*args, "--seeds", "2"]) == 0
    assert capsys.readouterr().out.count("done earlier") == 7
    assert reproduce_main([*args, "--seeds", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier") == 7
    assert "[6/9] fit-seed2: done" in out and "[7/9] evaluate-seed2: done" in out
    rows = json.loads((run_dir / "comparison.json").read_text())["rows"]
    assert len({r["metric"]: r for r in rows}["routing:mmlu"]["seed_values"]) == 3


# ------------------------------------------------------------------------------------------------
# the raw MMLU format


def test_raw_mmlu_prompt_and_persona_prefix(tiny_backbone):
    from prism_lightning.engines.hf import HFEngine
    from prism_lightning.eval.scorers import mmlu_prompts, mmlu_raw_text

    row = {"subject": "high_school_physics", "question": "What is g?", "choices": ["1", "2", "9.8", "4"]}
    text = mmlu_raw_text(row)
    assert text.startswith("The following is a multiple choice question about high school physics.\n\nWhat")
    assert text.endswith("\nC. 9.8\nD. 4\nAnswer:")
    eng = HFEngine.from_backbone(tiny_backbone)
    plain, with_persona = mmlu_prompts(eng, [row, row], [(None, None), ("stem", "You are a scientist.")],
                                       "system", "raw")  # fmt: skip
    assert plain.endswith(text) and "You are a scientist." not in plain
    assert "<|im_start|>" not in plain  # no chat template around the question
    assert with_persona.endswith(text) and "You are a scientist." in with_persona
    assert with_persona.index("You are a scientist.") < with_persona.index("The following")
    chat = mmlu_prompts(eng, [row], [(None, None)], "system", "chat")[0]
    assert chat == eng.formatter.prompt(chat_question(row))  # the chat format: a user turn
