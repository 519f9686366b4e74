"""Every user-caused error of fit/bootstrap/predict/chat: one `error: ...` line, exit code 2, no traceback,
raised before long work starts. Add a case here with every new command or setting.

Most cases call the CLI's own `main` in this process (the same code path as `python -m prism_lightning`,
seconds instead of a process start each); a few run the real process end to end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prism_lightning.cli import main
from prism_lightning.testing import TINY_FIT_YAML

DEFAULT = str(Path(__file__).resolve().parent.parent / "configs" / "default.yaml")


@pytest.fixture(scope="module")
def work(tiny_model_dir, tmp_path_factory) -> Path:
    """A directory with the tiny fit override, a good exported checkpoint and damaged copies of it."""
    from prism_lightning.backbone import BackboneConfig
    from prism_lightning.model.export import export_checkpoint
    from prism_lightning.model.module import PrismModule

    root = tmp_path_factory.mktemp("cli-errors")
    (root / "tiny.yaml").write_text(TINY_FIT_YAML.format(model=tiny_model_dir))
    module = PrismModule(backbone=BackboneConfig(model=str(tiny_model_dir)), lora_rank=2, gate_hidden=[8])
    module.configure_model()
    good = export_checkpoint(module, root / "ckpt", personas=["math"])
    for name in ("no-gate", "cut-json", "cut-gate", "cut-adapter", "edited-gate"):
        shutil.copytree(good, root / name)
    (root / "no-gate" / "gate.safetensors").unlink()
    _cut(root / "cut-json" / "prism.json")
    _cut(root / "cut-gate" / "gate.safetensors")
    _cut(root / "cut-adapter" / "adapter" / "adapter_model.safetensors")
    gate = root / "edited-gate" / "gate.safetensors"  # same size, one byte changed near the end
    data = bytearray(gate.read_bytes())
    data[-3] ^= 0x01
    gate.write_bytes(bytes(data))
    # same architecture and tokenizer, other weights: the checkpoint must refuse it
    from transformers import AutoTokenizer

    from prism_lightning.testing import build_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    build_tiny_model(len(tokenizer), seed=1).save_pretrained(root / "other-weights")
    tokenizer.save_pretrained(root / "other-weights")
    (root / "prompts-bad.jsonl").write_text('{"query": "fine"}\n{"query": "broken\n{"query": "also fine"}\n')
    (root / "prompts-noquery.jsonl").write_text('{"query": "fine"}\n{"text": "no query key"}\n')
    return root


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


FIT = ["fit", "--config", DEFAULT, "--config", "tiny.yaml", "--data.run_dir", "runs/never"]
BOOTSTRAP = ["bootstrap", "--config", DEFAULT, "--config", "tiny.yaml", "--data.run_dir", "runs/never"]
PREDICT = ["predict", "--config", DEFAULT, "--config", "tiny.yaml", "--model.checkpoint", "ckpt"]

CASES = {
    # fit: value ranges, the model's own modules and layers, names, data and export settings
    "fit lora_rank -3": ([*FIT, "--model.lora_rank", "-3"], "lora_rank must be >= 1"),
    "fit unknown target module": ([*FIT, "--model.lora_target_modules", "[nope_proj]"], "nope_proj"),
    "fit gate layer out of range": ([*FIT, "--model.gate_layer", "7"], "gate_layer=7 is out of range"),
    "fit threshold 1.5": ([*FIT, "--model.threshold", "1.5"], "threshold must be in (0, 1)"),
    "fit lr_schedule": ([*FIT, "--model.lr_schedule", "cosin"], "Unknown model.lr_schedule 'cosin'"),
    "fit unknown model": ([*FIT, "--model.backbone.model", "no-such-org/no-such-model"], "Cannot load model"),
    "fit dtype": ([*FIT, "--model.backbone.dtype", "float8"], "Unknown dtype 'float8'"),
    "fit unknown persona": ([*FIT, "--data.bootstrap.personas", "[mathz]"], "unknown context 'mathz'"),
    "fit no personas": ([*FIT, "--data.bootstrap.personas", "[]"], "bootstrap.personas is empty"),
    "fit missing context file": ([*FIT, "--data.bootstrap.context_files", "[nope.yaml]"], "nope.yaml"),
    "fit queries 0": ([*FIT, "--data.bootstrap.queries_per_persona", "0"], "queries_per_persona must be >= 1"),  # noqa: E501
    "fit verdict rule": ([*FIT, "--data.bootstrap.verdict_rule", "vote"], "Unknown verdict_rule 'vote'"),
    "fit val_fraction": ([*FIT, "--data.val_fraction", "1.5"], "val_fraction must be in [0, 1)"),
    "fit batch size 0": ([*FIT, "--data.batch_size", "0"], "batch_size must be >= 1"),
    "fit export_from": ([*FIT, "--export_from", "middle"], "--export_from must be one of last, best"),
    # bootstrap checks what fit will check, so fit cannot fail on it after the bootstrap's work
    "bootstrap target module": ([*BOOTSTRAP, "--model.lora_target_modules", "[nope_proj]"], "nope_proj"),
    "bootstrap lora_rank": ([*BOOTSTRAP, "--model.lora_rank", "0"], "lora_rank must be >= 1"),
    # predict: the prompt file and the checkpoint, before the model loads
    "predict no file": (PREDICT, "predict needs --data.predict_file"),
    "predict missing file": ([*PREDICT, "--data.predict_file", "nope.jsonl"], "nope.jsonl does not exist"),
    "predict malformed line": ([*PREDICT, "--data.predict_file", "prompts-bad.jsonl"], "prompts-bad.jsonl:2:"),  # noqa: E501
    "predict row without query": ([*PREDICT, "--data.predict_file", "prompts-noquery.jsonl"], "row 2"),
    "predict missing checkpoint": (
        [*PREDICT, "--data.predict_file", "prompts-noquery.jsonl", "--model.checkpoint", "nope"],
        "row 2",  # the prompt file is checked first; both are checked before any model loads
    ),
    # chat --checkpoint: every way a checkpoint directory can be broken
    "chat missing dir": (["chat", "--checkpoint", "nope", "hi"], "checkpoint nope does not exist"),
    "chat not a checkpoint": (["chat", "--checkpoint", ".", "hi"], "is not a PRISM checkpoint"),
    "chat no gate": (["chat", "--checkpoint", "no-gate", "hi"], "has no gate.safetensors"),
    "chat truncated prism.json": (["chat", "--checkpoint", "cut-json", "hi"], "prism.json is damaged"),
    "chat truncated gate": (["chat", "--checkpoint", "cut-gate", "hi"], "gate.safetensors differs"),
    "chat truncated adapter": (["chat", "--checkpoint", "cut-adapter", "hi"], "adapter_model.safetensors"),
    "chat edited gate": (["chat", "--checkpoint", "edited-gate", "hi"], "sha256 mismatch"),
    "chat other base weights": (
        ["chat", "--checkpoint", "ckpt", "--model", "other-weights", "hi"],
        "the loaded model's weights differ",
    ),
    "chat persona with checkpoint": (
        ["chat", "--checkpoint", "ckpt", "--persona", "math", "hi"],
        "--persona and --checkpoint exclude each other",
    ),
    "chat unknown persona": (["chat", "--persona", "mathz", "hi"], "unknown context 'mathz'"),
    "chat top_p 0": (["chat", "--top_p", "0", "hi"], "--top_p must be in (0, 1]"),
}


def _assert_one_error_line(code, err: str, expected: str) -> None:
    assert code == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-2000:]
    assert expected in errors[0], errors[0]
    assert err.rstrip().splitlines()[-1] == errors[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_and_exit_code_2(case, work, capfd, monkeypatch):
    argv, expected = CASES[case]
    monkeypatch.chdir(work)
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capfd.readouterr().err
    _assert_one_error_line(info.value.code, err, expected)
    assert not (work / "runs" / "never" / "bootstrap").exists()  # nothing long started


@pytest.mark.parametrize(
    "case", ["fit lora_rank -3", "predict malformed line", "chat truncated gate", "chat missing dir"]
)
def test_bad_input_through_the_real_process(case, work):
    argv, expected = CASES[case]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "prism_lightning", *argv], cwd=work, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    _assert_one_error_line(result.returncode, result.stderr, expected)
