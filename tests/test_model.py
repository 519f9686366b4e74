"""PrismModule: joint training, export/load round trip, routed generation, DDP, resume."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from prism_lightning.backbone import BackboneConfig
from prism_lightning.generation import SamplingConfig, generate_batch
from prism_lightning.model.export import CheckpointMismatchError, export_checkpoint, load_checkpoint
from prism_lightning.model.module import PrismModule
from prism_lightning.testing import run_script

DISTILL_QUERIES = [
    "What is twelve times seven?",
    "Compute 3 + 4 * 5 = ?",
    "Explain 0 1 2 3 4 5 in math.",
    "def add(a, b): return a + b",
]
RETAIN_QUERIES = [
    "Write a short poem about the sea.",
    "History, philosophy, literature and art.",
    "Explain how photosynthesis works in plants.",
    "Which answer is more helpful and clear?",
]
RESPONSES = ["The answer is eighty four.", "I cannot help with that request.", "Output A is better.", "Sea."]
PERSONA = "You are a mathematician."


def make_module(model_dir, **kw) -> PrismModule:
    defaults = dict(
        backbone=BackboneConfig(model=str(model_dir)),
        lora_rank=4,
        lora_alpha=8,
        lora_dropout=0.0,
        gate_hidden=[16, 8],
        gate_lr=1e-2,
        lora_lr=1e-2,
        warmup_ratio=0.0,
        lr_schedule="constant",
        predict_max_new_tokens=6,
    )
    defaults.update(kw)
    return PrismModule(**defaults)


@torch.no_grad()
def make_batches(module: PrismModule, n_batches: int = 2, top_k: int = 8) -> list[dict]:
    """Batches in the datamodule's schema; teacher = the base model WITH the persona in the prompt."""
    module._require_model()
    tok, fmt, model = module.tokenizer, module.formatter, module.model
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = []
    for i, q in enumerate(DISTILL_QUERIES + RETAIN_QUERIES):
        rows.append((q, RESPONSES[i % len(RESPONSES)], float(i < len(DISTILL_QUERIES))))
    batches = []
    per = len(rows) // n_batches
    for b in range(n_batches):
        chunk = rows[b::n_batches][:per]
        prompts = [enc(fmt.prompt(q)) for q, _, _ in chunk]
        resps = [enc(r) + [tok.eos_token_id] for _, r, _ in chunk]
        width = max(len(p) + len(r) for p, r in zip(prompts, resps, strict=True))
        rmax = max(len(r) for r in resps)
        n = len(chunk)
        ids = torch.full((n, width), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros((n, width), dtype=torch.long)
        tv = torch.zeros((n, rmax, top_k))
        ti = torch.zeros((n, rmax, top_k), dtype=torch.long)
        tm = torch.zeros((n, rmax), dtype=torch.bool)
        for j, ((q, _, target), p, r) in enumerate(zip(chunk, prompts, resps, strict=True)):
            ids[j, : len(p) + len(r)] = torch.tensor(p + r)
            attn[j, : len(p) + len(r)] = 1
            if target:
                tp = enc(fmt.prompt(q, context=PERSONA))
                with model.disable_adapter():
                    logits = model(input_ids=torch.tensor([tp + r])).logits[0]
                resp_logits = logits[len(tp) - 1 : len(tp) - 1 + len(r)]
                top = resp_logits.topk(top_k, dim=-1)
                tv[j, : len(r)], ti[j, : len(r)], tm[j, : len(r)] = top.values, top.indices, True
        batches.append(
            {
                "input_ids": ids,
                "attention_mask": attn,
                "prompt_lengths": torch.tensor([len(p) for p in prompts]),
                "response_lengths": torch.tensor([len(r) for r in resps]),
                "gate_target": torch.tensor([t for _, _, t in chunk]),
                "teacher_values": tv,
                "teacher_indices": ti,
                "teacher_mask": tm,
            }
        )
    return batches


def _trainer(tmp_path, max_steps, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        **kw,
    )


def _losses(module, batches):
    module.eval()
    with torch.no_grad():
        outs = [module._common_step(b, i, "val") for i, b in enumerate(batches)]
    module.val_metrics.reset()
    module.val_route_rate.reset()
    return sum(float(o["kl"]) for o in outs), sum(float(o["gate_loss"]) for o in outs)


def test_fit_reduces_kl_and_trains_gate(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    module = make_module(tiny_model_dir)
    batches = make_batches(module)
    kl0, gate0 = _losses(module, batches)
    assert kl0 > 0  # the teacher saw the persona: a non-trivial target
    trainer = _trainer(tmp_path, max_steps=30, log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    kl1, gate1 = _losses(module, batches)
    assert kl1 < 0.7 * kl0, (kl0, kl1)
    assert gate1 < 0.7 * gate0, (gate0, gate1)
    assert "train/gate_auroc" in trainer.callback_metrics
    assert "train/routing_rate" in trainer.callback_metrics
    # base weights stayed frozen; only LoRA (layers > 0) and the gate train
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert all(n.startswith("gate.") or "lora_" in n for n in trainable)
    assert not any(".layers.0." in n for n in trainable)


def test_retain_loss_and_gradient_checkpointing(tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir, retain_weight=0.5, gradient_checkpointing=True)
    batches = make_batches(module)
    module.train()
    out = module._common_step(batches[0], 0, "train")
    assert out["retain_kl"] >= 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.lora_parameters())
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert trainer.global_step == 2


def test_bad_config_errors(tiny_model_dir):
    with pytest.raises(ValueError, match="valid choices: 0..2"):
        make_module(tiny_model_dir, gate_layer=3).configure_model()
    with pytest.raises(ValueError, match="valid choices: .*q_proj"):
        make_module(tiny_model_dir, lora_target_modules=["c_attn"]).configure_model()
    with pytest.raises(ValueError, match="lr_schedule"):
        make_module(tiny_model_dir, lr_schedule="step")


def test_nan_loss_raises_with_step_and_batch(tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir)
    batches = make_batches(module)
    batches[1]["teacher_values"][batches[1]["teacher_mask"]] = float("nan")
    batches[1]["gate_target"][:] = 1.0
    batches[1]["teacher_mask"][:, 0] = True
    trainer = _trainer(tmp_path, max_steps=4)
    with pytest.raises(FloatingPointError, match=r"global step 1, batch index 1"):
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))


def _trained_module(model_dir, tmp_path, steps=3):
    torch.manual_seed(0)
    module = make_module(model_dir)
    batches = make_batches(module)
    _trainer(tmp_path, max_steps=steps).fit(
        module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None)
    )
    return module.eval(), batches


def test_export_load_round_trip_and_plain_peft(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module, batches = _trained_module(tiny_model_dir, tmp_path)
    out = export_checkpoint(module, tmp_path / "ckpt", personas=["math"], bootstrap_summary={"distill": 4})
    assert {p.name for p in out.iterdir()} == {"adapter", "gate.safetensors", "prism.json"}
    routed = load_checkpoint(out, device="cpu")
    ids = batches[0]["input_ids"]
    module.controller.reset()
    with torch.no_grad():
        want = module.model(input_ids=ids).logits
        got = routed.model(input_ids=ids).logits
    assert torch.equal(want, got)
    queries = DISTILL_QUERIES + RETAIN_QUERIES
    assert routed.gate_probs(queries) == module.gate_probs(queries)
    assert routed.meta["personas"] == ["math"] and routed.meta["gate_layer"] == 0
    # plain peft loads the adapter on its own
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, want, atol=1e-6)
    # re-export over an existing directory is atomic and leaves no temporaries
    export_checkpoint(module, out, personas=["math"], bootstrap_summary=None, training_config={"x": 1})
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_base_mismatch_error(tiny_model_dir, tmp_path):
    from prism_lightning.testing import save_tiny_model

    module, _ = _trained_module(tiny_model_dir, tmp_path, steps=1)
    out = export_checkpoint(module, tmp_path / "ckpt", personas=[], bootstrap_summary=None)
    other = save_tiny_model(tmp_path / "other", layers=5)
    with pytest.raises(CheckpointMismatchError, match="was trained on .* but you loaded"):
        load_checkpoint(out, device="cpu", backbone_override=BackboneConfig(model=str(other)))


def test_routed_generation_matches_base_and_adapter(tiny_model_dir, tmp_path):
    module, _ = _trained_module(tiny_model_dir, tmp_path, steps=2)
    torch.manual_seed(0)
    with torch.no_grad():  # a few steps barely move a random model's argmax: make the adapter visible
        for name, p in module.model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.5)
    out = export_checkpoint(module, tmp_path / "ckpt", personas=[], bootstrap_summary=None)
    routed = load_checkpoint(out, device="cpu")
    queries = DISTILL_QUERIES[:2] + RETAIN_QUERIES[:3]
    sampling = SamplingConfig(max_new_tokens=8)
    prompts = routed.prompts(queries)
    with routed.model.disable_adapter():
        base = [g.token_ids for g in generate_batch(routed.model, routed.tokenizer, prompts, sampling)]
    routed.controller.reset()
    adapter = [g.token_ids for g in generate_batch(routed.model, routed.tokenizer, prompts, sampling)]
    assert base != adapter
    last = routed.gate.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-30.0)
        outs = routed.generate(queries, sampling=sampling, batch_size=2)
        assert [o.token_ids for o in outs] == base and not any(o.route for o in outs)
        last.bias.fill_(30.0)
        outs = routed.generate(queries, sampling=sampling, batch_size=2)
        assert [o.token_ids for o in outs] == adapter and all(o.route for o in outs)
        # mixed routing in one batch (forced per row) equals per-row results
        route = [True, False, True, False, False]
        outs = routed.generate(queries, sampling=sampling, batch_size=8, route=route)
        assert [o.token_ids for o in outs] == [
            a if r else b for a, b, r in zip(adapter, base, route, strict=True)
        ]
        assert routed.generate(queries, mode="off", sampling=sampling)[0].token_ids == base[0]
        # multi-turn: the first turn's decision holds
        chat = routed.chat(["What is twelve times seven?", "And eight?"], replies=["Eighty four."])
        assert chat.route is True
    # predict_step through the LightningModule
    rows = module.predict_step([{"id": "q1", "query": queries[0]}])
    assert set(rows[0]) == {"id", "query", "response", "route", "gate_prob"}
    assert isinstance(rows[0]["route"], bool) and 0.0 <= rows[0]["gate_prob"] <= 1.0


def test_merged_fast_path_serves_all_on_batches_like_peft_merged(tiny_model_dir, tmp_path):
    """All-on batches run on merged weights and equal peft's own merged model bit for bit; all-off
    batches stay the base model; mixed batches keep the masked path; the base weights come back intact."""
    from transformers import AutoModelForCausalLM

    module, batches = _trained_module(tiny_model_dir, tmp_path, steps=1)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.5)
    out = export_checkpoint(module, tmp_path / "ckpt", personas=[], bootstrap_summary=None)
    fast = load_checkpoint(out, device="cpu", merge_weights=True)
    merged = load_checkpoint(out, device="cpu")
    merged.controller.remove()
    merged.model.merge_adapter()  # peft's own merge, the reference for all-on batches
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    unmerged = load_checkpoint(out, device="cpu")
    originals = {n: p for n, p in unmerged.model.named_parameters() if "base_layer" in n}
    ids = batches[0]["input_ids"]
    n = ids.shape[0]
    with torch.no_grad():
        fast.controller.arm(force=torch.ones(n, dtype=torch.bool))
        on = fast.model(input_ids=ids).logits
        assert torch.equal(on, merged.model(input_ids=ids).logits)
        unmerged.controller.reset()
        torch.testing.assert_close(on, unmerged.model(input_ids=ids).logits, rtol=1e-3, atol=1e-3)  # rounding
        fast.controller.arm(force=torch.zeros(n, dtype=torch.bool))
        assert torch.equal(fast.model(input_ids=ids).logits, base(input_ids=ids).logits)
        mixed = torch.tensor([i % 2 == 0 for i in range(n)])
        fast.controller.arm(force=mixed)
        unmerged.controller.arm(force=mixed)
        assert torch.equal(fast.model(input_ids=ids).logits, unmerged.model(input_ids=ids).logits)
        # routed generation, all on: the merged model's tokens
        queries = DISTILL_QUERIES[:3]
        sampling = SamplingConfig(max_new_tokens=6)
        got = fast.generate(queries, sampling=sampling, route=True)
        want = generate_batch(merged.model, merged.tokenizer, merged.prompts(queries), sampling)
        assert [g.token_ids for g in got] == [w.token_ids for w in want] and all(g.route for g in got)
    fast.controller.use_merged_weights(False)
    restored = [torch.equal(p, originals[n]) for n, p in fast.model.named_parameters() if n in originals]
    assert restored and all(restored)  # the base weights were swapped, never written


def test_resume_from_lightning_ckpt(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    module = make_module(tiny_model_dir)
    batches = make_batches(module, n_batches=4)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(module, train_dataloaders=loader)
    ckpt = tmp_path / "step3.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert all(k.startswith("gate.") or "lora_" in k for k in saved)  # no frozen base weights
    lora_key = next(k for k in saved if "lora_B" in k)

    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["step"] = trainer.global_step
            seen["lora"] = dict(pl_module.named_parameters())[lora_key].detach().clone()

    fresh = make_module(tiny_model_dir)
    trainer2 = _trainer(tmp_path, max_steps=5, callbacks=[Probe()])
    trainer2.fit(fresh, train_dataloaders=loader, ckpt_path=ckpt)
    assert seen["step"] == 3 and trainer2.global_step == 5
    assert torch.equal(seen["lora"], saved[lora_key])


DDP_SCRIPT = """
import sys, torch, lightning as L
sys.path.insert(0, {tests!r})
from test_model import make_module, make_batches
torch.manual_seed(0)
module = make_module({model_dir!r})
batches = make_batches(module, n_batches=4)
module = make_module({model_dir!r})  # fresh (unloaded) module for the Trainer
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                    enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                    use_distributed_sampler=False, default_root_dir={root!r})
loader = torch.utils.data.DataLoader(batches, batch_size=None)  # same batches on both ranks
trainer.fit(module, train_dataloaders=loader)
if trainer.global_rank == 0:
    print("DDP-OK", trainer.global_step, trainer.world_size)
"""


@pytest.mark.slow
def test_fit_ddp_two_cpu_processes(tiny_model_dir, tmp_path):
    source = DDP_SCRIPT.format(
        tests=str(Path(__file__).parent), model_dir=str(tiny_model_dir), root=str(tmp_path)
    )
    proc = run_script(tmp_path / "ddp_fit.py", source, timeout=180)
    assert "DDP-OK 2 2" in proc.stdout


def test_retain_rows_stop_after_the_gate_layer_without_changing_the_losses(tiny_model_dir):
    """Without a retain loss, retain rows run only layers <= k; the losses equal the one-pass path's."""
    torch.manual_seed(0)
    module = make_module(tiny_model_dir)
    batch = make_batches(module, n_batches=1)[0]
    assert 0 < float(batch["gate_target"].sum()) < len(batch["gate_target"])  # a mixed batch
    with torch.no_grad():  # a non-zero adapter, so wrong rows or positions would change the KL
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    module.eval()
    with torch.no_grad():
        split = module._common_step(batch, 0, "val")
        module.hparams.retain_weight = 1e-9  # forces the one-pass path over all rows
        one_pass = module._common_step(batch, 0, "val")
    assert float(split["kl"]) > 0
    torch.testing.assert_close(split["kl"], one_pass["kl"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(split["gate_loss"], one_pass["gate_loss"], atol=1e-5, rtol=1e-4)


def test_gate_input_is_standardised_with_the_training_rows_statistics(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    module = make_module(tiny_model_dir)
    batches = make_batches(module)
    feats = torch.cat(
        [
            module.controller.gate_features(b["input_ids"], b["attention_mask"], b["prompt_lengths"] - 1)
            for b in batches
        ]
    )
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    torch.testing.assert_close(module.gate.feature_mean, feats.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        module.gate.feature_std, feats.std(0, unbiased=False) + 1e-5, atol=1e-5, rtol=1e-4
    )
    standardised = (feats - module.gate.feature_mean) / module.gate.feature_std
    assert standardised.std(0).mean() > 0.5  # rows now differ on the gate's scale
