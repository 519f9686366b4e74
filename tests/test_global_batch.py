"""data.global_batch_size: the rows per optimiser step stay the same whatever the number of processes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from prism_lightning.data.datamodule import PrismDataModule, accumulation_for
from prism_lightning.errors import ConfigError
from prism_lightning.testing import run_script

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


@pytest.mark.parametrize(("world", "accumulate"), [(1, 8), (2, 4), (8, 1)])
def test_accumulation_is_derived_from_the_global_batch(world, accumulate):
    assert accumulation_for(16, 2, world) == accumulate
    trainer = SimpleNamespace(num_nodes=1, num_devices=world, accumulate_grad_batches=1)
    PrismDataModule(batch_size=2, global_batch_size=16).apply_global_batch(trainer)
    assert trainer.accumulate_grad_batches == accumulate
    assert 2 * trainer.accumulate_grad_batches * world == 16


def test_nodes_count_in_the_world_size():
    trainer = SimpleNamespace(num_nodes=2, num_devices=4, accumulate_grad_batches=4)
    PrismDataModule(batch_size=1, global_batch_size=16).apply_global_batch(trainer)
    assert trainer.accumulate_grad_batches == 2


def test_a_global_batch_that_does_not_divide_names_the_numbers_and_what_would():
    with pytest.raises(ConfigError) as info:
        accumulation_for(16, 4, 8)
    message = str(info.value)
    assert "data.global_batch_size=16" in message and "data.batch_size (4)" in message
    assert "world size (8) = 32" in message
    assert "set data.batch_size to 1 or 2" in message and "a multiple of 32" in message
    with pytest.raises(ConfigError, match=r"no data.batch_size divides it over 3 processes"):
        accumulation_for(16, 2, 3)


def test_null_keeps_the_configured_accumulation():
    trainer = SimpleNamespace(num_nodes=1, num_devices=8, accumulate_grad_batches=3)
    PrismDataModule(batch_size=4).apply_global_batch(trainer)
    assert trainer.accumulate_grad_batches == 3
    with pytest.raises(ConfigError, match="global_batch_size must be >= 1"):
        PrismDataModule(global_batch_size=0)


@pytest.mark.parametrize("name", ["qwen2.5-7b.yaml", "llama3.1-8b.yaml", "mistral-7b.yaml"])
def test_7b_configs_train_with_16_rows_per_step_on_1_2_4_or_8_gpus(name):
    config = yaml.safe_load((CONFIGS / name).read_text())
    assert config["data"]["global_batch_size"] == 16
    assert "accumulate_grad_batches" not in config["trainer"]  # derived, not fixed
    for world in (1, 2, 4, 8):
        accumulate = accumulation_for(16, config["data"]["batch_size"], world)
        assert config["data"]["batch_size"] * accumulate * world == 16


def test_fit_refuses_a_global_batch_the_processes_cannot_split(tiny_model_dir, tmp_path, capfd, monkeypatch):
    from prism_lightning.cli import main
    from prism_lightning.testing import TINY_FIT_YAML

    (tmp_path / "tiny.yaml").write_text(TINY_FIT_YAML.format(model=tiny_model_dir))
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "--config", str(CONFIGS / "default.yaml"), "--config", "tiny.yaml"]
    with pytest.raises(SystemExit) as info:
        main([*argv, "--data.run_dir", "runs/never", "--data.global_batch_size", "6"])
    err = capfd.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [err.rstrip().splitlines()[-1]]
    want = "data.global_batch_size=6 is not a multiple of data.batch_size (4) x world size (1) = 4"
    assert want in errors[0]
    assert "set data.batch_size to 1 or 2 or 3 or 6" in errors[0]
    assert not (tmp_path / "runs" / "never" / "bootstrap").exists()  # before the bootstrap's work


# Two CPU processes, 17 training rows, 2 rows per process and micro-batch, global batch 8 (so accumulation
# 2), 2 epochs. Per epoch each process gets ceil(17 / 2) = 9 rows (the distributed sampler repeats one),
# ceil(9 / 2) = 5 micro-batches and ceil(5 / 2) = 3 optimiser steps = ceil(17 / 8).
ROWS, BATCH, GLOBAL, EPOCHS = 17, 2, 8, 2
SCRIPT = """
import json, sys, torch, lightning as L
sys.path.insert(0, {tests!r})
from test_model import make_module
from transformers import AutoTokenizer
from prism_lightning.data.datamodule import PrismDataModule, PrismExamples, build_example

tok = AutoTokenizer.from_pretrained({model_dir!r})
gen = torch.Generator().manual_seed(0)
dm = PrismDataModule(batch_size={batch}, global_batch_size={global_batch})
k = dm.bootstrap.teacher_top_k
rows = []
for i in range({rows}):
    prompt = torch.randint(3, 300, (5 + i % 3,), generator=gen).tolist()
    response = torch.randint(3, 300, (4,), generator=gen).tolist()
    teacher = {{"values": torch.randn(4, k, generator=gen),
               "indices": torch.randint(0, 300, (4, k), generator=gen)}}
    rows.append(build_example(prompt, response, i % 2, teacher if i % 2 else None, 64, str(i)))
dm.tokenizer, dm.train_set, dm.val_set = tok, PrismExamples(rows), PrismExamples(rows[:2])
dm.prepare_data = lambda: None  # rows built here, no bootstrap on disk
dm.split_summary = {{"train": {{"distill": {rows} // 2, "retain": {rows} - {rows} // 2}}, "val": {{}}}}
module = make_module({model_dir!r}, warmup_ratio=0.25)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs={epochs}, logger=False,
                    enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                    limit_val_batches=0, default_root_dir={root!r})
trainer.fit(module, datamodule=dm)
if trainer.global_rank == 0:
    print("RESULT " + json.dumps({{"global_step": trainer.global_step, "plan": module.plan}}))
"""


@pytest.mark.slow
def test_two_process_fit_takes_ceil_rows_over_global_optimiser_steps_per_epoch(tiny_model_dir, tmp_path):
    source = SCRIPT.format(
        tests=str(Path(__file__).parent),
        model_dir=str(tiny_model_dir),
        root=str(tmp_path),
        rows=ROWS,
        batch=BATCH,
        global_batch=GLOBAL,
        epochs=EPOCHS,
    )
    proc = run_script(tmp_path / "fit.py", source)
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    steps = math.ceil(ROWS / GLOBAL) * EPOCHS
    assert result["global_step"] == steps == 6
    assert result["plan"] == {
        "rows": ROWS,
        "world_size": 2,
        "per_device_batch": BATCH,
        "accumulate_grad_batches": 2,
        "global_batch": GLOBAL,
        "steps_per_epoch": 3,
        "optimizer_steps": steps,
        "warmup_steps": round(steps * 0.25),
    }
    block = proc.stdout.split("training plan", 1)[1].splitlines()[1:9]
    printed = {line[:28].strip(): line[28:].strip() for line in block}
    assert printed["global batch"] == "8" and printed["gradient accumulation"] == "2"
    assert printed["optimiser steps"] == "6" and printed["warmup steps"] == "2"
    assert proc.stdout.count("training plan") == 1  # rank 0 only
