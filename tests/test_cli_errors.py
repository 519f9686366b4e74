"""Every user-caused error of fit/bootstrap/predict/chat: one `error: ...` line, exit code 2, no traceback,
raised before long work starts. Add a case here with every new command or setting.

Most cases call the CLI's own `main` in this process (the same code path as `python -m prism_lightning`,
seconds instead of a process start each); a few run the real process end to end."""

from __future__ import annotations

import json
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
    damaged = ("no-gate", "cut-json", "cut-gate", "cut-adapter", "edited-gate", *EDITED_META, "old-export")
    for name in damaged:
        shutil.copytree(good, root / name)
    for name, (rehash, edit) in EDITED_META.items():
        _edit_meta(root / name, edit, rehash=rehash)
    _edit_meta(root / "old-export", lambda meta: None, rehash=None)  # as exported before meta_sha256
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
    (root / "prompts-ok.jsonl").write_text('{"query": "fine"}\n')
    (root / "a-file").write_text("not a directory\n")
    (root / "facts.txt").write_text("The moon is about 384,400 km from the earth.\n")
    (root / "nul.txt").write_bytes(b"text\x00with a NUL byte\n")
    (root / "latin1.txt").write_bytes(b"caf\xe9\n")
    (root / "runs").mkdir()
    return root


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _edit_meta(directory: Path, edit, *, rehash: bool | None) -> None:
    """Change prism.json: ``rehash`` True records a matching digest (a file that is consistent but
    wrong, e.g. from another tool), False keeps the exported digest (a hand edit), None drops it (a
    checkpoint exported before prism.json carried its digest)."""
    from prism_lightning.model.checkpoint_meta import META_DIGEST, meta_digest

    path = directory / "prism.json"
    meta = json.loads(path.read_text())
    edit(meta)
    if rehash:
        meta[META_DIGEST] = meta_digest(meta)
    elif rehash is None:
        del meta[META_DIGEST]
    path.write_text(json.dumps(meta, indent=2))


def _set(**changes):
    return lambda meta: meta.update(changes)


def _set_base(key: str, field: str, value):
    return lambda meta: meta["base_model"][key].update({field: value})


# damaged copies of the good checkpoint's prism.json: (rehash, edit), see _edit_meta
EDITED_META = {
    "edited-json": (False, _set(threshold=0.25)),
    "gate-layer-99": (True, _set(gate_layer=99)),
    "gate-layer-negative-old": (None, _set(gate_layer=-1)),
    "gate-hidden": (True, _set(gate_hidden=[32])),
    "hidden-size": (True, _set_base("fingerprint", "hidden_size", 128)),
    "threshold-2": (True, _set(threshold=2.0)),
    "backbone-key": (True, _set_base("backbone", "quantize", True)),
    "adapter-names": (True, _set(adapters={"../up": ["math"], "b": ["code"]})),
}


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
    "fit queries 0": (
        [*FIT, "--data.bootstrap.queries_per_persona", "0"],
        "queries_per_persona must be >= 1",
    ),  # noqa: E501
    "fit verdict rule": ([*FIT, "--data.bootstrap.verdict_rule", "vote"], "Unknown verdict_rule 'vote'"),
    "fit heldout_check -1": ([*FIT, "--heldout_check", "-1"], "--heldout_check must be >= 0"),
    "fit heldout_check self-judged": ([*FIT, "--heldout_check", "8"], "--heldout_check needs data.bootstrap"),
    "fit query examples missing": (
        [*FIT, "--data.bootstrap.query_prompt", "examples"],
        "give fewer than bootstrap.query_examples=3 example_queries",
    ),
    "fit val_fraction": ([*FIT, "--data.val_fraction", "1.5"], "val_fraction must be in [0, 1)"),
    "fit batch size 0": ([*FIT, "--data.batch_size", "0"], "batch_size must be >= 1"),
    "fit export_from": ([*FIT, "--export_from", "middle"], "--export_from must be one of last, best"),
    # bootstrap checks what fit will check, so fit cannot fail on it after the bootstrap's work
    "bootstrap target module": ([*BOOTSTRAP, "--model.lora_target_modules", "[nope_proj]"], "nope_proj"),
    "bootstrap lora_rank": ([*BOOTSTRAP, "--model.lora_rank", "0"], "lora_rank must be >= 1"),
    # predict: the prompt file and the checkpoint, before the model loads
    "predict no file": (PREDICT, "predict needs --data.predict_file"),
    "predict missing file": ([*PREDICT, "--data.predict_file", "nope.jsonl"], "nope.jsonl does not exist"),
    "predict malformed line": (
        [*PREDICT, "--data.predict_file", "prompts-bad.jsonl"],
        "prompts-bad.jsonl:2:",
    ),  # noqa: E501
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
    # a path that must be a directory, or a file, is the other or lies under a file
    "fit run_dir is a file": ([*FIT, "--data.run_dir", "a-file"], "--data.run_dir a-file is a file"),
    "fit run_dir under a file": (
        [*FIT, "--data.run_dir", "a-file/run"],
        "lies under a-file, which is a file",
    ),
    "bootstrap run_dir is a file": ([*BOOTSTRAP, "--data.run_dir", "a-file"], "a-file is a file"),
    "validate run_dir is a file": (["validate", *FIT[1:], "--data.run_dir", "a-file"], "a-file is a file"),
    "fit export_dir is a file": ([*FIT, "--export_dir", "a-file"], "--export_dir a-file is a file"),
    "fit missing ckpt_path": ([*FIT, "--ckpt_path", "nope.ckpt"], "--ckpt_path nope.ckpt does not exist"),
    "predict file is a directory": ([*PREDICT, "--data.predict_file", "runs"], "runs is a directory"),
    "predict output is a directory": (
        [*PREDICT, "--data.predict_file", "prompts-ok.jsonl", "--predict_output", "runs"],
        "--predict_output runs is a directory",
    ),
    "chat checkpoint is a file": (["chat", "--checkpoint", "a-file", "hi"], "checkpoint a-file is a file"),
    "serve checkpoint is a file": (["serve", "--checkpoint", "a-file"], "checkpoint a-file is a file"),
    "report run_dir is a file": (["report", "a-file"], "a-file is a file"),
    "report missing eval dir": (["report", "runs", "--eval", "nope"], "--eval nope does not exist"),
    "report out is a file": (["report", "runs", "--out", "a-file"], "--out a-file is a file"),
    # prism.json: edited after export, or values that do not fit the model or the gate file
    "chat edited prism.json": (["chat", "--checkpoint", "edited-json", "hi"], "prism.json differs"),
    "serve edited prism.json": (["serve", "--checkpoint", "edited-json"], "sha256 mismatch"),
    "chat gate layer 99": (["chat", "--checkpoint", "gate-layer-99", "hi"], "gate_layer is 99, expected < 3"),
    "chat old export, gate layer -1": (
        ["chat", "--checkpoint", "gate-layer-negative-old", "hi"],
        "gate_layer is -1",
    ),
    "predict gate layer 99": (
        [*PREDICT, "--data.predict_file", "prompts-ok.jsonl", "--model.checkpoint", "gate-layer-99"],
        "gate_layer is 99",
    ),
    "serve gate layer 99": (["serve", "--checkpoint", "gate-layer-99"], "gate_layer is 99"),
    "chat gate_hidden": (["chat", "--checkpoint", "gate-hidden", "hi"], "does not fit prism.json's gate"),
    "chat hidden size": (["chat", "--checkpoint", "hidden-size", "hi"], "hidden size 128"),
    "chat threshold 2": (["chat", "--checkpoint", "threshold-2", "hi"], "threshold is 2.0"),
    "chat backbone key": (["chat", "--checkpoint", "backbone-key", "hi"], "setting(s) quantize"),
    "chat adapter names": (["chat", "--checkpoint", "adapter-names", "hi"], "'../up' is not usable"),
    # chat options that act only together with another one, and context files
    "chat context file alone": (["chat", "--context_file", "facts.txt", "hi"], "add --persona facts"),
    "chat missing context file": (["chat", "--context_file", "nope.txt", "hi"], "nope.txt: file not found"),
    "chat NUL context file": (["chat", "--context_file", "nul.txt", "hi"], "not a text file"),
    "chat latin-1 context file": (["chat", "--context_file", "latin1.txt", "hi"], "cannot read as UTF-8"),
    "chat missing context file with persona": (
        ["chat", "--context_file", "nope.txt", "--persona", "math", "hi"],
        "nope.txt: file not found",
    ),
    "chat context file with checkpoint": (
        ["chat", "--checkpoint", "ckpt", "--context_file", "facts.txt", "hi"],
        "--context_file and --checkpoint exclude each other",
    ),
    "chat persona_length alone": (["chat", "--persona_length", "long", "hi"], "acts only with --persona"),
    "chat placement alone": (["chat", "--placement", "user", "hi"], "--placement acts only with --persona"),
    "chat threshold alone": (["chat", "--threshold", "0.3", "hi"], "--threshold acts only with --checkpoint"),
    "chat route alone": (["chat", "--route", "on", "hi"], "--route acts only with --checkpoint"),
    "chat merge_weights alone": (["chat", "--merge_weights", "hi"], "--merge_weights acts only with"),
    "assets list with only": (["assets", "--list", "--only", "mmlu"], "--only acts without --list"),
    "chat top_p when greedy": (["chat", "--top_p", "0.5", "hi"], "--top_p acts only with --temperature > 0"),
    # fit's and predict's own options given to another command
    "predict sanity_check": ([*PREDICT, "--sanity_check", "false"], "--sanity_check acts only with `fit`"),
    "validate export_dir": (["validate", *FIT[1:], "--export_dir", "x"], "--export_dir acts only with `fit`"),
    "fit predict_output": ([*FIT, "--predict_output", "x.jsonl"], "acts only with `predict`, not `fit`"),
    "chat threshold with forced route": (
        ["chat", "--checkpoint", "ckpt", "--route", "off", "--threshold", "0.3", "hi"],
        "--threshold acts only with --route gated",
    ),
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


def test_a_checkpoint_exported_before_the_prism_json_digest_still_loads(work, capfd, monkeypatch):
    monkeypatch.chdir(work)
    with pytest.raises(SystemExit) as info:
        main(["chat", "--checkpoint", "old-export", "--max_new_tokens", "2", "hi"])
    assert info.value.code == 0, capfd.readouterr().err[-2000:]


def test_the_prism_json_digest_follows_content_not_layout(work, tmp_path):
    from prism_lightning.model.export import verify_checkpoint

    copy = tmp_path / "reindented"
    shutil.copytree(work / "ckpt", copy)
    meta = json.loads((copy / "prism.json").read_text())
    (copy / "prism.json").write_text(json.dumps(dict(reversed(meta.items())), indent=4))  # same content
    assert verify_checkpoint(copy)["meta_sha256"] == meta["meta_sha256"]


def test_a_context_file_names_a_persona(work, capfd, monkeypatch):
    monkeypatch.chdir(work)
    argv = ["--context_file", "facts.txt", "--persona", "facts", "--model", str(work / "other-weights")]
    with pytest.raises(SystemExit) as info:
        main(["chat", *argv, "--max_new_tokens", "2", "hi"])
    assert info.value.code == 0, capfd.readouterr().err[-2000:]


@pytest.mark.parametrize(
    "case",
    [
        "fit lora_rank -3", "predict malformed line", "chat truncated gate", "chat missing dir",
        "fit run_dir is a file", "chat gate layer 99", "chat edited prism.json", "chat context file alone",
    ],
)  # fmt: skip
def test_bad_input_through_the_real_process(case, work):
    argv, expected = CASES[case]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "prism_lightning", *argv], cwd=work, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    _assert_one_error_line(result.returncode, result.stderr, expected)
