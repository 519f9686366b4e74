"""Per-token decode time of the hf engine's three decode paths, measured side by side in one run.

Paths (``generation.decode_compile`` picks the first or the last; the middle one shows what the static
cache alone buys):

1. eager, dynamic cache: the default loop (``decode_compile=off``);
2. static cache, eager: the same padded static-cache step as 3, not compiled;
3. static cache, compiled: ``decode_compile=on`` (``torch.compile`` of the one-token forward).

Same model, same prompts, greedy, fixed length (no stop tokens: every row decodes ``--max-new-tokens``).
The decode time is read from the ``on_step`` callback: from the first step's tokens (after the prefill)
to the last, divided by the decode forwards in between, so the prefill is not in it. Per batch size the
first run of each path is a warm-up, not timed (its extra seconds over the timed median, for the compiled
path the compilation, are reported apart); then ``--repeats`` rounds run the paths in a rotating order.
The token ids of the three paths are compared and the result printed.

    python benchmarks/decode_compile.py --batch-sizes 1,8 --max-new-tokens 24 --repeats 5 --threads 1 \\
        --json benchmarks/results/decode_compile_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generation_throughput import QUERIES, machine_description  # noqa: E402

from prism_lightning.generation import SamplingConfig, generate_batch  # noqa: E402
from prism_lightning.static_decode import decoder_for  # noqa: E402

PATHS = ("eager, dynamic cache", "static cache, eager", "static cache, compiled")


def decode_run(model, tokenizer, prompts, path: str, max_new: int, device: torch.device):
    """(seconds per decode step, wall seconds, token ids) of one fixed-length batch on ``path``."""
    decoder = decoder_for(model)
    decoder.compiled = path == PATHS[2]
    stamps: list[float] = []

    def on_step(new_tokens, finished) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    setting = "off" if path == PATHS[0] else "on"
    start = time.perf_counter()
    outs = generate_batch(
        model, tokenizer, prompts, SamplingConfig(max_new_tokens=max_new), stop_ids=[], on_step=on_step,
        decode_compile=setting,
    )  # fmt: skip
    wall = time.perf_counter() - start
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return per_step, wall, [o.token_ids for o in outs]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.max_new_tokens < 2:
        parser.error("--repeats must be >= 1 and --max-new-tokens >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from prism_lightning.backbone import load_backbone

    backbone = load_backbone(args.model, dtype=args.dtype, device=device)
    model, tokenizer = backbone.model, backbone.tokenizer
    machine = machine_description(device)
    results = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = [backbone.formatter.prompt(QUERIES[i % len(QUERIES)]) for i in range(batch)]
        warm, tokens = {}, {}
        for path in PATHS:
            _, warm[path], tokens[path] = decode_run(
                model, tokenizer, prompts, path, args.max_new_tokens, device
            )
        steps: dict[str, list[float]] = {p: [] for p in PATHS}
        walls: dict[str, list[float]] = {p: [] for p in PATHS}
        for r in range(args.repeats):
            for path in PATHS[r % 3 :] + PATHS[: r % 3]:
                gc.collect()
                gc.disable()
                try:
                    step, wall, ids = decode_run(model, tokenizer, prompts, path, args.max_new_tokens, device)
                finally:
                    gc.enable()
                steps[path].append(step)
                walls[path].append(wall)
                if ids != tokens[path]:
                    raise SystemExit(f"error: {path} gave other tokens on a repeat")
        same = {p: tokens[p] == tokens[PATHS[0]] for p in PATHS[1:]}
        row = {"batch_size": batch, "max_new_tokens": args.max_new_tokens, "same_tokens_as_eager": same}
        eager = statistics.median(steps[PATHS[0]])
        for path in PATHS:
            median = statistics.median(steps[path])
            row[path] = {
                "ms_per_step_median": round(1000 * median, 3),
                "ms_per_step_min_max": [round(1000 * min(steps[path]), 3), round(1000 * max(steps[path]), 3)],
                "ms_per_row_token": round(1000 * median / batch, 3),
                "speedup_vs_eager": round(eager / median, 3),
                "warmup_extra_s": round(warm[path] - statistics.median(walls[path]), 2),
                "ms_per_step_all": [round(1000 * s, 3) for s in steps[path]],
            }
        results.append(row)
        print(f"batch {batch}: same tokens as eager: {same}")
        for path in PATHS:
            got = row[path]
            print(
                f"  {path:24s} {got['ms_per_step_median']:8.2f} ms/step "
                f"({got['ms_per_step_min_max'][0]:.2f}..{got['ms_per_step_min_max'][1]:.2f}), "
                f"x{got['speedup_vs_eager']:.2f} vs eager, warm-up +{got['warmup_extra_s']:.1f} s"
            )
    report = {
        "benchmark": "decode_compile",
        "model": args.model,
        "device": str(device),
        "dtype": args.dtype,
        "repeats": args.repeats,
        "method": "per decode step, from on_step timestamps (prefill excluded), fixed length, greedy",
        "results": results,
        "machine": {**machine, "load_average_at_end": os.getloadavg()},
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
