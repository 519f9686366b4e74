"""`fit` → export → `predict` → `chat --checkpoint` through the real CLI on a tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prism_lightning.testing import TINY_FIT_YAML

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "prism_lightning", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


@pytest.fixture(scope="module")
def fitted(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("fit")
    override = work / "tiny.yaml"
    override.write_text(TINY_FIT_YAML.format(model=tiny_model_dir))
    result = run_cli(
        "fit", "--config", str(ROOT / "configs/default.yaml"), "--config", str(override), cwd=work
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return work, result


def test_fit_bootstraps_trains_exports_and_routes(fitted):
    work, result = fitted
    export = work / "checkpoints" / "tiny"
    assert (export / "adapter" / "adapter_config.json").exists()
    assert (export / "gate.safetensors").exists()
    meta = json.loads((export / "prism.json").read_text())
    assert meta["personas"] == ["math", "coding", "writing"]
    assert meta["bootstrap_summary"]["stages"]["verdicts"]["rows"] > 0
    metrics = meta["training_config"]["metrics"]
    assert "val/kl" in metrics["before_fit"] and "val/kl" in metrics["after_fit"]
    test = metrics["test"]  # the exported gate on rows neither trained nor selected on (data.test_fraction)
    assert test["rows"] >= 1 and test["rows"] == test["distill"] + test["retain"]
    assert test["gate_acc"]["lo"] <= test["gate_acc"]["mean"] <= test["gate_acc"]["hi"]
    assert f"test split ({test['rows']} rows" in result.stdout
    assert "routed sanity check" in result.stdout
    assert list((work / "runs" / "tiny" / "wandb").glob("offline-run-*"))  # W&B offline without a key
    assert (work / "runs" / "tiny" / "config.yaml").exists()
    adapter_cfg = json.loads((export / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == meta["base_model"]["name"]  # as the user named it
    assert meta["files"]["gate.safetensors"]  # content hashes checked at load time
    assert meta["base_model"]["weights"]["embedding"]  # the base weights' fingerprint, checked at load
    # one line per log record: Lightning's own handler only, and no litlogger advertisement
    assert not [line for line in result.stderr.splitlines() if line.startswith("INFO lightning.")]
    assert "litlogger" not in result.stderr


def test_two_run_dirs_share_no_file_and_export_from_is_explicit(tiny_model_dir, tmp_path):
    """With the default config's ModelCheckpoint and W&B logger, two runs that differ only in data.run_dir
    write every output under their own directory; --export_from best exports the best checkpoint."""
    override = tmp_path / "tiny.yaml"
    text = TINY_FIT_YAML.format(model=tiny_model_dir)
    override.write_text(text.replace("  callbacks: []\n  enable_checkpointing: false\n", ""))
    default = str(ROOT / "configs/default.yaml")
    common = ["fit", "--config", default, "--config", str(override), "--sanity_check", "false"]
    first = run_cli(*common, "--data.run_dir", "runs/a", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(*common, "--data.run_dir", "runs/b", "--export_from", "best", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["a", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "runs", "tiny.yaml"]
    for run in "ab":
        root = tmp_path / "runs" / run
        assert (root / "lightning" / "last.ckpt").exists() and (root / "config.yaml").exists()
        assert list((root / "wandb").glob("offline-run-*"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["a", "b"]
    exported = {
        run: json.loads((tmp_path / "checkpoints" / run / "prism.json").read_text())["training_config"]
        for run in "ab"
    }
    assert exported["a"]["exported_from"]["weights"] == "last"
    assert exported["b"]["exported_from"]["weights"] == "best"
    assert "runs/b/lightning/epoch=" in exported["b"]["exported_from"]["checkpoint"]
    assert "<- best" in second.stdout and "<- last" in first.stdout


def test_second_bootstrap_is_a_no_op(fitted):
    work, _ = fitted
    boot = work / "runs" / "tiny" / "bootstrap"
    rows_before = {p: p.stat().st_mtime_ns for p in boot.glob("*/rows.jsonl")}
    assert len(rows_before) == 4  # queries, answers, verdicts, teacher
    result = run_cli(
        "bootstrap",
        "--config",
        str(ROOT / "configs/default.yaml"),
        "--config",
        str(work / "tiny.yaml"),
        cwd=work,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in boot.glob("*/rows.jsonl")} == rows_before
    assert "Loaded" not in result.stderr  # no model was loaded


def test_predict_writes_route_and_gate_probability_per_row(fitted):
    work, _ = fitted
    prompts = work / "prompts.jsonl"
    prompts.write_text('{"id": "a", "query": "What is 2+2?"}\n{"prompt": "Write a poem."}')
    out = work / "routed.jsonl"
    result = run_cli(
        "predict", "--config", str(work / "tiny.yaml"), "--model.checkpoint", "checkpoints/tiny",
        "--model.predict_max_new_tokens", "4", "--data.predict_file", str(prompts),
        "--predict_output", str(out), cwd=work,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", 1]
    for row in rows:
        assert isinstance(row["route"], bool) and 0.0 <= row["gate_prob"] <= 1.0 and "response" in row


def test_chat_with_checkpoint_prints_the_route(fitted):
    work, _ = fitted
    result = run_cli("chat", "--checkpoint", "checkpoints/tiny", "--max_new_tokens", "4", "hello", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[route: " in result.stderr and "gate p=" in result.stderr
    forced = ("chat", "--checkpoint", "checkpoints/tiny", "--max_new_tokens", "4", "--route", "on", "hello")
    merged = run_cli(*forced, "--merge_weights", cwd=work)
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert "[route: adapter" in merged.stderr


def test_validate_and_test_score_the_exported_checkpoint(fitted):
    work, _ = fitted
    for command, key in (("validate", "val/kl"), ("test", "test/kl")):
        result = run_cli(
            command, "--config", str(work / "tiny.yaml"), "--model.checkpoint", "checkpoints/tiny", cwd=work
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert key in result.stdout and "gate_auroc" in result.stdout


def test_sigterm_during_training_exits_143_without_an_export(tiny_model_dir, tmp_path):
    """Lightning ends `fit` on SIGTERM with a bare SystemExit (exit code 0); the CLI says what stopped
    it and exits 143, so a scheduler does not take a killed run for a finished one."""
    import signal
    import time

    override = tmp_path / "tiny.yaml"
    long_fit = TINY_FIT_YAML.format(model=tiny_model_dir).replace("max_epochs: 2", "max_epochs: 500")
    override.write_text(long_fit)
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    err_file = open(tmp_path / "stderr.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prism_lightning",
            "fit",
            "--config",
            str(ROOT / "configs/default.yaml"),
            "--config",
            str(override),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=err_file,
        text=True,
    )  # fmt: skip  (stderr to a file: an undrained pipe could fill up and stall the run)
    deadline = time.time() + 300
    for line in proc.stdout:  # the plan is printed when training starts
        if line.startswith("training plan") or time.time() > deadline:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    err_file.close()
    err = (tmp_path / "stderr.log").read_text()
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM during `fit`" in err
    assert not (tmp_path / "checkpoints" / "tiny" / "prism.json").exists()  # no half-trained export
