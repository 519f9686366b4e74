"""K-way routing: several adapters and a (K+1)-way gate in one model, exact per-sequence routing in mixed
batches, joint training, export with one plain peft adapter per group, and the fit CLI end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from prism_lightning.backbone import BackboneConfig
from prism_lightning.errors import ConfigError
from prism_lightning.generation import SamplingConfig, generate_batch
from prism_lightning.model.export import export_checkpoint, load_checkpoint
from prism_lightning.model.gate import Gate
from prism_lightning.model.kway_routing import KWayRoutingController
from prism_lightning.model.module import PrismModule
from prism_lightning.model.routing import apply_lora, lora_layers
from prism_lightning.testing import TINY_FIT_YAML, build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 384
NAMES = ["alpha", "beta", "gamma"]


def _kway_model(names=NAMES):
    base = build_tiny_model(VOCAB, layers=4, seed=0).eval()
    model = apply_lora(base, gate_layer=1, rank=4, alpha=8, dropout=0.0, adapter_names=names)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft initialises B to zero: make every adapter do something
            torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def _only(model, name: str | None):
    """Logits function of the plain peft model with one adapter active (None: the base)."""

    def run(ids):
        for layer in lora_layers(model, NAMES[0]):
            layer._active_adapter = [name] if name else list(NAMES)
            layer._disable_adapters = name is None
        with torch.no_grad():
            return model(input_ids=ids).logits

    return run


def test_mixed_batch_routes_each_row_exactly_to_its_adapter_or_the_base():
    model = _kway_model()
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (6, 10))
    # references before any routing hook exists: the plain peft model, one adapter at a time
    want = {name: _only(model, name)(ids) for name in [None, *NAMES]}
    assert not torch.allclose(want["alpha"], want["beta"]) and not torch.allclose(want[None], want["gamma"])
    gate = Gate(model.config.hidden_size, (16,), n_classes=4).eval()
    ctl = KWayRoutingController(model, gate, 1, NAMES)
    routes = torch.tensor([0, 1, 2, 3, 2, 0])
    for grad in (False, True):  # outside autograd only the used adapters run; under it all run, masked
        with torch.set_grad_enabled(grad):
            ctl.set_mask(routes)
            got = model(input_ids=ids).logits.detach()
        for row, route in enumerate(routes.tolist()):
            assert torch.equal(got[row], want[[None, *NAMES][route]][row]), (grad, row, route)
    for route in range(4):  # one route for the whole batch
        ctl.set_mask(route)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, want[[None, *NAMES][route]])
    # the gate decides inside the same forward, after layer k, from the last token
    with torch.no_grad():
        ctl.arm(decide=True)
        got = model(input_ids=ids).logits
    decided = ctl.decision.tolist()
    assert ctl.probs.shape == (6, 4)
    for row, route in enumerate(decided):
        assert torch.equal(got[row], want[[None, *NAMES][route]][row])
    with pytest.raises(ValueError, match="routes must be in 0..3"):
        ctl.set_mask(torch.tensor([0, 4]))
    ctl.remove()


def test_adapter_groups_are_checked_before_any_work(tiny_model_dir):
    common = dict(backbone=BackboneConfig(model=str(tiny_model_dir)))
    with pytest.raises(ConfigError, match="at least 2 adapters"):
        PrismModule(adapters={"only": ["math"]}, **common)
    with pytest.raises(ConfigError, match="'math' is in both"):
        PrismModule(adapters={"a1": ["math"], "a2": ["math", "coding"]}, **common)
    with pytest.raises(ConfigError, match="not usable"):
        PrismModule(adapters={"default": ["math"], "a2": ["coding"]}, **common)
    with pytest.raises(ConfigError, match="retain_weight"):
        PrismModule(adapters={"a1": ["math"], "a2": ["coding"]}, retain_weight=0.5, **common)
    module = PrismModule(adapters={"a1": ["math"], "a2": ["coding"]}, **common)
    with pytest.raises(ConfigError, match=r"\['writing'\] are in no adapter"):
        module.set_persona_names(["math", "coding", "writing"])


# -- training + export on the tiny model ---------------------------------------------------------------

PERSONAS = ["math", "coding", "writing"]
GROUPS = {"numbers": ["math"], "code": ["coding"], "prose": ["writing"]}
ROWS = [  # (query, persona index, distill?)  -- "prose" has no distill row at all
    ("What is twelve times seven?", 0, 1),
    ("Compute 3 + 4 * 5 = ?", 0, 1),
    ("def add(a, b): return a + b", 1, 1),
    ("Fix this loop: for i in range(3) print(i)", 1, 1),
    ("Write a short poem about the sea.", 2, 0),
    ("Explain how photosynthesis works.", 0, 0),
    ("Which answer is more helpful?", 1, 0),
    ("History, philosophy and art.", 2, 0),
]


@torch.no_grad()
def _batches(module: PrismModule, top_k: int = 8) -> list[dict]:
    """Two batches in the data module's schema; the teacher is the base model with the persona."""
    tok, fmt, model = module.tokenizer, module.formatter, module.model
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    out = []
    for chunk in (ROWS[0::2], ROWS[1::2]):
        prompts = [enc(fmt.prompt(q)) for q, _, _ in chunk]
        resp = [enc("The answer is here.") + [tok.eos_token_id] for _ in chunk]
        width = max(len(p) + len(r) for p, r in zip(prompts, resp, strict=True))
        n, rmax = len(chunk), max(len(r) for r in resp)
        batch = {
            "input_ids": torch.full((n, width), tok.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((n, width), dtype=torch.long),
            "prompt_lengths": torch.tensor([len(p) for p in prompts]),
            "response_lengths": torch.tensor([len(r) for r in resp]),
            "gate_target": torch.tensor([float(d) for _, _, d in chunk]),
            "persona_index": torch.tensor([p for _, p, _ in chunk]),
            "teacher_values": torch.zeros((n, rmax, top_k)),
            "teacher_indices": torch.zeros((n, rmax, top_k), dtype=torch.long),
            "teacher_mask": torch.zeros((n, rmax), dtype=torch.bool),
        }
        for j, ((q, persona, distill), p, r) in enumerate(zip(chunk, prompts, resp, strict=True)):
            batch["input_ids"][j, : len(p) + len(r)] = torch.tensor(p + r)
            batch["attention_mask"][j, : len(p) + len(r)] = 1
            if distill:
                tp = enc(fmt.prompt(q, context=f"You are an expert in {PERSONAS[persona]}."))
                module.controller.set_mask(0)
                logits = model(input_ids=torch.tensor([tp + r])).logits[0, len(tp) - 1 : len(tp) - 1 + len(r)]
                top = logits.topk(top_k, dim=-1)
                batch["teacher_values"][j, : len(r)] = top.values
                batch["teacher_indices"][j, : len(r)] = top.indices
                batch["teacher_mask"][j, : len(r)] = True
        out.append(batch)
    return out


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    torch.manual_seed(0)
    module = PrismModule(
        backbone=BackboneConfig(model=str(tiny_model_dir)),
        adapters=GROUPS,
        gate_layer=1,
        lora_rank=4,
        lora_alpha=8,
        lora_dropout=0.0,
        gate_hidden=[16],
        gate_lr=1e-2,
        lora_lr=1e-2,
        warmup_ratio=0.0,
        lr_schedule="constant",
        predict_max_new_tokens=6,
    )
    module._require_model()
    module.set_persona_names(PERSONAS)
    initial = {n: p.detach().clone() for n, p in module.model.named_parameters() if "lora_" in n}
    batches = _batches(module)
    module.eval()
    with torch.no_grad():
        before = [module._common_step(b, i, "val") for i, b in enumerate(batches)]
    module.val_metrics.reset()
    module.val_route_acc.reset()
    module.val_route_rate.reset()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=24, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
        default_root_dir=tmp_path_factory.mktemp("kway-fit"),
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    module.eval()
    with torch.no_grad():
        after = [module._common_step(b, i, "val") for i, b in enumerate(batches)]
    return module, batches, initial, before, after, trainer


def test_one_loop_trains_each_adapter_on_its_own_rows_and_the_gate_on_all(trained):
    module, _, initial, before, after, trainer = trained
    kl0, kl1 = (sum(float(o["kl"]) for o in x) for x in (before, after))
    g0, g1 = (sum(float(o["gate_loss"]) for o in x) for x in (before, after))
    assert kl1 < 0.7 * kl0 and g1 < 0.7 * g0, (kl0, kl1, g0, g1)
    changed = {
        name: not torch.equal(p, initial[n])
        for n, p in module.model.named_parameters()
        if "lora_B" in n
        for name in GROUPS
        if f".{name}." in n
    }
    # "prose" holds writing, which has no distill row: no gradient ever reached it
    assert changed == {"numbers": True, "code": True, "prose": False}
    assert "train/route_acc" in trainer.callback_metrics and "train/gate_auroc" in trainer.callback_metrics


def test_retain_rows_stop_after_the_gate_layer_without_changing_the_losses(trained):
    module, batches, *_ = trained
    with torch.no_grad():
        split = module._common_step(batches[0], 0, "val")
        module._sharded = True  # forces the one-forward path (every row through every layer)
        try:
            whole = module._common_step(batches[0], 0, "val")
        finally:
            module._sharded = False
    for key in ("kl", "gate_loss"):
        assert torch.allclose(split[key], whole[key], rtol=1e-4, atol=1e-6), key


def test_export_writes_one_plain_peft_adapter_per_group_and_loads_back(trained, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module, batches, *_ = trained
    with torch.no_grad():  # make every adapter visible in greedy tokens (a few steps barely move them)
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    out = export_checkpoint(module, tmp_path / "ckpt", personas=PERSONAS, bootstrap_summary=None)
    assert {p.name for p in out.iterdir()} == {"adapters", "gate.safetensors", "prism.json"}
    meta = json.loads((out / "prism.json").read_text())
    assert meta["adapters"] == GROUPS and meta["format_version"] == 2
    routed = load_checkpoint(out, device="cpu")
    ids = batches[0]["input_ids"]
    base_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for route, name in enumerate(GROUPS, 1):
        plain = PeftModel.from_pretrained(base_model, out / "adapters" / name).eval()  # plain peft, alone
        with torch.no_grad():
            want = plain(input_ids=ids).logits
        plain.unload()
        module.controller.set_mask(route)
        routed.controller.set_mask(route)
        with torch.no_grad():
            assert torch.allclose(module.model(input_ids=ids).logits, want, atol=1e-6)
            assert torch.equal(routed.model(input_ids=ids).logits, module.model(input_ids=ids).logits)
    queries = [q for q, _, _ in ROWS]
    assert routed.route_probs(queries).shape == (len(queries), 4)
    assert routed.gate_probs(queries) == module.gate_probs(queries)
    # generation: forced mixed routes in one batch give each row what its adapter (or the base) gives alone
    sampling = SamplingConfig(max_new_tokens=6)
    prompts = routed.prompts(queries[:4])
    alone = {}
    for route, name in enumerate([None, *GROUPS]):
        routed.controller.set_mask(route)
        alone[name] = [g.token_ids for g in generate_batch(routed.model, routed.tokenizer, prompts, sampling)]
    assert len({tuple(map(tuple, v)) for v in alone.values()}) == 4  # every adapter differs from the rest
    forced = [None, "numbers", "code", "prose"]
    outs = routed.generate(queries[:4], sampling=sampling, route=[f or False for f in forced], batch_size=4)
    assert [o.token_ids for o in outs] == [alone[f][i] for i, f in enumerate(forced)]
    assert [o.adapter for o in outs] == forced and [o.route for o in outs] == [False, True, True, True]
    gated = routed.generate(queries[:4], sampling=sampling, batch_size=4)
    assert [o.token_ids for o in gated] == [alone[o.adapter][i] for i, o in enumerate(gated)]
    assert [o.adapter for o in gated] == routed.choose_adapters(queries[:4])
    # evaluate's prism_k condition runs the same routes through the eval engine
    from prism_lightning.engines.hf import HFEngine
    from prism_lightning.eval.conditions import Condition

    engine, mode = HFEngine.from_routed(routed), Condition("prism_k").mode
    assert [o.adapter for o in engine.generate(prompts, sampling, mode=mode, batch_size=4)] == [
        o.adapter for o in gated
    ]
    scored = engine.option_logprobs(prompts, [["A"], ["B"]], mode=mode)
    assert scored.routes == [o.route for o in gated] and scored.adapters == [o.adapter for o in gated]
    chat = routed.chat(["What is twelve times seven?", "And eight?"], replies=["Eighty four."])
    assert chat.adapter == routed.choose_adapters(["What is twelve times seven?"])[0]
    rows = module.predict_step([{"id": "q1", "query": queries[0]}])
    assert rows[0]["adapter"] in [None, *GROUPS]
    # a module serving the export (predict/validate --model.checkpoint) scores the K-way way
    served = PrismModule(checkpoint=str(out))
    served._require_model()
    assert served.adapter_groups == GROUPS
    served.set_persona_names(PERSONAS)
    with torch.no_grad():
        want = module._common_step(batches[0], 0, "val")["kl"]
        assert torch.allclose(served._common_step(batches[0], 0, "val")["kl"], want)


# -- fit CLI end to end --------------------------------------------------------------------------------

KWAY_TINY = """
model:
  adapters:
    numbers: [math]
    code: [coding]
    prose: [writing]
"""


@pytest.mark.slow
def test_fit_cli_trains_and_exports_a_kway_run(tiny_model_dir, tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_FIT_YAML.format(model=tiny_model_dir))
    (tmp_path / "kway.yaml").write_text(KWAY_TINY)
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "prism_lightning", "fit", "--config", str(ROOT / "configs/default.yaml"),
           "--config", "tiny.yaml", "--config", "kway.yaml", "--trainer.max_epochs", "1"]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    export = tmp_path / "checkpoints" / "tiny"
    meta = json.loads((export / "prism.json").read_text())
    assert meta["adapters"] == {"numbers": ["math"], "code": ["coding"], "prose": ["writing"]}
    assert all((export / "adapters" / n / "adapter_config.json").is_file() for n in meta["adapters"])
    assert "routed sanity check" in result.stdout


@pytest.mark.integration
def test_mixed_batch_routing_is_exact_on_the_embedded_model_in_bf16():
    """The real model and dtype that evaluate and chat use: rows routed to none or to any of three
    adapters in one left-padded batch equal each adapter alone and the base, bit for bit."""
    from prism_lightning.backbone import load_backbone
    from prism_lightning.generation import left_pad

    bb = load_backbone("smollm2-135m-instruct", device="cpu", dtype="bfloat16")
    model = apply_lora(bb.model, gate_layer=2, rank=4, alpha=8, dropout=0.0, adapter_names=NAMES).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    queries = ("Hi there.", "What is 2 + 2?", "Write a haiku.", "Name a colour.")
    prompts = [bb.formatter.prompt(q) for q in queries]
    rows = [list(r) for r in bb.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    ids, mask = left_pad(rows, bb.tokenizer.pad_token_id, torch.device("cpu"))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ctl = KWayRoutingController(model, None, 2, NAMES)

    def logits(route):
        ctl.set_mask(route)
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits

    alone = [logits(r) for r in range(4)]
    assert all(not torch.equal(alone[0], a) for a in alone[1:])
    routes = torch.tensor([3, 0, 1, 2])
    mixed = logits(routes)
    for row, route in enumerate(routes.tolist()):
        assert torch.equal(mixed[row], alone[route][row]), (row, route)


def test_prism_k_on_mtbench_keeps_the_first_turns_adapter_on_turn_two(trained, tmp_path):
    """The paper's rule (a conversation keeps its first turn's route) holds for K-way too: turn 2 runs with
    the adapter turn 1 chose, by name, whatever the gate would decide on the longer prompt."""
    from prism_lightning.contexts import ContextLibrary
    from prism_lightning.engines.hf import HFEngine
    from prism_lightning.eval import benchmarks as B
    from prism_lightning.eval import scoring as S
    from prism_lightning.eval.conditions import Condition
    from prism_lightning.eval.scorers import ScoringContext, mtbench_rows
    from prism_lightning.eval.settings import EvalSettings
    from prism_lightning.testing import write_small_mtbench

    module, *_ = trained
    routed = load_checkpoint(export_checkpoint(module, tmp_path / "ckpt", personas=PERSONAS), device="cpu")
    calls = []

    class RecordingEngine(HFEngine):  # the real engine; it only notes the routes it was asked for
        def generate(self, prompts, sampling, **kwargs):
            outs = super().generate(prompts, sampling, **kwargs)
            calls.append((kwargs.get("mode"), kwargs.get("route"), [o.adapter for o in outs]))
            return outs

    engine = RecordingEngine.from_routed(routed)
    files = write_small_mtbench(
        tmp_path, turns=lambda qid, cat: [f"What is {qid} times seven?", "Now a poem."]
    )
    items = B.load_mtbench(files[1], references=files[3])
    for r in items:
        r["group"] = r["category"]
    settings = EvalSettings(mtbench_max_new_tokens=4, judge_mode="generate", judge_max_new_tokens=2)
    ctx = ScoringContext(engine, engine, ContextLibrary.builtin(), settings, "tiny",
                         S.load_judge_prompts(files[5]))  # fmt: skip
    rows = mtbench_rows(ctx, Condition("prism_k"), items)
    (mode1, route1, adapters1), (mode2, route2, adapters2) = calls[0], calls[1]
    assert mode1 == mode2 == "gated_k" and route1 is None
    assert route2 == [a or False for a in adapters1] and adapters2 == adapters1
    assert [r["adapter"] for r in rows] == adapters1
