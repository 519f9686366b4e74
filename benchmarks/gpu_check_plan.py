"""The GPU check's plan: step order, each step's settings at the GPU and the tiny shape, the time estimate
of the GPU shapes with its derivation, the per-step budgets, and the performance targets as code.

Why a module of its own: the estimate and the targets must be readable (and testable) without torch or
a GPU, and ``gpu_check.py`` is about running the steps. Standard library only.

The estimate is arithmetic, not a measurement: no session has run this code on a GPU yet. It uses the
numbers ``docs/performance.md`` measured on one H200 with plain transformers + peft where they exist, and
states each guess where they do not (:data:`H200`). A step's budget is 1.3x its estimate (rounded up);
the check skips a step whose budget does not fit in the time left before its deadline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Priority order: what users need most and what has never run first (issue 24 §1).
STEPS: tuple[str, ...] = (
    "fit_bf16_mixed",
    "speed_routing",
    "speed_training",
    "speed_generation",
    "fit_fsdp",
    "bootstrap_hf",
    "routed_generation",
    "eval_limit1",
    "bootstrap_vllm",
)

# Each step's settings per shape class: "gpu" (qwen2.5-7b on the GPU) and "tiny" (the CPU dry run).
SETTINGS: dict[str, dict[str, dict]] = {
    "fit": {"gpu": {"batch": 4, "tokens": 512, "steps": 3}, "tiny": {"batch": 4, "tokens": 48, "steps": 3}},
    "routing": {
        "gpu": {"batch": 8, "prompt_len": 512, "reps": 5},
        "tiny": {"batch": 2, "prompt_len": 16, "reps": 2},
    },
    "training": {
        "gpu": {"batch": 4, "tokens": 1024, "reps": 3},
        "tiny": {"batch": 2, "tokens": 16, "reps": 2},
    },
    # Fixed length (stop tokens ignored), one batch of 128 prompts of 128-256 tokens on the GPU (64 new
    # tokens: room for the compiled decode beside the three baselines in the 6-minute call).
    "generation": {
        "gpu": {
            "prompts": 128,
            "prompt_tokens": 256,
            "new_tokens": 64,
            "batch": 128,
            "repeats": 3,
            "methods": "sorted,static,ours,ours_compiled",
            "naive_prompts": 0,
        },
        "tiny": {
            "prompts": 6,
            "prompt_tokens": 12,
            "new_tokens": 4,
            "batch": 2,
            "repeats": 2,
            "methods": "sorted,static,ours,ours_compiled",
            "naive_prompts": 0,
        },
    },
    "routed_generation": {"gpu": {"new_tokens": 32}, "tiny": {"new_tokens": 8}},
}

# Qwen2.5-7B's shape (as benchmarks/routing_and_training.SHAPES; repeated so no torch is imported).
QWEN7B = dict(hidden=3584, layers=28, heads=28, kv=4, inter=18944, vocab=152064)


def matmul_params(s: dict = QWEN7B) -> int:
    """Weights a token multiplies through (decoder layers + LM head; the embedding is a lookup)."""
    hd = s["hidden"] // s["heads"]
    attn = 2 * s["hidden"] * s["hidden"] + 2 * s["hidden"] * s["kv"] * hd
    mlp = 3 * s["hidden"] * s["inter"]
    return s["layers"] * (attn + mlp) + s["vocab"] * s["hidden"]


def weight_bytes(s: dict = QWEN7B) -> int:
    """bf16 bytes of all weights (the embedding too)."""
    return 2 * (matmul_params(s) + s["vocab"] * s["hidden"])


@dataclass(frozen=True)
class Rates:
    """Constants of the estimate. ``measured`` ones come from docs/performance.md (one H200, plain
    transformers + peft, Qwen2.5-7B's shape, bf16); the others are guesses, said so."""

    # measured: the plain LoRA step, 4 x 1024 tokens at 9,005 tokens/s, costs 4 N FLOP per token (forward
    # 2N, backward to the activations 2N; frozen weights get no gradient): 9,005 * 4 * 7.6e9 = 274 TFLOP/s.
    # Used for every dense pass (prefill too, where it is pessimistic).
    flops: float = 9005 * 4 * 7.6e9
    # measured: batched `generate`, 128 prompts of 256 tokens, 128 new, gave 4,068-5,123 tokens/s: 32 ms
    # per new token of the batch, prefill included (Python and kernel-launch bound); ours is assumed to
    # cost the same (it did on CPU).
    decode_step_s: float = 0.032
    # guess: a compiled static-cache step is bound by reading the weights (15.2 GB at 4.8 TB/s = 3.2 ms);
    # taken as 2.5x that.
    compiled_step_s: float = 2.5 * weight_bytes() / 4.8e12
    compile_s: float = 60.0  # guess: dynamo + inductor + CUDA graphs of the decode step, cold caches
    imports_s: float = 25.0  # guess: torch, transformers, peft, lightning, CUDA context (11 s on this CPU)
    build_s: float = 8.0  # guess: a random bf16 7B model initialised directly on the GPU
    trainer_s: float = 5.0  # guess: a Lightning Trainer with a one-process group, first-step autotuning


H200 = Rates()
BUDGET_FACTOR = 1.3
DEADLINE_S = 330  # the GPU run's step deadline, from the process start (gpu_check.sh)


def _prefill_s(tokens: int, r: Rates) -> float:
    return tokens * 2 * matmul_params() / r.flops


def _train_s(tokens: int, r: Rates) -> float:
    return tokens * 4 * matmul_params() / r.flops


def estimate(r: Rates = H200) -> list[tuple[str, float, str]]:
    """(step, seconds, how) for the GPU shapes, in :data:`STEPS` order; ``imports`` first."""
    out: list[tuple[str, float, str]] = [("imports", r.imports_s, "guess (11 s on the 2-core CPU)")]
    f = SETTINGS["fit"]["gpu"]
    fit_tokens = f["batch"] * f["tokens"]
    fit = r.build_s + r.trainer_s + f["steps"] * _train_s(fit_tokens, r)
    fit_how = f"build + Trainer + {f['steps']} x {fit_tokens} tokens x 4N FLOP"
    g = SETTINGS["routing"]["gpu"]
    p = _prefill_s(g["batch"] * g["prompt_len"], r)
    # Per repeat, in base-prefill units (performance.md: unmerged adapter 1.72x, merged 1.05x): base 1,
    # plain on 1.72, merged 1.05, plain off 1, routed on/off/mixed 1.75/1/1.75, plain split 1.36,
    # early-exit routing 1.76, reference routing 2.8 (a full forward with every hidden state, then 1.72).
    units = 1 + 1.72 + 1.05 + 1 + 1.75 + 1 + 1.75 + 1.36 + 1.76 + 2.8
    decode = 6 * (1.75 * p + (2 * g["reps"] + 1) * r.decode_step_s)
    routing = r.build_s + (g["reps"] + 1) * units * p + decode + 3 * 1.75 * p
    routing_how = f"build + ({g['reps']}+1) x {units:.1f} prefills of {p:.2f} s + 6 decode variants"
    t = SETTINGS["training"]["gpu"]
    step = _train_s(t["batch"] * t["tokens"], r)
    # ours, ours with the chunked top-k KL, plain, ours mixed, plain distill rows, reference style
    tunits = 1 + 1 + 1 + 0.55 + 0.5 + 1.1
    training = r.build_s + r.trainer_s + (t["reps"] + 1) * tunits * step
    training_how = f"build + ({t['reps']}+1) x {tunits:.2f} steps of {step:.2f} s"
    q = SETTINGS["generation"]["gpu"]
    batches = math.ceil(q["prompts"] / q["batch"])
    # performance.md's generate time per step already includes its prefill (same prompts, batch 128)
    dyn = batches * q["new_tokens"] * r.decode_step_s
    pre = _prefill_s(q["batch"] * q["prompt_tokens"], r)  # static: every batch padded to the longest
    static = batches * (pre + q["new_tokens"] * r.compiled_step_s)
    # sorted generate and ours (dynamic), static + compiled generate, ours with decode_compile=on (one
    # compilation and a warm-up each for the compiled two; ours pads to the batch's width, counted alike)
    compiled = 1 + ("ours_compiled" in q["methods"].split(","))
    per_repeat = 2 * dyn + compiled * static
    generation = r.build_s + compiled * (r.compile_s + static) + 2 + q["repeats"] * per_repeat
    generation_how = (
        f"build + {compiled} x (compile {r.compile_s:.0f} s + warm-up) + {q['repeats']} x (2 x {dyn:.1f} s "
        f"dynamic + {compiled} x {static:.1f} s static); {batches} batches x {q['new_tokens']} steps"
    )
    fsdp = fit + 3  # as fit, plus fully_shard of 28 layers
    boot = r.build_s + 4 * (3 + 16 * r.decode_step_s) + 2 * _prefill_s(8 * 256, r)
    rg = SETTINGS["routed_generation"]["gpu"]["new_tokens"]
    routed = r.build_s + 4 * (_prefill_s(8 * 32, r) + rg * r.decode_step_s) + 2
    evals = 4 * 6 * (10 * r.decode_step_s + 0.2) + 4  # 4 conditions x ~6 generate calls of 8-10 tokens
    out += [
        ("fit_bf16_mixed", fit, fit_how),
        ("speed_routing", routing, routing_how),
        ("speed_training", training, training_how),
        ("speed_generation", generation, generation_how),
        ("fit_fsdp", fsdp, "as fit_bf16_mixed + 3 s of fully_shard"),
        ("bootstrap_hf", boot, "build + 4 stages x (Trainer 3 s + 16 decode steps) + teacher prefills"),
        ("routed_generation", routed, f"build + 4 x (prefill + {rg} decode steps)"),
        ("eval_limit1", evals, "4 conditions x ~6 short generate calls (reuses the routed model)"),
        ("bootstrap_vllm", 0.0, "skipped: the GPU image has no vLLM"),
    ]
    return out


def budgets(r: Rates = H200) -> dict[str, int]:
    """Seconds a step may take: 1.3x its estimate, rounded up (a skipped-by-design step gets 1 s)."""
    return {name: max(1, math.ceil(BUDGET_FACTOR * s)) for name, s, _ in estimate(r) if name != "imports"}


def estimate_lines(r: Rates = H200) -> list[str]:
    """The estimate as printed: one line per step with its budget and the running total, then the total."""
    b = budgets(r)
    lines = [
        "GPU estimate (one H200, qwen2.5-7b shape, bf16) from shape arithmetic and docs/performance.md's "
        f"measured rates ({r.flops / 1e12:.0f} TFLOP/s dense, {r.decode_step_s * 1e3:.0f} ms per eager "
        f"decode step); N = {matmul_params() / 1e9:.2f}e9 matmul weights:"
    ]
    total = 0.0
    for name, s, how in estimate(r):
        total += s
        budget = f"budget {b[name]:4d} s" if name in b else " " * 13
        lines.append(f"  {name:18s} {s:6.1f} s  {budget}  cumulative {total:6.1f} s   {how}")
    lines.append(f"  total estimate {total:.0f} s (limit 360 s)")
    return lines


def total_estimate(r: Rates = H200) -> float:
    return sum(s for _, s, _ in estimate(r))


def skip_reason(budget: float, elapsed: float, deadline: float | None) -> str | None:
    """Why a step with ``budget`` seconds does not start ``elapsed`` seconds into the check, or None."""
    if deadline is None or elapsed + budget <= deadline:
        return None
    left = max(0.0, deadline - elapsed)
    return f"budget {budget:.0f} s does not fit in the {left:.0f} s left before the {deadline:.0f} s deadline"


# -- targets (docs/performance.md) -------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    name: str
    step: str  # "" for a target the check does not run
    key: str  # a ratio in the step's numbers["ratios"]
    op: str  # ">=" or "<="
    limit: float
    what: str


TARGETS: tuple[Target, ...] = (
    Target(
        "training tokens/s",
        "speed_training",
        "train_tokens_per_s_ours_vs_plain_same_rows",
        ">=",
        2.0,
        "ours vs a competent plain transformers + peft step on the same distill rows with the same "
        "response-only top-k KL (a MISS until packing, chunked KL and compile land; the naive step that "
        "runs every row through every layer with logits everywhere is reported beside it, not a target)",
    ),
    Target(
        "training peak memory",
        "speed_training",
        "train_peak_mem_ours_vs_plain_same_rows",
        "<=",
        1.0,
        "the same two steps' peak allocated memory (GPU only)",
    ),
    Target(
        "training tokens/s, batch 8 x 2048, gradient checkpointing",
        "",
        "train_tokens_per_s_ours_vs_plain_same_rows",
        ">=",
        2.0,
        "not in the check (no time left in the call): routing_and_training.py --train-batch 8 "
        "--train-len 2048 --grad-ckpt",
    ),
    Target(
        "prefill with the adapter",
        "speed_routing",
        "prefill_routed_on_merged_vs_base",
        "<=",
        1.10,
        "an all-on batch on merged weights (the path such a batch takes) vs the base model's prefill",
    ),
    Target(
        "routing cost in the prefill",
        "speed_routing",
        "routing_cost_in_prefill_vs_base",
        "<=",
        0.02,
        "routed-on minus plain peft on (paired, per repeat), over the base prefill",
    ),
    Target(
        "batched generation",
        "speed_generation",
        "ours/plain_sorted",
        ">=",
        3.0,
        "ours vs batched model.generate (dynamic cache, length-sorted), fixed length",
    ),
)


def target_results(steps: dict[str, dict]) -> list[dict]:
    """One entry per target: measured value and PASS / MISS, or N/A with the reason."""
    out = []
    for t in TARGETS:
        entry = steps.get(t.step, {})
        ratios = (entry.get("numbers") or {}).get("ratios") or {}
        value = ratios.get(t.key)
        if not t.step:
            value, verdict = None, "N/A (not in the check: no time left in the call)"
        elif value is None:
            if not entry:
                verdict = "N/A (step not run)"
            elif entry.get("status") != "PASS":
                verdict = f"N/A (step {entry.get('status')}: {entry.get('error')})"
            else:
                verdict = "N/A (not measured on this device)"
        else:
            ok = value >= t.limit if t.op == ">=" else value <= t.limit
            verdict = "PASS" if ok else "MISS"
        out.append({"target": t.name, "key": t.key, "op": t.op, "limit": t.limit, "measured": value,
                    "verdict": verdict, "what": t.what})  # fmt: skip
    return out


def target_line(r: dict) -> str:
    measured = "-" if r["measured"] is None else f"{r['measured']:.3f}"
    return f"target {r['target']}: {r['key']} {r['op']} {r['limit']}  measured {measured}  {r['verdict']}"


if __name__ == "__main__":  # python benchmarks/gpu_check_plan.py: the estimate, without torch
    print("\n".join(estimate_lines()))
