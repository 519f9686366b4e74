"""hf vs vLLM on one fixed-length generation workload: the same prompts, the same token count per row.

``benchmarks/backends.py`` runs the bootstrap and an evaluation on each backend; there sampled rows stop at
different lengths and model load, Trainer setup and engine start sit inside the stage times, so its numbers
are end-to-end wall times, not a speed ratio. This script measures the ratio:

* both engines are opened the way users open them, ``open_engine(BackboneConfig(model), GenerationConfig(
  backend=...))``, in this one process, and the opening (model load; for vLLM also the engine start) is
  timed on its own;
* ``--prompts`` chat-formatted prompts, tokenized once, go to both engines as the same token ids, greedy,
  ``--max-new-tokens`` each, with end-of-sequence ignored (hf: ``stop_ids=[]`` to the same
  :func:`prism_lightning.generation.generate` call the hf engine makes; vLLM: ``ignore_eos=True`` and no
  stop ids on the package's own ``SamplingParams`` mapping), so every row generates exactly that many
  tokens on both; the script checks it;
* after ``--warmup`` rounds, ``--repeats`` rounds run interleaved (hf, vllm, hf, vllm, ...), each
  generation timed on its own;
* reported: the median (and every repeat's) generation seconds and tokens/s per engine, then the time
  ratio (vllm s / hf s) and the rate ratio (vllm tokens/s / hf tokens/s) in separate columns, from the
  medians and, per round (the two runs of a round are neighbours in time), their median; on a shared
  machine the per-round ratios are the steadier. Each round's 1-minute load average is recorded.

Examples::

    # CPU (2 cores), embedded SmolLM2-135M-Instruct
    python benchmarks/backends_fixed.py --json benchmarks/results/backends_fixed_cpu.json
    # GPU with vLLM installed
    python benchmarks/backends_fixed.py --model Qwen/Qwen2.5-7B-Instruct --prompts 256 --max-new-tokens 256 \\
        --batch-size 64 --json benchmarks/results/backends_fixed_h100.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import typing
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from backends import vllm_version  # noqa: E402
from generation_throughput import machine_description  # noqa: E402
from routing_and_training import write_report  # noqa: E402

from prism_lightning.backbone import BackboneConfig  # noqa: E402
from prism_lightning.engines import GenerationConfig, open_engine, parse_overrides  # noqa: E402
from prism_lightning.errors import ConfigError  # noqa: E402
from prism_lightning.token_sampling import SamplingConfig  # noqa: E402

BACKENDS = ("hf", "vllm")

# Short user questions; each prompt is one of these, numbered so no two prompts are the same.
QUESTIONS = (
    "Explain how a binary search works.",
    "Write a short poem about the sea.",
    "What causes the seasons on Earth?",
    "Give three tips for writing clear emails.",
    "How does a refrigerator keep food cold?",
    "Summarize the plot of a detective story.",
    "Why is the sky blue?",
    "Describe how to bake a simple loaf of bread.",
)


class _OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one ``error:`` line and exit status 2 (no usage block)."""

    def error(self, message: str) -> typing.NoReturn:
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16, help="how many prompts (rows)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per row")
    parser.add_argument("--batch-size", type=int, default=16, help="the hf engine's batch")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the repeats")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (each engine once per round)")
    parser.add_argument("--order", default="hf,vllm", help="which engine runs first in each round")
    parser.add_argument("--vllm", action="append", default=None, metavar="KEY=VALUE", help="vLLM setting")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    lows = {"prompts": 1, "max_new_tokens": 1, "batch_size": 1, "warmup": 0, "repeats": 1}
    for name, low in lows.items():
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    args.order = args.order.split(",")
    if sorted(args.order) != sorted(BACKENDS):
        parser.error(f"--order lists each of {', '.join(BACKENDS)} once, got {','.join(args.order)}")
    try:
        args.generation = parse_overrides(args.vllm, "vllm")
    except (ConfigError, ValueError) as exc:
        parser.error(str(exc).rstrip("."))
    return args


def prompt_ids(tokenizer, formatter, n: int) -> list[list[int]]:
    """``n`` distinct chat-formatted prompts as token ids (the same ids go to both engines)."""
    texts = [formatter.prompt(f"{QUESTIONS[i % len(QUESTIONS)]} (request {i + 1})") for i in range(n)]
    return [list(r) for r in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def hf_runner(engine, ids: list[list[int]], sampling: SamplingConfig, batch_size: int):
    """The call the hf engine's ``generate`` makes for a plain base model, with no stop ids."""
    from prism_lightning.generation import generate

    def run() -> list[int]:
        outs = generate(engine.model, engine.tokenizer, ids, sampling, batch_size=batch_size, stop_ids=[],
                        decode_compile=engine.decode_compile)  # fmt: skip
        return [len(o.token_ids) for o in outs]

    return run


def vllm_runner(engine, ids: list[list[int]], sampling: SamplingConfig):
    """One ``llm.generate`` over all rows (vLLM schedules them), no stop ids and EOS ignored."""
    from prism_lightning.engines.vllm_core import sampling_params

    core = engine.engine
    params = [sampling_params(sampling, seed=None, stop_token_ids=[], ignore_eos=True) for _ in ids]

    def run() -> list[int]:
        return [len(o.outputs[0].token_ids) for o in core._run(ids, params)]

    return run


def timed(run, expected: int) -> dict:
    start = time.perf_counter()
    lengths = run()
    seconds = time.perf_counter() - start
    tokens = sum(lengths)
    if tokens != expected:
        raise RuntimeError(f"generated {tokens} tokens, expected {expected} (rows {lengths})")
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2)}


def summarize(repeats: list[dict]) -> dict:
    seconds = [r["seconds"] for r in repeats]
    rates = [r["tokens_per_s"] for r in repeats]
    return {
        "median_seconds": round(statistics.median(seconds), 3),
        "min_seconds": min(seconds),
        "max_seconds": max(seconds),
        "median_tokens_per_s": round(statistics.median(rates), 2),
    }


def paired(results: dict, loads: list[float]) -> dict:
    """Each timed round's ratios (its hf and vLLM runs are neighbours in time, so they share the machine's
    load more than two medians do) and their medians."""
    rows = []
    for hf, vl, load in zip(results["hf"]["repeats"], results["vllm"]["repeats"], loads, strict=True):
        rows.append({
            "load_1min": load,
            "time_vllm_over_hf": round(vl["seconds"] / hf["seconds"], 3),
            "rate_vllm_over_hf": round(vl["tokens_per_s"] / hf["tokens_per_s"], 3),
        })  # fmt: skip
    return {
        "per_round": rows,
        "median_time_vllm_over_hf": round(statistics.median(r["time_vllm_over_hf"] for r in rows), 3),
        "median_rate_vllm_over_hf": round(statistics.median(r["rate_vllm_over_hf"] for r in rows), 3),
    }


def table(results: dict) -> str:
    hf, vl = results["hf"]["summary"], results["vllm"]["summary"]
    opened = {b: results[b]["open_seconds"] for b in BACKENDS}
    rounds = results["rounds"]
    time_ratio = vl["median_seconds"] / hf["median_seconds"]
    rate_ratio = vl["median_tokens_per_s"] / hf["median_tokens_per_s"]
    lines = [
        f"{'':34} | {'hf':>10} | {'vllm':>10} | {'time ratio':>10} | {'rate ratio':>10}",
        f"{'':34} | {'':>10} | {'':>10} | {'vllm/hf s':>10} | {'vllm/hf t/s':>10}",
        "-" * 86,
        f"{'open engine (load + start) s':34} | {opened['hf']:10.2f} | {opened['vllm']:10.2f} | "
        f"{opened['vllm'] / opened['hf']:10.2f} | {'':>10}",
        f"{'generation s (median)':34} | {hf['median_seconds']:10.3f} | {vl['median_seconds']:10.3f} | "
        f"{time_ratio:10.2f} | {'':>10}",
        f"{'generation tokens/s (median)':34} | {hf['median_tokens_per_s']:10.1f} | "
        f"{vl['median_tokens_per_s']:10.1f} | {'':>10} | {rate_ratio:10.2f}",
        f"{'per-round ratios (median)':34} | {'':>10} | {'':>10} | "
        f"{rounds['median_time_vllm_over_hf']:10.2f} | {rounds['median_rate_vllm_over_hf']:10.2f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = machine_description(device)
    backbone = BackboneConfig(model=args.model)
    engines, results = {}, {}
    for backend in args.order:  # opened once each, timed apart from generation
        start = time.perf_counter()
        generation = args.generation if backend == "vllm" else GenerationConfig(backend="hf")
        engines[backend] = open_engine(backbone, generation, device=device.type)
        opened = round(time.perf_counter() - start, 2)
        results[backend] = {"open_seconds": opened, "warmup": [], "repeats": []}
        print(f"{backend}: engine open in {results[backend]['open_seconds']:.1f} s", flush=True)
    threads = torch.get_num_threads()  # what the hf engine computes with, after vLLM's start
    hf = engines["hf"]
    ids = prompt_ids(hf.tokenizer, hf.formatter, args.prompts)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0)
    runs = {
        "hf": hf_runner(hf, ids, sampling, args.batch_size),
        "vllm": vllm_runner(engines["vllm"], ids, sampling),
    }
    expected = args.prompts * args.max_new_tokens
    round_loads = []  # the 1-minute load average as each timed round starts
    for round_ in range(args.warmup + args.repeats):
        slot = "warmup" if round_ < args.warmup else "repeats"
        if slot == "repeats":
            round_loads.append(round(os.getloadavg()[0], 2))
        for backend in args.order:
            row = timed(runs[backend], expected)
            results[backend][slot].append(row)
            print(f"round {round_ + 1} ({slot}) {backend}: {row['seconds']:.2f} s, "
                  f"{row['tokens_per_s']:.1f} tokens/s", flush=True)  # fmt: skip
    for backend in BACKENDS:
        results[backend]["summary"] = summarize(results[backend]["repeats"])
    results["rounds"] = paired(results, round_loads)
    results["vllm"]["engine_start_seconds"] = round(engines["vllm"].engine.start_seconds, 2)
    results["vllm"]["dtype"] = engines["vllm"].engine.dtype
    results["hf"]["dtype"] = str(next(hf.model.parameters()).dtype).removeprefix("torch.")
    print(table(results))
    hf_s, vl_s = results["hf"]["summary"], results["vllm"]["summary"]
    out = {
        "benchmark": "backends_fixed",
        "workload": {
            "model": args.model,
            "prompts": args.prompts,
            "prompt_tokens": [len(r) for r in ids],
            "max_new_tokens": args.max_new_tokens,
            "eos_ignored": True,
            "greedy": True,
            "hf_batch_size": args.batch_size,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "order": args.order,
        },
        "vllm_settings": args.generation.as_dict(),
        "machine": {**info, "torch_threads_after_open": threads, "load_average_at_end": os.getloadavg()},
        "results": results,
        "ratios": {
            "time_vllm_over_hf": round(vl_s["median_seconds"] / hf_s["median_seconds"], 3),
            "rate_vllm_over_hf": round(vl_s["median_tokens_per_s"] / hf_s["median_tokens_per_s"], 3),
            "per_round_median_time_vllm_over_hf": results["rounds"]["median_time_vllm_over_hf"],
            "per_round_median_rate_vllm_over_hf": results["rounds"]["median_rate_vllm_over_hf"],
            "open_vllm_over_hf": round(results["vllm"]["open_seconds"] / results["hf"]["open_seconds"], 3),
        },
    }
    out["machine"]["vllm"] = vllm_version()
    write_report(out, args.json)
    return out


if __name__ == "__main__":  # vLLM may spawn its engine process: keep the guard
    main()
