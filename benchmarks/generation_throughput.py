"""Generation throughput: our engine against plain transformers, measured side by side in one run.

Methods (``--methods``), same model, same prompts, greedy decoding, same stop tokens:

1. naive:        one prompt at a time through ``model.generate`` (what the reference scripts do);
2. plain:        batched ``model.generate`` with left padding, prompts in their given order;
3. sorted:       batched ``model.generate`` over length-sorted prompts (what a competent user does);
4. static:       transformers' best: length-sorted batches, each left-padded to one width, with
                 ``cache_implementation="static"``, which ``generate`` compiles with ``torch.compile`` on a
                 GPU (its defaults: inductor, "reduce-overhead"); elsewhere ``--compile-backend`` asks for
                 it (transformers' ``CompileConfig``; ``none``: a static cache without compiling). The
                 first call, untimed, compiles; its seconds are reported;
5. ours:         ``prism_lightning.generation.generate`` (length-sorted batches, finished rows dropped);
6. ours_compiled: the same with ``decode_compile="on"`` (the engine's static cache + compiled decode
                 step; off-GPU compiled with ``--compile-backend``, ``none``: the static cache alone). Its
                 first call, untimed, compiles; its seconds are reported.

Rows stop at different points, so throughput counts the new tokens each method actually produced
(up to, not including, the first stop token). ``--ignore-eos`` makes the workload fixed-length: no
stop token at all, every row generates ``--max-new-tokens`` (what a speed comparison on random weights
needs; a stop token would end rows at random points). Repeats run the methods round-robin in a rotating
order, with ``gc.collect()`` (and on GPU ``empty_cache``) untimed between runs and the cyclic GC
paused inside them; the table gives the
median with its min..max. A GPU timing only means something beside a baseline from the same run,
hence the ratios (target: ours >= 3x length-sorted ``generate`` at batch 128, docs/performance.md).

Examples::

    # CPU, embedded SmolLM2-135M-Instruct
    python benchmarks/generation_throughput.py --prompts 16 --max-new-tokens 32 --batch-size 8 --threads 2
    # GPU, random weights of Qwen2.5-7B's shape (speed does not depend on the weights), fixed length,
    # beside generate with a dynamic cache and with a compiled static cache (what gpu_check.py runs)
    python benchmarks/generation_throughput.py --random-shape qwen2.5-7b --device cuda --dtype bf16 \\
        --prompts 256 --prompt-tokens 256 --max-new-tokens 128 --batch-size 128 --ignore-eos \\
        --methods sorted,static,ours --repeats 3 --json benchmarks/results/generation-h200.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prism_lightning.generation import SamplingConfig, generate, stop_token_ids  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_and_training import commit_hash  # noqa: E402  (one git lookup for every benchmark)

NAIVE, PLAIN = "naive (model.generate x1)", "plain batched model.generate"
PLAIN_SORTED, OURS = "plain batched generate, sorted", "ours (generation.generate)"
OURS_COMPILED = "ours, decode_compile=on"
STATIC = "generate, static cache, compiled"
METHODS = {
    "naive": NAIVE, "plain": PLAIN, "sorted": PLAIN_SORTED, "static": STATIC, "ours": OURS,
    "ours_compiled": OURS_COMPILED,
}  # fmt: skip
TARGET = 3.0  # ours vs length-sorted generate (docs/performance.md)

# Model shapes for --random-shape (architecture class, config kwargs).
SHAPES: dict[str, tuple[str, dict]] = {
    "tiny": (
        "llama",
        dict(
            vocab_size=384,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
    ),
    "smollm2-135m": (
        "llama",
        dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            tie_word_embeddings=True,
            rope_theta=100000.0,
        ),
    ),
    "qwen2.5-7b": (
        "qwen2",
        dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            tie_word_embeddings=False,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
        ),
    ),
    "llama-3.1-8b": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
        ),
    ),
}

PERSONAS = [
    None,
    "You are a mathematician.",
    "You are an experienced software engineer who writes clear, correct and well-tested code, "
    "and explains the trade-offs of each design decision briefly.",
    "You are a careful safety monitor. You refuse requests that could cause harm and explain why, "
    "and otherwise you help as fully as you can.",
]
QUERIES = [
    "What is 17 times 23?",
    "Write a haiku about autumn rain.",
    "Explain the difference between a list and a tuple in Python.",
    "Summarise the causes of the First World War in three sentences.",
    "I have a meeting with my manager tomorrow about a raise. How should I prepare, and what should I "
    "say if she tells me the budget is frozen this year?",
    "Prove that the square root of two is irrational.",
    "Extract every date from this text: The contract was signed on 3 March 2021, amended on "
    "14 July 2022 and terminated on 1 January 2024.",
    "Pretend you are a pirate captain and greet your new crew.",
    "What causes the seasons on Earth?",
    "Write a Python function that returns the n-th Fibonacci number using memoisation.",
    "Is it ethical to eat meat? Give the strongest argument on each side.",
    "How do vaccines train the immune system?",
    "Translate 'Where is the train station?' into French and Spanish.",
    "A bat and a ball cost 1.10 in total. The bat costs 1.00 more than the ball. How much does the "
    "ball cost? Think step by step.",
    "Give me three ideas for a birthday party for a seven-year-old who loves dinosaurs.",
    "What is the capital of Australia?",
]


def machine_description(device: torch.device) -> dict:
    info = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load_average_at_start": os.getloadavg(),
        "commit": commit_hash(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    from prism_lightning.backbone import resolve_dtype as _resolve

    return _resolve(name, device)


def load_real(args, device: torch.device):
    """Embedded name, local dir or hub id through the project's loader; varied chat prompts."""
    from prism_lightning.backbone import load_backbone

    backbone = load_backbone(
        args.model, dtype=args.dtype, device=device, attn_implementation=args.attn_implementation
    )
    prompts = [
        backbone.formatter.prompt(QUERIES[i % len(QUERIES)], PERSONAS[(i // 2) % len(PERSONAS)])
        for i in range(args.prompts)
    ]
    ids = [backbone.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return backbone.model, backbone.tokenizer, ids, args.model


def load_random(args, device: torch.device):
    """Random weights of a known shape (speed does not depend on weights); random token prompts."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from prism_lightning.testing import build_tiny_tokenizer

    arch, kwargs = SHAPES[args.random_shape]
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    config = config_cls(max_position_embeddings=32768, **kwargs)
    if args.attn_implementation:
        config._attn_implementation = args.attn_implementation
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(args.dtype, device))
    model.eval()
    # The tiny tokenizer only pads and decodes (ids beyond its vocabulary decode to nothing); its
    # stop token is id 2, which random weights essentially never pick: every row runs to the limit.
    tokenizer = build_tiny_tokenizer()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    rng = random.Random(0)
    low = max(1, round(args.prompt_tokens * (1 - args.length_spread)))
    ids = [
        [rng.randrange(3, config.vocab_size) for _ in range(rng.randint(low, args.prompt_tokens))]
        for _ in range(args.prompts)
    ]
    return model, tokenizer, ids, f"random:{args.random_shape}"


def count_new(rows: list[list[int]], stops: set[int]) -> list[list[int]]:
    """New tokens up to (not including) the first stop token; drops the padding after it."""
    out = []
    for row in rows:
        cut = next((k for k, t in enumerate(row) if t in stops), len(row))
        out.append(row[:cut])
    return out


def hf_generate(
    model, tokenizer, batch: list[list[int]], max_new: int, stops: list[int], width: int = 0, **kwargs
) -> list[list[int]]:
    """``model.generate`` over left-padded rows (to ``width`` when longer than the longest row: a static
    cache compiled once needs one shape); ``kwargs`` go to ``generate``."""
    device = next(model.parameters()).device
    width = max(width, *(len(r) for r in batch))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in batch], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch], device=device)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=max_new,
        eos_token_id=stops or None,
        pad_token_id=pad,
        **kwargs,
    )
    return out[:, width:].tolist()


def static_kwargs(device: torch.device, backend: str) -> dict:
    """``generate`` arguments of the static-cache method. On a GPU ``generate`` compiles the decode step
    itself (transformers' documented default); elsewhere a ``CompileConfig`` asks it to."""
    kwargs: dict = {"cache_implementation": "static"}
    if device.type != "cuda" and backend != "none":
        from transformers import CompileConfig

        config = CompileConfig(backend=backend, mode="default" if backend == "inductor" else None)
        config._compile_all_devices = True  # transformers' switch for compiling off-GPU (testing)
        kwargs["compile_config"] = config
    elif backend == "none":
        kwargs["disable_compile"] = True
    return kwargs


def timed(fn: Callable[[], list[list[int]]], device: torch.device) -> tuple[float, list[list[int]]]:
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded name, local dir or hub id")
    parser.add_argument("--random-shape", choices=sorted(SHAPES), help="random weights of this shape")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=256, help="random-shape prompts: max length")
    parser.add_argument(
        "--length-spread",
        type=float,
        default=0.5,
        help="random-shape prompts: lengths uniform in [(1-spread)*L, L]; 0 = all of length L",
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--naive-prompts", type=int, default=16, help="time the naive loop on the first K")
    parser.add_argument(
        "--methods", default="naive,plain,sorted,ours", help=f"comma-separated, of {', '.join(METHODS)}"
    )
    parser.add_argument(
        "--ignore-eos", action="store_true", help="fixed length: no stop token, every row runs"
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="static method off-GPU: torch.compile backend (inductor, aot_eager, eager) or none",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per method (median; >= 5)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16")
    parser.add_argument("--attn-implementation", default=None, help="e.g. sdpa, eager, flash_attention_2")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in chosen if m not in METHODS]
    if bad or "ours" not in chosen:
        parser.error(f"--methods: {bad[0] if bad else 'ours is required'}; choose from {', '.join(METHODS)}")

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loader = load_random if args.random_shape else load_real
    model, tokenizer, ids, model_name = loader(args, device)
    stops = [] if args.ignore_eos else stop_token_ids(tokenizer, model)
    if args.ignore_eos:
        model.generation_config.eos_token_id = None
    stop_set = set(stops)
    max_new, bs = args.max_new_tokens, args.batch_size
    naive_ids = ids[: args.naive_prompts] if "naive" in chosen else []
    lengths = [len(r) for r in ids]
    print(
        f"model {model_name} on {device} ({next(model.parameters()).dtype}); {len(ids)} prompts of "
        f"{min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}); "
        f"{max_new} new tokens {'each (fixed length)' if args.ignore_eos else 'max'}; batch {bs}; "
        f"naive loop on {len(naive_ids)} prompts; methods {', '.join(chosen)}",
        flush=True,
    )

    by_length = sorted(range(len(ids)), key=lambda i: -len(ids[i]))

    def sorted_batches(width: int = 0, **kwargs) -> list[list[int]]:
        rows: list[list[int] | None] = [None] * len(ids)
        for k in range(0, len(ids), bs):
            chunk = by_length[k : k + bs]
            outs = hf_generate(model, tokenizer, [ids[i] for i in chunk], max_new, stops, width, **kwargs)
            for i, row in zip(chunk, outs, strict=True):
                rows[i] = row
        return rows  # type: ignore[return-value]

    methods: dict[str, Callable[[], list[list[int]]]] = {}
    if naive_ids:
        methods[NAIVE] = lambda: [hf_generate(model, tokenizer, [r], max_new, stops)[0] for r in naive_ids]
    if "plain" in chosen:
        methods[PLAIN] = lambda: [
            row
            for k in range(0, len(ids), bs)
            for row in hf_generate(model, tokenizer, ids[k : k + bs], max_new, stops)
        ]
    if "sorted" in chosen:
        methods[PLAIN_SORTED] = sorted_batches
    sampling = SamplingConfig(max_new_tokens=max_new)
    methods[OURS] = lambda: [
        g.token_ids for g in generate(model, tokenizer, ids, sampling, batch_size=bs, stop_ids=stops)
    ]
    # Warm-up (kernels, allocator, lazy init) on a short run of each method.
    warm = [ids[0][: min(len(ids[0]), 32)]]
    hf_generate(model, tokenizer, warm * 2, 4, stops)
    generate(model, tokenizer, warm * 2, SamplingConfig(max_new_tokens=4), batch_size=2, stop_ids=stops)
    sync(device)
    static_info: dict = {"method": "static" in chosen}
    if "static" in chosen:
        # One width for every batch (the longest prompt) and one batch size: one compiled graph. The
        # warm-up is the whole workload once, so compiling (and CUDA-graph capture) is never timed.
        kw = static_kwargs(device, args.compile_backend)
        static_info.update(
            width=max(lengths),
            compile="generate's own on cuda (inductor, reduce-overhead)"
            if device.type == "cuda"
            else args.compile_backend,
        )
        try:
            seconds, _ = timed(lambda: sorted_batches(max(lengths), **kw), device)
            static_info["first_call_seconds_with_compile"] = seconds
            methods[STATIC] = lambda: sorted_batches(max(lengths), **kw)
        except Exception as err:  # noqa: BLE001 - the baseline failing must not hide ours
            static_info["error"] = f"{type(err).__name__}: {err}"
            print(f"static-cache generate failed, left out: {static_info['error']}", flush=True)

    compiled_info: dict = {"method": "ours_compiled" in chosen}
    if "ours_compiled" in chosen:
        from prism_lightning.static_decode import decoder_for

        decoder = decoder_for(model)
        decoder.compiled = device.type == "cuda" or args.compile_backend != "none"
        if device.type != "cuda" and decoder.compiled:
            decoder.backend = args.compile_backend
        compiled_info["compile"] = decoder.backend if decoder.compiled else "none (static cache, eager)"

        def ours_compiled() -> list[list[int]]:
            outs = generate(
                model, tokenizer, ids, sampling, batch_size=bs, stop_ids=stops, decode_compile="on"
            )
            return [g.token_ids for g in outs]

        try:  # the warm-up is the whole workload once: compiling is never timed
            compiled_info["first_call_seconds_with_compile"], _ = timed(ours_compiled, device)
            methods[OURS_COMPILED] = ours_compiled
        except Exception as err:  # noqa: BLE001 - reported, and ours without it still measured
            compiled_info["error"] = f"{type(err).__name__}: {err}"
            print(f"ours with decode_compile=on failed, left out: {compiled_info['error']}", flush=True)

    names = list(methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, list[list[int]]] = {}
    for rep in range(args.repeats):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            gc.disable()  # no cyclic-GC pause inside a timed run
            try:
                seconds, rows = timed(methods[name], device)
            finally:
                gc.enable()
            times[name].append(seconds)
            outputs[name] = count_new(rows, stop_set)
            tokens = sum(len(r) for r in outputs[name])
            print(f"  [{rep + 1}/{args.repeats}] {name}: {tokens} tokens in {seconds:.2f} s", flush=True)
    results: dict[str, dict] = {}
    for name in names:
        new_tokens = sum(len(r) for r in outputs[name])
        seconds = statistics.median(times[name])
        results[name] = {
            "rows": len(outputs[name]),
            "new_tokens": new_tokens,
            "seconds": seconds,
            "min_seconds": min(times[name]),
            "max_seconds": max(times[name]),
            "all_seconds": times[name],
            "tokens_per_s": new_tokens / seconds,
        }

    tps = {name: results[name]["tokens_per_s"] for name in names}
    same = {
        name: sum(a == b for a, b in zip(outputs[name], outputs[OURS], strict=False))
        for name in names
        if name != OURS
    }
    print()
    print(f"| {'method':<34} | {'rows':>4} | {'new tokens':>10} | {'median s':>8} | {'min..max s':>13} | "
          f"{'tokens/s':>9} |")  # fmt: skip
    print(f"|{'-' * 36}|{'-' * 6}|{'-' * 12}|{'-' * 10}|{'-' * 15}|{'-' * 11}|")
    for name, r in results.items():
        spread = f"{r['min_seconds']:.2f}..{r['max_seconds']:.2f}"
        print(
            f"| {name:<34} | {r['rows']:>4} | {r['new_tokens']:>10} | {r['seconds']:>8.2f} | {spread:>13} | "
            f"{r['tokens_per_s']:>9.1f} |"
        )
    ratios = {}
    for key, name in (("plain", PLAIN), ("plain_sorted", PLAIN_SORTED), ("static_compiled", STATIC),
                      ("naive", NAIVE)):  # fmt: skip
        if name in tps:
            ratios[f"ours/{key}"] = tps[OURS] / tps[name]
    if OURS_COMPILED in tps:
        ratios["ours_compiled/ours"] = tps[OURS_COMPILED] / tps[OURS]
        if PLAIN_SORTED in tps:
            ratios["ours_compiled/plain_sorted"] = tps[OURS_COMPILED] / tps[PLAIN_SORTED]
    if NAIVE in tps and PLAIN in tps:
        ratios["plain/naive"] = tps[PLAIN] / tps[NAIVE]
    if STATIC in tps and PLAIN_SORTED in tps:
        ratios["static_compiled/plain_sorted"] = tps[STATIC] / tps[PLAIN_SORTED]
    key = "ours/plain_sorted" if "ours/plain_sorted" in ratios else "ours/plain"
    target = {"key": key, "op": ">=", "limit": TARGET, "measured": ratios.get(key)}
    target["verdict"] = "N/A" if key not in ratios else ("PASS" if ratios[key] >= TARGET else "MISS")
    if args.ignore_eos:
        short = {name: sum(len(r) != max_new for r in rows) for name, rows in outputs.items()}
        assert not any(short.values()), f"fixed-length run with rows of another length: {short}"
    print()
    print(
        "  ".join(f"{k}: {v:.2f}x" for k, v in ratios.items())
        + f"   (target {key} >= 3x: {target['verdict']})"
    )
    print(
        "greedy outputs identical to ours: "
        + ", ".join(f"{name} {n}/{len(outputs[name])}" for name, n in same.items())
        + " (differences come from batched floating-point sums)"
    )

    report = {
        "benchmark": "generation_throughput",
        "model": model_name,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {**machine_description(device), "load_average_at_end": os.getloadavg()},
        "prompt_tokens": {"min": min(lengths), "max": max(lengths), "mean": statistics.mean(lengths)},
        "results": results,
        "repeats": args.repeats,
        "fixed_length": args.ignore_eos,
        "ratios": ratios,
        "target": target,
        "static_compile": static_info,
        "compiled_decode": compiled_info,
        "identical_to_ours": same,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
