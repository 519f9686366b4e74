"""What a distilled context saves: prompt tokens and prefill time, context in the prompt vs adapter on.

The plain way pastes a context (a fact sheet, a tool registry, a style guide) into every prompt: the base
model prefills it for every query. With the context distilled, the routed model prefills the bare query
with the adapter on. For contexts of several sizes (built from the shipped example contexts, repeated and
cut to the exact token count) this measures, in one run and on one loaded model:

  * prompt tokens per query: with the context vs without (the chat template's own tokens included);
  * prefill seconds (one forward over the prompt, no grad, last-position logits only, batch ``--batch``):
    the pristine base model on the prompt with the context, the routed model with the adapter forced on
    over the bare prompt, and the base model on the bare prompt (the floor);
  * the ratios: tokens and prefill time with the context / adapter on.

Timing method as in ``routing_and_training.py``: every variant in interleaved repeats with a rotating
order, medians with min..max. The adapter's weights are freshly initialised (random B), since its cost
does not depend on what it learned; the base weights are the real model's.

    python benchmarks/context_savings.py --threads 2 --json benchmarks/results/context_savings_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from routing_and_training import Variant, interleaved, machine, shared_twin, stats  # noqa: E402

__all__ = ["context_of_tokens", "machine", "main"]

DEFAULT_SIZES = (200, 500, 1000, 2000, 4000)


def context_of_tokens(tokenizer, n_tokens: int) -> str:
    """A context of exactly ``n_tokens`` tokens (as re-tokenised, within a token or two): the shipped
    example contexts, repeated and cut."""
    from prism_lightning.contexts import EXAMPLES, ContextLibrary, example_path

    library = ContextLibrary.from_config([example_path(name) for name in EXAMPLES])
    block = "\n\n".join(library.get(name).text("long") for name in EXAMPLES)
    ids = tokenizer(block, add_special_tokens=False)["input_ids"]
    repeats = n_tokens // len(ids) + 1
    ids = tokenizer("\n\n".join([block] * repeats), add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


def _batch(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    from prism_lightning.generation import left_pad

    rows = [list(r) for r in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return left_pad(rows, pad, device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="HF id, local dir or embedded name")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="context sizes in tokens")
    parser.add_argument("--batch", type=int, default=1, help="queries per prefill")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the repeats")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 1 or args.batch < 1 or args.reps < 1:
        raise SystemExit("error: --sizes, --batch and --reps must be positive")

    from prism_lightning.backbone import BackboneConfig
    from prism_lightning.contexts import example_path
    from prism_lightning.eval.recall import load_recall_set
    from prism_lightning.model.gate import Gate
    from prism_lightning.model.routing import RoutingController, apply_lora

    backbone = BackboneConfig(model=args.model, dtype="float32").load(device=args.device)
    base, tokenizer, formatter = backbone.model.eval(), backbone.tokenizer, backbone.formatter
    routed = apply_lora(shared_twin(base), gate_layer=0, rank=16, alpha=32, dropout=0.05).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in routed.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    controller = RoutingController(routed, Gate(base.config.hidden_size).to(args.device).eval(), 0)
    questions = [q.question for q in load_recall_set(example_path("fact_sheet_questions")).questions]
    queries = [questions[i % len(questions)] for i in range(args.batch)]

    bare_ids, bare_mask = _batch(tokenizer, [formatter.prompt(q) for q in queries], args.device)
    force_on = torch.ones(args.batch, dtype=torch.bool, device=args.device)

    def forward(model, ids, mask):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)

    def adapter_on():
        controller.arm(decide=True, force=force_on)
        forward(routed, bare_ids, bare_mask)
        controller.disarm()

    results = []
    for size in sizes:
        context = context_of_tokens(tokenizer, size)
        ctx_ids, ctx_mask = _batch(
            tokenizer, [formatter.prompt(q, context, "system") for q in queries], args.device
        )
        variants = {
            "context_in_prompt": Variant(lambda i=ctx_ids, m=ctx_mask: forward(base, i, m)),
            "adapter_on": Variant(adapter_on, setup=controller.reset),
            "base_bare": Variant(lambda: forward(base, bare_ids, bare_mask)),
        }
        times = interleaved(variants, args.device, args.reps, warmup=args.warmup)
        med = {name: stats(values) for name, values in times.items()}
        ms = {name: value["median"] * 1e3 for name, value in med.items()}
        tokens_ctx = int(ctx_mask.sum()) / args.batch
        tokens_bare = int(bare_mask.sum()) / args.batch
        row = {
            "context_tokens": len(tokenizer(context, add_special_tokens=False)["input_ids"]),
            "prompt_tokens_with_context": tokens_ctx,
            "prompt_tokens_adapter": tokens_bare,
            "token_ratio": tokens_ctx / tokens_bare,
            "prefill_s": med,
            "prefill_ratio_context_vs_adapter": ms["context_in_prompt"] / ms["adapter_on"],
            "prefill_ratio_adapter_vs_base": ms["adapter_on"] / ms["base_bare"],
        }
        results.append(row)
        print(
            f"context {row['context_tokens']:>5} tokens: prompt {tokens_ctx:>7.1f} vs {tokens_bare:>5.1f} "
            f"tokens ({row['token_ratio']:.1f}x); prefill {ms['context_in_prompt']:>8.1f} ms vs "
            f"{ms['adapter_on']:>6.1f} ms adapter on ({row['prefill_ratio_context_vs_adapter']:.1f}x; "
            f"base bare {ms['base_bare']:.1f} ms)",
            flush=True,
        )
    out = {
        "model": args.model,
        "device": args.device,
        "dtype": "float32",
        "batch": args.batch,
        "reps": args.reps,
        "warmup": args.warmup,
        "adapter": "LoRA r16 on the 7 projections of layers 1..L-1, gate after layer 0, random weights",
        "machine": machine(),
        "results": results,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
