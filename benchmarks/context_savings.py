"""What a distilled context saves at prefill, measured against the context in the prompt AND against the
context served from a prefix KV cache.

The plain way pastes a context (a fact sheet, a tool registry, a style guide) into every prompt. A serving
stack with prefix caching does better: it prefills the shared prefix (the chat template's start, the system
turn with the context, the user turn's header) once, keeps its keys and values, and per query prefills only
the query's own tokens against them. With the context distilled, the routed model prefills the bare query
with the adapter on. For contexts of several sizes (the shipped example contexts, repeated and cut to the
exact token count) this measures, in one run on one loaded model, for each batch size in ``--batches``:

  (a) ``context_in_prompt``: the base model prefills the whole prompt, context included, no cache;
  (b) ``prefix_cache``: the base model prefills only the query's tokens against the prefix's cached
      keys/values (transformers' own ``DynamicCache``, built once, expanded to the batch per call);
  (c) ``adapter_on``: the routed model with the adapter forced on over the bare prompt;
  (d) ``base_bare``: the base model on the bare prompt (the floor);

plus ``prefix_build``, the one-time prefill of the shared prefix that (b) amortises. Time to first token is
the prefill (one forward, no grad, last-position logits only); every variant runs in interleaved repeats
with a rotating order after untimed warm-up rounds, and the ratios are medians of per-repeat (paired)
ratios. Before timing, the last-position logits of (b) are checked against (a)'s: serving from the cache
must not change the answer. The KV memory each condition holds is counted from the config (layers x 2 x
key/value heads x head_dim x tokens x dtype bytes) and checked against the cache tensors actually built.

The adapter's weights are freshly initialised (random B), since its cost does not depend on what it
learned; the base weights are the real model's. A prefill saving counts only at equal task quality: the
script copies the recall of ``benchmarks/results/context_recall_cpu.json`` beside the timings.

    python benchmarks/context_savings.py --threads 1 --json benchmarks/results/context_savings_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from routing_and_training import Variant, commit_hash, interleaved, machine, shared_twin, stats  # noqa: E402

__all__ = [
    "PrefixSplit",
    "context_of_tokens",
    "kv_bytes_per_token",
    "machine",
    "main",
    "prefix_cache",
    "split_prefix",
    "suffix_forward",
]

DEFAULT_SIZES = (200, 1000, 4000)
DEFAULT_BATCHES = (1, 8)
RECALL_FILE = Path(__file__).resolve().parent / "results" / "context_recall_cpu.json"
#: Largest |difference| allowed between the last-position logits with the prefix cache and without (fp32).
LOGIT_ATOL = 1e-3
# Two queries that differ in their first character: the shared prefix ends before any query text.
_SENTINELS = ("A", "B")


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


def _ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [list(r) for r in tokenizer(prompts, add_special_tokens=False)["input_ids"]]


def _batch(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    from prism_lightning.generation import left_pad

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return left_pad(_ids(tokenizer, prompts), pad, device)


class PrefixSplit:
    """The token ids every prompt shares before its query (what a prefix cache holds) and each prompt's
    own remainder (what is prefilled per query)."""

    def __init__(self, prefix: list[int], suffixes: list[list[int]]):
        self.prefix, self.suffixes = prefix, suffixes


def split_prefix(tokenizer, formatter, context: str, queries: list[str]) -> PrefixSplit:
    """Split the full prompts (context in the system turn) at the token level: the prefix is the longest
    run of ids common to every prompt and to two sentinel prompts whose queries differ in their first
    character, so it never holds query text, and each prompt is exactly prefix + its suffix."""
    rows = _ids(tokenizer, [formatter.prompt(q, context, "system") for q in [*queries, *_SENTINELS]])
    n = 0
    while all(len(r) > n for r in rows) and len({r[n] for r in rows}) == 1:
        n += 1
    if n == 0:
        raise ValueError("the prompts share no prefix")
    return PrefixSplit(rows[0][:n], [r[n:] for r in rows[: len(queries)]])


def prefix_cache(model, prefix: list[int], device):
    """The prefix's keys and values, computed once: a ``DynamicCache`` holding one sequence."""
    from transformers import DynamicCache

    ids = torch.tensor([prefix], dtype=torch.long, device=device)
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
    return out.past_key_values


def suffix_forward(
    model, cache, prefix_len: int, suffixes: list[list[int]], pad_id: int, device
) -> torch.Tensor:
    """Last-position logits of every prompt, prefilling only the suffixes against the shared prefix cache.

    The cache is expanded to the batch into a fresh ``DynamicCache`` per call (views, no copy of its own;
    the cache's update concatenates prefix and suffix), so the shared one is never written. The suffixes
    are left-padded, which puts the pads between prefix and query: the mask hides them and the position
    ids continue from the prefix as if they were not there, as in the unpadded prompt."""
    from transformers import DynamicCache

    from prism_lightning.generation import left_pad

    batch = len(suffixes)
    ids, mask = left_pad(suffixes, pad_id, device)
    layers = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v, *_ in cache]
    past = DynamicCache(layers, config=model.config)
    full_mask = torch.cat([torch.ones(batch, prefix_len, dtype=mask.dtype, device=device), mask], dim=1)
    positions = prefix_len + (mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=full_mask,
            position_ids=positions,
            past_key_values=past,
            use_cache=True,
            logits_to_keep=1,
        )
    return out.logits[:, -1]


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token holds: layers x 2 x key/value heads x head_dim x dtype size."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * heads * head_dim * torch.finfo(dtype).bits // 8


def _cache_bytes(cache) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v, *_ in cache)


def _ratios(num: list[float], den: list[float]) -> dict:
    """Per-repeat ratios of two interleaved variants (the same repeat ran both), as statistics."""
    return stats([a / b for a, b in zip(num, den, strict=True)])


def _recall_summary(path: Path) -> dict | None:
    if not path.is_file():
        return None
    conditions = json.loads(path.read_text())["summary"]["conditions"]
    keep = ("questions", "recalled", "recall", "mean_prompt_tokens")
    return {
        "file": str(path.relative_to(Path(__file__).resolve().parents[1])),
        **{name: {k: conditions[name][k] for k in keep} for name in ("base", "context", "adapter")},
    }


def _positive_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        print(
            f"error: {flag} takes positive whole numbers separated by commas, got {text!r}", file=sys.stderr
        )
        raise SystemExit(2)
    return values


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="HF id, local dir or embedded name")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="context sizes in tokens")
    parser.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)), help="queries per prefill")
    parser.add_argument("--reps", default="5", help="timed interleaved repeats")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the repeats")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    sizes = _positive_ints(args.sizes, "--sizes")
    batches = _positive_ints(args.batches, "--batches")
    reps = _positive_ints(args.reps, "--reps")[0]
    if args.warmup < 0:
        print("error: --warmup must be 0 or more", file=sys.stderr)
        raise SystemExit(2)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before, started = os.getloadavg(), time.perf_counter()

    from prism_lightning.backbone import BackboneConfig
    from prism_lightning.contexts import example_path
    from prism_lightning.eval.recall import load_recall_set
    from prism_lightning.model.gate import Gate
    from prism_lightning.model.routing import RoutingController, apply_lora

    dtype = torch.float32
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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    per_token = kv_bytes_per_token(base.config, dtype)

    def forward(model, ids, mask):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)

    results = []
    for size in sizes:
        context = context_of_tokens(tokenizer, size)
        for batch in batches:
            queries = [questions[i % len(questions)] for i in range(batch)]
            bare_ids, bare_mask = _batch(tokenizer, [formatter.prompt(q) for q in queries], args.device)
            ctx_ids, ctx_mask = _batch(
                tokenizer, [formatter.prompt(q, context, "system") for q in queries], args.device
            )
            split = split_prefix(tokenizer, formatter, context, queries)
            cache = prefix_cache(base, split.prefix, args.device)
            shared_bytes = _cache_bytes(cache)
            assert shared_bytes == per_token * len(split.prefix), "the KV formula disagrees with the cache"
            # Serving from the cache must give the prompt's own next-token logits, row by row.
            with torch.no_grad():
                want = base(input_ids=ctx_ids, attention_mask=ctx_mask, logits_to_keep=1).logits[:, -1]
            got = suffix_forward(base, cache, len(split.prefix), split.suffixes, pad, args.device)
            max_diff = float((got - want).abs().max())
            assert max_diff <= LOGIT_ATOL, f"prefix-cache logits differ from the prompt's by {max_diff:.2e}"
            force_on = torch.ones(batch, dtype=torch.bool, device=args.device)

            def adapter_on(ids=bare_ids, mask=bare_mask, force=force_on):
                controller.arm(decide=True, force=force)
                forward(routed, ids, mask)
                controller.disarm()

            variants = {
                "context_in_prompt": Variant(lambda i=ctx_ids, m=ctx_mask: forward(base, i, m)),
                "prefix_cache": Variant(
                    lambda c=cache, s=split: suffix_forward(
                        base, c, len(s.prefix), s.suffixes, pad, args.device
                    )
                ),
                "adapter_on": Variant(adapter_on, setup=controller.reset),
                "base_bare": Variant(lambda i=bare_ids, m=bare_mask: forward(base, i, m)),
            }
            if batch == batches[0]:
                variants["prefix_build"] = Variant(lambda s=split: prefix_cache(base, s.prefix, args.device))
            times = interleaved(variants, args.device, reps, warmup=args.warmup)
            ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
            tokens_ctx = int(ctx_mask.sum()) / batch
            tokens_bare = int(bare_mask.sum()) / batch
            tokens_suffix = sum(map(len, split.suffixes)) / batch
            row = {
                "context_tokens": len(tokenizer(context, add_special_tokens=False)["input_ids"]),
                "batch": batch,
                "prompt_tokens": {
                    "context_in_prompt": tokens_ctx,
                    "prefix_cache_shared": len(split.prefix),
                    "prefix_cache_per_query": tokens_suffix,
                    "adapter_on": tokens_bare,
                    "base_bare": tokens_bare,
                },
                "prefix_cache_max_logit_diff": max_diff,
                "prefill_s": {name: stats(values) for name, values in times.items()},
                "ratios": {
                    "context_in_prompt/adapter_on": _ratios(times["context_in_prompt"], times["adapter_on"]),
                    "prefix_cache/adapter_on": _ratios(times["prefix_cache"], times["adapter_on"]),
                    "context_in_prompt/prefix_cache": _ratios(
                        times["context_in_prompt"], times["prefix_cache"]
                    ),
                    "adapter_on/base_bare": _ratios(times["adapter_on"], times["base_bare"]),
                },
                "kv_bytes": {
                    "per_token": per_token,
                    "context_in_prompt_per_request": round(tokens_ctx * per_token),
                    "prefix_cache_shared": shared_bytes,
                    "prefix_cache_per_request": round(tokens_suffix * per_token),
                    "adapter_on_per_request": round(tokens_bare * per_token),
                    "base_bare_per_request": round(tokens_bare * per_token),
                },
            }
            results.append(row)
            r = row["ratios"]
            print(
                f"context {row['context_tokens']:>5} tokens, batch {batch}: prefill ms (median) "
                f"in prompt {ms['context_in_prompt']:.1f}, prefix cache {ms['prefix_cache']:.1f}, "
                f"adapter on {ms['adapter_on']:.1f}, base bare {ms['base_bare']:.1f}; "
                f"in prompt / adapter {r['context_in_prompt/adapter_on']['median']:.1f}x, "
                f"prefix cache / adapter {r['prefix_cache/adapter_on']['median']:.2f}x "
                f"(logit diff {max_diff:.1e})",
                flush=True,
            )
    out = {
        "model": args.model,
        "device": args.device,
        "dtype": "float32",
        "batches": batches,
        "reps": reps,
        "warmup": args.warmup,
        "adapter": "LoRA r16 on the 7 projections of layers 1..L-1, gate after layer 0, random weights",
        "prefix_cache": "transformers DynamicCache of the shared prefix, built once, expanded per call",
        "commit": commit_hash(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
        "quality": _recall_summary(RECALL_FILE),
        "results": results,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
