"""The same bootstrap + evaluation workload through both generation backends (hf and vLLM), side by side.

Workload, identical for both backends (fresh run directories, nothing cached):

1. the bootstrap's four stages (queries, answers, verdicts, teacher targets) for ``--personas`` x
   ``--queries-per-persona`` queries;
2. ``evaluate`` without a checkpoint (conditions base and persona) on ``--benchmarks`` at ``--limit``
   items per sub-score group.

Reported per backend: wall time of each bootstrap stage, its generated tokens and tokens/s, the
evaluation's wall time, the vLLM engine's start time (paid once per process, included in the first
stage's wall time and listed on its own), and the end-to-end wall time; then the vllm/hf ratios.
Sampled rows differ between the backends (different random streams), so token counts differ, and the
stage times include model load, Trainer setup and the engine start: this is an end-to-end check that the
whole workload runs on both backends, not a speed ratio. ``benchmarks/backends_fixed.py`` measures the
ratio (the same rows, the same token count, engine opening timed apart, interleaved repeats).

Examples::

    # CPU (2 cores), embedded SmolLM2-135M-Instruct, small
    python benchmarks/backends.py --limit 1 --json benchmarks/results/backends_cpu.json
    # GPU with vLLM installed (pip install 'prism_lightning[vllm]'): the paper-sized bootstrap
    python benchmarks/backends.py --model Qwen/Qwen2.5-7B-Instruct --personas all --queries-per-persona 50 \\
        --answer-max-new-tokens 512 --limit 10 --json benchmarks/results/backends_h100.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generation_throughput import machine_description  # noqa: E402
from routing_and_training import write_report  # noqa: E402

from prism_lightning.backbone import BackboneConfig  # noqa: E402
from prism_lightning.bootstrap.config import BootstrapConfig  # noqa: E402
from prism_lightning.bootstrap.summary import STAGES  # noqa: E402
from prism_lightning.engines import GenerationConfig, parse_overrides  # noqa: E402

BACKENDS = ("hf", "vllm")


def run_backend(backend: str, args, generation: GenerationConfig, work: Path) -> dict:
    """The whole workload on one backend; returns its timings."""
    from prism_lightning.bootstrap.runner import run_bootstrap
    from prism_lightning.eval.conditions import Condition
    from prism_lightning.eval.runner import evaluate
    from prism_lightning.eval.settings import EvalSettings

    backbone = BackboneConfig(model=args.model)
    config = BootstrapConfig(
        personas=args.personas,
        queries_per_persona=args.queries_per_persona,
        query_max_new_tokens=args.query_max_new_tokens,
        answer_max_new_tokens=args.answer_max_new_tokens,
        batch_size=args.batch_size,
        generation=replace(generation, backend=backend),
    )
    start = time.perf_counter()
    result = run_bootstrap(config, backbone, work / backend / "run", {"enable_progress_bar": False},
                           keep_engines=True)  # fmt: skip
    boot_seconds = time.perf_counter() - start
    stages = {
        name: {
            "seconds": result.summary["stages"][name]["seconds_this_run"],
            "tokens": result.summary["stages"][name]["tokens_generated"] or 0,
            "tokens_per_s": result.summary["stages"][name]["tokens_per_second"] or 0.0,
            "rows": result.summary["stages"][name]["rows"],
        }
        for name in STAGES
    }
    engine_start = None
    t0 = time.perf_counter()
    if backend == "vllm":
        from prism_lightning.engines.vllm import VLLMEngine

        engine = VLLMEngine.from_backbone_config(backbone, config.generation)  # the bootstrap's engine
        engine_start = engine.engine.start_seconds
    else:
        from prism_lightning.engines.hf import HFEngine

        engine = HFEngine.from_backbone(backbone.load("cuda" if torch.cuda.is_available() else "cpu"))
    settings = EvalSettings(
        limit=args.limit,
        mtbench_max_new_tokens=args.eval_max_new_tokens,
        safety_max_new_tokens=args.eval_max_new_tokens,
        judge_mode="logprob",
        n_resamples=50,
    )
    evaluate(
        engine,
        benchmarks=args.benchmarks.split(","),
        conditions=[Condition("base"), Condition("persona")],
        settings=settings,
        out=work / backend / "eval",
        model_id=f"{args.model}:{backend}",
    )
    eval_seconds = time.perf_counter() - t0
    if backend == "vllm":
        from prism_lightning.engines.vllm_core import shutdown_engines

        shutdown_engines()
    gen_tokens = sum(s["tokens"] for s in stages.values())
    gen_seconds = sum(s["seconds"] for s in stages.values() if s["tokens"])
    return {
        "bootstrap_seconds": round(boot_seconds, 2),
        "bootstrap_generation_tokens_per_s": round(gen_tokens / gen_seconds, 2) if gen_seconds else 0.0,
        "engine_start_seconds": round(engine_start, 2) if engine_start is not None else None,
        "eval_seconds": round(eval_seconds, 2),
        "total_seconds": round(boot_seconds + eval_seconds, 2),
        "stages": stages,
    }


def table(results: dict) -> str:
    hf, vl = results["hf"], results["vllm"]

    def ratio(a, b):
        return f"{b / a:.2f}x" if a else "-"

    def line(label: str, a: float, b: float) -> str:
        return f"{label:36} | {a:10.1f} | {b:10.1f} | {ratio(a, b)}"

    lines = [f"{'':36} | {'hf':>10} | {'vllm':>10} | vllm/hf", "-" * 74]
    for name in STAGES:
        a, b = hf["stages"][name], vl["stages"][name]
        lines.append(line(f"{name} wall s", a["seconds"], b["seconds"]))
        if a["tokens"] or b["tokens"]:
            lines.append(line(f"{name} tokens/s", a["tokens_per_s"], b["tokens_per_s"]))
    for key in ("bootstrap_generation_tokens_per_s", "bootstrap_seconds", "eval_seconds", "total_seconds"):
        lines.append(line(key, hf[key], vl[key]))
    start = vl["engine_start_seconds"] or 0.0
    lines.append(f"{'vLLM engine start s (in the above)':36} | {'-':>10} | {start:10.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--personas", default="math,writing", help="comma list or all")
    parser.add_argument("--queries-per-persona", type=int, default=2)
    parser.add_argument("--query-max-new-tokens", type=int, default=48)
    parser.add_argument("--answer-max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="the hf backend's generation batch")
    parser.add_argument("--benchmarks", default="mmlu,safety")
    parser.add_argument("--limit", type=int, default=1, help="evaluation items per sub-score group")
    parser.add_argument("--eval-max-new-tokens", type=int, default=32)
    parser.add_argument("--vllm", action="append", default=None, metavar="KEY=VALUE", help="vLLM setting")
    parser.add_argument("--order", default="hf,vllm", help="which backend runs first")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    args.personas = "all" if args.personas == "all" else args.personas.split(",")
    if sorted(args.order.split(",")) != sorted(BACKENDS):
        parser.error(f"--order lists each of {', '.join(BACKENDS)} once")
    generation = parse_overrides(args.vllm, "vllm")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = machine_description(device)
    results = {}
    with tempfile.TemporaryDirectory(prefix="prism-backends-") as tmp:
        for backend in args.order.split(","):
            print(f"--- {backend} ---", flush=True)
            results[backend] = run_backend(backend, args, generation, Path(tmp))
    print(table(results))
    out = {
        "benchmark": "backends",
        "workload": {k: v for k, v in vars(args).items() if k != "json"} | {"json": None},
        "vllm_settings": generation.as_dict(),
        "machine": {**info, "load_average_at_end": os.getloadavg()},
        "results": results,
    }
    out["machine"]["vllm"] = vllm_version()
    write_report(out, args.json)
    return out


def vllm_version() -> str | None:
    """The installed vLLM's version for the report; None where it is not installed."""
    try:
        import vllm
    except ImportError:
        return None
    return vllm.__version__


if __name__ == "__main__":  # vLLM may spawn its engine process: keep the guard
    main()
