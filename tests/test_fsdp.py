"""Sharded (FSDP2) training on two CPU processes (gloo) against DDP from the same seed and batches:
equal losses, equal exports (the adapter loads with plain peft), and resume from a .ckpt; under FSDP only
rank 0 reads the base. The ranks'
batches differ in kind (mixed on rank 0; all-distill, then all-retain on rank 1), so a pass that
depended on a rank's own rows would desynchronise the layers' all-gathers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prism_lightning.testing import run_script

# One run per strategy: rank r trains on its own batches (so the gradient reduction matters), then
# validates, exports through PrismExport, saves a .ckpt at step 2 and resumes from it for a third step.
SCRIPT = """
import json, os, sys, torch, lightning as L
sys.path.insert(0, {tests!r})
from test_model import make_module, make_batches
from prism_lightning.callbacks import PrismExport
from prism_lightning.model.sharding import fsdp_strategy

def strategy():
    return fsdp_strategy() if {kind!r} == "fsdp" else "ddp"

class Losses(L.Callback):
    def __init__(self):
        self.losses = []
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

def trainer(max_steps, callbacks):
    return L.Trainer(accelerator="cpu", devices=2, strategy=strategy(), max_steps=max_steps, logger=False,
                     enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                     use_distributed_sampler=False, gradient_clip_val=1.0, callbacks=callbacks,
                     default_root_dir={root!r})

rank = int(os.environ.get("LOCAL_RANK", 0))
torch.manual_seed(0)
batches = make_batches(make_module({model_dir!r}), n_batches=4)
for i, target in ((1, 1.0), (3, 0.0)):  # rank 1 gets an all-distill, then an all-retain batch
    batches[i]["gate_target"][:] = target
loader = torch.utils.data.DataLoader(batches[rank::2], batch_size=None)
torch.manual_seed(0)
module = make_module({model_dir!r}, gradient_checkpointing=True)  # as the 7B configs train
losses = Losses()
first = trainer(2, [losses, PrismExport(export_dir={root!r} + "/export")])
first.fit(module, train_dataloaders=loader)
first.validate(module, dataloaders=loader, verbose=False)
val = float(first.callback_metrics["val/loss"])
first.save_checkpoint({root!r} + "/step2.ckpt")
# the export, served through the same strategy (model.checkpoint), scores the same
first.validate(make_module({model_dir!r}, checkpoint={root!r} + "/export"), dataloaders=loader, verbose=False)
val_export = float(first.callback_metrics["val/loss"])

resumed = Losses()
torch.manual_seed(0)
again = trainer(3, [resumed])
ckpt = {root!r} + "/step2.ckpt"
resume = make_module({model_dir!r}, gradient_checkpointing=True, retain_weight=0.5)  # with a retain loss
again.fit(resume, train_dataloaders=loader, ckpt_path=ckpt)

# export_from=best's reload: the step-2 weights go back into the (sharded) module on every rank
from prism_lightning.callbacks import load_trainable_state
from prism_lightning.model.sharding import trainable_state_dict
saved = torch.load(ckpt, weights_only=True)["state_dict"]
load_trainable_state(again.lightning_module, saved)
gathered = trainable_state_dict(again.lightning_module)
reloaded = rank != 0 or all(torch.equal(gathered[k], v) for k, v in saved.items())
from torch.distributed.tensor import DTensor
lora = next(p for n, p in module.named_parameters() if "lora_A" in n)
local = lora.to_local().numel() if isinstance(lora, DTensor) else lora.numel()
out = {{"base_read": module.base_weights_fingerprint is not None, "reloaded": reloaded,
        "sharded_share": local / lora.numel(), "train": losses.losses, "val": val,
        "val_export": val_export, "resumed": resumed.losses, "step": again.global_step,
        "world": again.world_size, "strategy": type(again.strategy).__name__}}
with open({root!r} + f"/result{{rank}}.json", "w") as fh:
    json.dump(out, fh)
"""


def run_two_processes(kind: str, model_dir: Path, root: Path) -> dict:
    root.mkdir()
    source = SCRIPT.format(
        tests=str(Path(__file__).parent), model_dir=str(model_dir), root=str(root), kind=kind
    )
    run_script(root / "run.py", source, timeout=400)
    return {rank: json.loads((root / f"result{rank}.json").read_text()) for rank in (0, 1)}


@pytest.mark.slow
@pytest.mark.second_tier
def test_fsdp_matches_ddp_on_two_cpu_processes(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import prism_lightning.model.module  # noqa: F401 - lets torch.load(weights_only=True) read the hparams

    ddp = run_two_processes("ddp", tiny_model_dir, tmp_path / "ddp")
    fsdp = run_two_processes("fsdp", tiny_model_dir, tmp_path / "fsdp")
    assert fsdp[0]["strategy"] == "PrismFSDPStrategy" and fsdp[0]["world"] == 2
    assert fsdp[0]["sharded_share"] == fsdp[1]["sharded_share"] == 0.5  # each rank holds half a LoRA matrix
    assert ddp[0]["sharded_share"] == 1.0
    assert fsdp[0]["reloaded"] and ddp[0]["reloaded"]
    # under FSDP only rank 0 read the base; rank 1 got its shards from rank 0 (and still matches DDP)
    assert (fsdp[0]["base_read"], fsdp[1]["base_read"]) == (True, False)
    assert ddp[0]["base_read"] and ddp[1]["base_read"]
    for rank in (0, 1):
        assert len(fsdp[rank]["train"]) == 2
        torch.testing.assert_close(fsdp[rank]["train"], ddp[rank]["train"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fsdp[rank]["val"], ddp[rank]["val"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fsdp[rank]["val_export"], fsdp[rank]["val"], atol=1e-5, rtol=1e-4)
        # resumed from the step-2 .ckpt: the third step's loss is the same as DDP's
        assert fsdp[rank]["step"] == ddp[rank]["step"] == 3
        torch.testing.assert_close(fsdp[rank]["resumed"], ddp[rank]["resumed"], atol=1e-5, rtol=1e-4)
    # the .ckpt holds the adapter and the gate only, gathered whole, equal to DDP's
    saved = {
        kind: torch.load(tmp_path / kind / "step2.ckpt", weights_only=True)["state_dict"]
        for kind in ("ddp", "fsdp")
    }
    assert sorted(saved["fsdp"]) == sorted(saved["ddp"])
    assert all(k.startswith("gate.") or "lora_" in k for k in saved["fsdp"])
    for key, value in saved["ddp"].items():
        torch.testing.assert_close(saved["fsdp"][key], value, atol=1e-5, rtol=1e-4)
    # the sharded export is whole: plain peft loads it and gives DDP's logits; the gates are equal
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = {}
    for kind in ("ddp", "fsdp"):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        plain = PeftModel.from_pretrained(base, tmp_path / kind / "export" / "adapter").eval()
        with torch.no_grad():
            logits[kind] = plain(input_ids=ids).logits
    with torch.no_grad():
        plain_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(input_ids=ids).logits
    assert not torch.allclose(logits["ddp"], plain_base, atol=1e-4)  # the adapter trained
    torch.testing.assert_close(logits["fsdp"], logits["ddp"], atol=1e-5, rtol=1e-4)
    gates = {k: load_file(str(tmp_path / k / "export" / "gate.safetensors")) for k in ("ddp", "fsdp")}
    assert sorted(gates["fsdp"]) == sorted(gates["ddp"])
    for key, value in gates["ddp"].items():
        torch.testing.assert_close(gates["fsdp"][key], value, atol=1e-5, rtol=1e-4)


CPU_FSDP_YAML = """
trainer:
  accelerator: cpu
  devices: 2
  strategy:
    class_path: prism_lightning.model.sharding.PrismFSDPStrategy
  precision: 32-true
data:
  batch_size: 2
  global_batch_size: 8
"""


@pytest.mark.slow
def test_fit_cli_with_the_sharded_strategy(tiny_model_dir, tmp_path):
    """The whole `fit` (bootstrap as DDP predict, validation before fit, sharded training, gathered export,
    routed sanity check) with the FSDP strategy on two CPU processes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from prism_lightning.testing import TINY_FIT_YAML

    (tmp_path / "tiny.yaml").write_text(TINY_FIT_YAML.format(model=tiny_model_dir))
    (tmp_path / "cpu_fsdp.yaml").write_text(CPU_FSDP_YAML)
    root = Path(__file__).resolve().parents[1]
    configs = [str(root / "configs/default.yaml"), "tiny.yaml", "cpu_fsdp.yaml"]
    args = [a for path in configs for a in ("--config", path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=str(root))
    proc = subprocess.run(
        [sys.executable, "-m", "prism_lightning", "fit", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "routed sanity check" in proc.stdout
    meta = json.loads((tmp_path / "checkpoints" / "tiny" / "prism.json").read_text())
    plan = meta["training_config"]["plan"]
    assert plan["world_size"] == 2 and plan["global_batch"] == 8 and plan["accumulate_grad_batches"] == 2
    assert meta["training_config"]["exported_from"]["global_step"] == plan["optimizer_steps"]
    assert meta["base_model"]["weights"]["embedding"]  # fingerprinted before sharding, not from a shard
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain = PeftModel.from_pretrained(base, tmp_path / "checkpoints" / "tiny" / "adapter")
    assert any("lora_A" in name for name, _ in plain.named_parameters())
