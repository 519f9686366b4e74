"""Routing and training benchmark: ours vs the plain transformers + peft way, same model, same run.

Measures, on one randomly initialised model built from a config (speed does not depend on weights):
  * base prefill and per-token decode latency;
  * routed prefill with our single-pass gate, routed off and routed on (and decode with the adapter);
  * the plain PEFT way: a separate forward with output_hidden_states for the gate features, then a
    prefill with the adapter;
  * training tokens/s and peak memory of PrismModule's step vs a plain peft LoRA step (full logits,
    KL over all positions), same LoRA settings.
Prints ratios against the targets in docs/performance.md.

    python benchmarks/routing_and_training.py --shape tiny --device cpu
    python benchmarks/routing_and_training.py --shape qwen2.5-7b --device cuda --dtype bf16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

SHAPES = {
    "tiny": dict(hidden=64, layers=4, heads=4, kv=2, inter=128, vocab=384, tie=True),
    "smollm2-135m": dict(hidden=576, layers=30, heads=9, kv=3, inter=1536, vocab=49152, tie=True),
    "qwen2.5-7b": dict(hidden=3584, layers=28, heads=28, kv=4, inter=18944, vocab=152064, tie=False),
}


def build_model(shape: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    s = SHAPES[shape]
    common = dict(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        max_position_embeddings=8192,
        tie_word_embeddings=s["tie"],
    )
    torch.manual_seed(0)
    if shape == "qwen2.5-7b":
        cfg, cls = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        cfg, cls = LlamaConfig(**common), LlamaForCausalLM
    cfg.attn_implementation = "sdpa"
    with torch.device(device):
        model = cls(cfg).to(dtype)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn, device: str, reps: int, warmup: int = 2) -> float:
    """Median seconds over ``reps`` runs (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def bench_inference(model, controller, gate, args, device) -> dict:
    from transformers import DynamicCache

    b, s = args.batch, args.prompt_len
    ids = torch.randint(3, model.config.vocab_size, (b, s), device=device)
    mask = torch.ones_like(ids)
    decoder = model.get_base_model()
    last = gate.net[-1]

    @torch.no_grad()
    def prefill(cache=None):
        return model(
            input_ids=ids, attention_mask=mask, use_cache=cache is not None, cache=cache, logits_to_keep=1
        )

    def set_gate(bias: float):
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(bias)

    res = {}
    with model.disable_adapter():
        controller.reset()  # hooks do nothing in the "on" state; adapters disabled by peft
        res["base_prefill_s"] = timeit(prefill, device, args.reps)

    def routed(bias):
        set_gate(bias)

        def run():
            controller.arm()
            prefill()

        return run

    res["routed_off_prefill_s"] = timeit(routed(-30.0), device, args.reps)
    res["routed_on_prefill_s"] = timeit(routed(30.0), device, args.reps)
    controller.reset()
    res["adapter_always_on_prefill_s"] = timeit(prefill, device, args.reps)

    # the plain way: a separate full forward with all hidden states for the gate, then the prefill
    @torch.no_grad()
    def plain_routing():
        with model.disable_adapter():
            out = decoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        probs = torch.sigmoid(gate(out.hidden_states[controller.gate_layer + 1][:, -1]))
        if bool((probs >= 0.5).any()):
            prefill()
        else:
            with model.disable_adapter():
                prefill()

    set_gate(30.0)
    res["plain_peft_routed_on_prefill_s"] = timeit(plain_routing, device, args.reps)
    feats = torch.randn(b, model.config.hidden_size, device=device)
    res["gate_mlp_s"] = timeit(lambda: gate(feats), device, args.reps * 4)

    # decode: per-token latency with KV cache after a prefill
    def decode_latency(routed_bias: float | None) -> float:
        with torch.no_grad():
            if routed_bias is None:
                ctx = model.disable_adapter()
                ctx.__enter__()
                controller.reset()
            else:
                set_gate(routed_bias)
                controller.arm()
            cache = DynamicCache(config=decoder.config)
            prefill(cache)
            tok = ids[:, -1:]
            pos = torch.full((b, 1), s, device=device)
            m = torch.ones((b, s + 1), dtype=torch.long, device=device)

            def step():
                model(input_ids=tok, attention_mask=m, position_ids=pos, cache=cache, use_cache=True)
                cache.crop(-1)  # drop the token just added: every timed step sees s cached tokens

            t = timeit(step, device, args.reps * 2)
            if routed_bias is None:
                ctx.__exit__(None, None, None)
            controller.reset()
            return t

    res["base_decode_token_s"] = decode_latency(None)
    res["routed_on_decode_token_s"] = decode_latency(30.0)
    res["routed_off_decode_token_s"] = decode_latency(-30.0)
    return res


def synthetic_batch(vocab: int, b: int, t: int, k: int, device: str) -> dict:
    plen = t // 2
    r = t - plen
    return {
        "input_ids": torch.randint(3, vocab, (b, t), device=device),
        "attention_mask": torch.ones((b, t), dtype=torch.long, device=device),
        "prompt_lengths": torch.full((b,), plen, device=device),
        "response_lengths": torch.full((b,), r, device=device),
        "gate_target": torch.tensor([1.0, 0.0] * (b // 2) + [1.0] * (b % 2), device=device),
        "teacher_values": torch.randn(b, r, k, device=device).sort(-1, descending=True).values,
        "teacher_indices": torch.randint(0, vocab, (b, r, k), device=device),
        "teacher_mask": torch.ones((b, r), dtype=torch.bool, device=device),
    }


def bench_training(args, device, dtype) -> dict:
    from peft import LoraConfig, get_peft_model

    from prism_lightning.backbone import Backbone
    from prism_lightning.model.losses import topk_kl
    from prism_lightning.model.module import PrismModule

    res = {}
    b, t = args.train_batch, args.train_len
    amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.startswith("cuda") else None

    def ctx():
        return amp if amp is not None else torch.autocast("cpu", enabled=False)

    # ours
    peak_reset(device)
    net = build_model(args.shape, device, dtype)
    module = PrismModule(lora_rank=16, lora_alpha=32, gradient_checkpointing=args.grad_ckpt)
    module.attach_backbone(Backbone("bench", "random", net, None, None))
    module.train()
    batch = synthetic_batch(net.config.vocab_size, b, t, 64, device)
    params = list(module.gate.parameters()) + module.lora_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4)

    def ours():
        with ctx():
            loss = module._common_step(batch, 0, "train")["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_s = timeit(ours, device, args.train_reps, warmup=1)
    res["ours_train_tokens_per_s"] = b * t / step_s
    res["ours_train_peak_gib"] = peak_gib(device)
    module = net = opt = params = None  # free before the plain run
    peak_reset(device)

    # plain transformers + peft: full (B, T, V) logits, KL over all positions
    net = build_model(args.shape, device, dtype)
    for p in net.parameters():
        p.requires_grad_(False)
    n_layers = net.config.num_hidden_layers
    cfg = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        layers_to_transform=list(range(1, n_layers)),
        task_type="CAUSAL_LM",
    )
    plain = get_peft_model(net, cfg)
    if args.grad_ckpt:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        net.enable_input_require_grads()
    plain.train()
    opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-4)
    tv, ti = batch["teacher_values"], batch["teacher_indices"]
    plen = t // 2

    def plain_step():
        with ctx():
            logits = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # teacher targets exist for response positions; the plain way computes logits everywhere
            student = logits[:, plen - 1 : t - 1].float()
            kl = topk_kl(student.reshape(-1, student.shape[-1]), tv.reshape(-1, 64), ti.reshape(-1, 64), 2.0)
            loss = kl.mean() + 0.0 * F.log_softmax(logits.float(), -1)[..., 0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_s = timeit(plain_step, device, args.train_reps, warmup=1)
    res["plain_train_tokens_per_s"] = b * t / step_s
    res["plain_train_peak_gib"] = peak_gib(device)
    plain = net = opt = None
    peak_reset(device)
    return res


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    import peft
    import transformers

    info["transformers"], info["peft"] = transformers.__version__, peft.__version__
    return info


def main(argv=None) -> dict:
    from prism_lightning.backbone import resolve_dtype
    from prism_lightning.model.gate import Gate
    from prism_lightning.model.routing import RoutingController, apply_lora

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-len", type=int, default=1024)
    ap.add_argument("--train-reps", type=int, default=5)
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args(argv)
    device, dtype = args.device, resolve_dtype(args.dtype, args.device)

    model = build_model(args.shape, device, dtype)
    model = apply_lora(model, gate_layer=0, rank=16, alpha=32, dropout=0.05)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    model.eval()
    gate = Gate(model.config.hidden_size).to(device).eval()
    controller = RoutingController(model, gate, 0)
    res = bench_inference(model, controller, gate, args, device)
    del model, controller, gate
    if not args.skip_training:
        res.update(bench_training(args, device, dtype))

    base = res["base_prefill_s"]
    ratios = {
        "routing_overhead_vs_base_prefill": res["routed_off_prefill_s"] / base - 1.0,
        "gate_mlp_vs_base_prefill": res["gate_mlp_s"] / base,
        "routed_on_prefill_vs_base": res["routed_on_prefill_s"] / base,
        "adapter_always_on_prefill_vs_base": res["adapter_always_on_prefill_s"] / base,
        "plain_peft_routed_prefill_vs_base": res["plain_peft_routed_on_prefill_s"] / base,
        "routed_on_decode_vs_base": res["routed_on_decode_token_s"] / res["base_decode_token_s"],
        "routed_off_decode_vs_base": res["routed_off_decode_token_s"] / res["base_decode_token_s"],
    }
    if "ours_train_tokens_per_s" in res:
        ratios["train_tokens_per_s_ours_vs_plain"] = (
            res["ours_train_tokens_per_s"] / res["plain_train_tokens_per_s"]
        )
        if res["ours_train_peak_gib"] is not None:
            ratios["train_peak_mem_ours_vs_plain"] = res["ours_train_peak_gib"] / res["plain_train_peak_gib"]
    targets = {
        "routing_overhead_vs_base_prefill": ("<=", 0.02),
        "routed_on_prefill_vs_base": ("<=", 1.10),
        "train_tokens_per_s_ours_vs_plain": (">=", 2.0),
        "train_peak_mem_ours_vs_plain": ("<=", 1.0),
    }
    report = {
        "card": "routing_and_training",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "settings": {**vars(args), "dtype": str(dtype)},
        "results": res,
        "ratios": ratios,
    }
    print(f"# routing_and_training  shape={args.shape} device={device} dtype={dtype}  {report['date']}")
    for k, v in res.items():
        print(f"{k:40s} {v if v is None else f'{v:.6g}'}")
    print("-- ratios (same run) --")
    for k, v in ratios.items():
        verdict = ""
        if k in targets:
            op, lim = targets[k]
            ok = v <= lim if op == "<=" else v >= lim
            verdict = f"target {op} {lim}: {'PASS' if ok else 'MISS'}"
        print(f"{k:40s} {v:8.3f}  {verdict}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
