"""``python -m prism_lightning evaluate`` and ``... study``.

evaluate: score MT-Bench, MMLU and the safety sets under the paper's conditions::

    python -m prism_lightning evaluate --checkpoint checkpoints/default \\
        --benchmarks mtbench,mmlu,safety --conditions base,persona,random_persona,lora,prism \\
        --limit 5 --out runs/eval

``--limit N`` is per sub-score group: N questions per MT-Bench category, N per MMLU domain (a
seeded sample), N per safety set. Without ``--checkpoint`` only base/persona/random_persona run, on
``--model`` (default: the embedded SmolLM2). Rerunning with the same ``--out`` resumes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from prism_lightning.eval import benchmarks as B

log = logging.getLogger(__name__)

__all__ = ["evaluate_main", "find_checkpoint", "study_main"]


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (with prism.json), or a run directory holding exactly one."""
    from prism_lightning.model.export import PRISM_JSON

    p = Path(path).expanduser()
    if (p / PRISM_JSON).is_file():
        return p
    if p.is_dir():
        found = sorted(q.parent for q in p.glob(f"*/{PRISM_JSON}")) or sorted(
            q.parent for q in p.glob(f"*/*/{PRISM_JSON}")
        )
        if len(found) == 1:
            return found[0]
        if found:
            raise FileNotFoundError(f"{p} holds several checkpoints: {', '.join(map(str, found))}; pick one")
    raise FileNotFoundError(f"{p} is not a PRISM checkpoint (no {PRISM_JSON} in it or one level down)")


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None, help="base model (embedded name, local dir or hub id)")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    ap.add_argument(
        "--dtype",
        default="auto",
        help="auto (bfloat16 on GPU and on CPUs with AMX / AVX512-BF16, else float32), bfloat16, float32",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 helps on a busy machine)")
    ap.add_argument("--limit", type=int, default=None, help="items per sub-score group (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="generation batch size (large batches pay off even on CPU: 2.7x the tokens/s of 8)",
    )
    ap.add_argument("--mmlu-batch-size", type=int, default=16, help="batch size of scoring forwards")
    ap.add_argument("--mtbench-max-new-tokens", type=int, default=256)
    ap.add_argument("--safety-max-new-tokens", type=int, default=256)
    ap.add_argument(
        "--judge-mode",
        choices=["auto", "generate", "logprob"],
        default="auto",
        help="generate: FastChat [[rating]] parsing (unparsable = missing); "
        "logprob: expected rating from the judge's next-token probabilities after 'Rating: [['; "
        "auto: generate for judges of 1B parameters or more, else logprob",
    )
    ap.add_argument("--judge-max-new-tokens", type=int, default=256)
    ap.add_argument("--judge-model", default=None, help="judge model (default: the base model itself)")
    ap.add_argument("--safety-sets", default=",".join(B.SAFETY_SETS))
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    for name in ("mtbench", "mtbench_references", "judge_prompts", "mmlu", *B.SAFETY_SETS):
        ap.add_argument(
            f"--{name.replace('_', '-')}-file",
            dest=f"file_{name}",
            default=None,
            help=f"local file replacing the pinned {name} data (same format)",
        )
    ap.add_argument("--wandb", action="store_true", help="log tables to W&B (offline without a key)")
    ap.add_argument("--wandb-project", default="prism_lightning")


def settings_from(args):
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from prism_lightning.eval.runner import EvalSettings

    paths = {k[5:]: v for k, v in vars(args).items() if k.startswith("file_") and v}
    return EvalSettings(
        limit=args.limit,
        seed=args.seed,
        mtbench_max_new_tokens=args.mtbench_max_new_tokens,
        safety_max_new_tokens=args.safety_max_new_tokens,
        judge_mode=args.judge_mode,
        judge_max_new_tokens=args.judge_max_new_tokens,
        judge_model=args.judge_model,
        batch_size=args.batch_size,
        mmlu_batch_size=args.mmlu_batch_size,
        n_resamples=args.bootstrap,
        safety_sets=tuple(_csv(args.safety_sets)),
        paths=paths,
    )


def load_judge(args, device):
    if not args.judge_model:
        return None
    from prism_lightning.backbone import BackboneConfig
    from prism_lightning.eval.engine import Engine

    return Engine.from_backbone(BackboneConfig(model=args.judge_model, dtype=args.dtype).load(device))


def wandb_log(args, job_type: str, tables: dict[str, list[dict]], summary: dict | None = None) -> None:
    """Log lists of flat dicts as W&B tables; offline mode when no API key is configured."""
    import wandb

    mode = None if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") else "offline"
    run = wandb.init(
        project=args.wandb_project,
        job_type=job_type,
        dir=str(args.out),
        mode=mode,
        config={k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))},
    )
    try:
        for name, rows in tables.items():
            if rows:
                cols = list(dict.fromkeys(k for r in rows for k in r))
                run.log({name: wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])})
        if summary:
            run.summary.update(summary)
    finally:
        run.finish()


def evaluate_main(argv: list[str] | None = None) -> int:
    from prism_lightning.eval.conditions import CONDITIONS, Condition

    ap = argparse.ArgumentParser(
        prog="python -m prism_lightning evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--checkpoint", default=None, help="exported PRISM checkpoint (or a run dir holding one)")
    ap.add_argument("--benchmarks", default="mtbench,mmlu,safety")
    ap.add_argument(
        "--conditions",
        default=None,
        help=f"comma list of {','.join(CONDITIONS)} (default: all with a checkpoint, "
        "else base,persona,random_persona)",
    )
    ap.add_argument("--persona-length", default="short", choices=["min", "short", "long"])
    ap.add_argument("--placement", default="system", choices=["system", "user"])
    ap.add_argument("--out", required=True, type=Path)
    add_common_args(ap)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from prism_lightning.backbone import DEFAULT_MODEL, BackboneConfig, default_device, inference_dtype
    from prism_lightning.eval.engine import Engine
    from prism_lightning.eval.runner import evaluate, format_table

    device = args.device or default_device()
    args.dtype = inference_dtype(args.dtype, device)
    log.info("device %s, dtype %s", device, args.dtype)
    cond_names = (
        _csv(args.conditions)
        if args.conditions
        else (list(CONDITIONS) if args.checkpoint else ["base", "persona", "random_persona"])
    )
    conditions = [Condition(n, args.persona_length, args.placement, args.seed) for n in cond_names]
    if any(c.needs_checkpoint for c in conditions) and not args.checkpoint:
        ap.error("conditions lora and prism need --checkpoint")
    settings = settings_from(args)
    t0 = time.perf_counter()
    if args.checkpoint:
        from prism_lightning.model.export import load_checkpoint

        try:
            ckpt = find_checkpoint(args.checkpoint)
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        import dataclasses

        from prism_lightning.model.export import read_meta

        # the checkpoint's backbone settings, with this command's dtype (and --model if given)
        saved = dict(read_meta(ckpt)["base_model"]["backbone"])
        fields = {f.name for f in dataclasses.fields(BackboneConfig)}
        saved = {k: v for k, v in saved.items() if k in fields}
        saved.update(model=args.model or saved.get("model"), dtype=args.dtype)
        override = BackboneConfig(**saved)
        routed = load_checkpoint(ckpt, device=device, backbone_override=override)
        engine = Engine.from_routed(routed, name=str(ckpt))
        base_name = routed.meta["base_model"]["name"]
        model_id = f"{ckpt.resolve()}@{routed.meta.get('created')}:{base_name}:{args.dtype}"
    else:
        bb = BackboneConfig(model=args.model or DEFAULT_MODEL, dtype=args.dtype).load(device)
        engine = Engine.from_backbone(bb)
        model_id = f"{bb.name}:{args.dtype}"
    judge = load_judge(args, device)
    summary = evaluate(
        engine,
        benchmarks=_csv(args.benchmarks),
        conditions=conditions,
        settings=settings,
        out=args.out,
        model_id=model_id,
        judge=judge,
    )
    print(format_table(summary))
    print(f"\nwrote {args.out / 'summary.json'} and summary.csv in {time.perf_counter() - t0:.0f} s")
    if args.wandb:
        tidy = []
        for cond, res in summary["conditions"].items():
            for n, ci in res["subscores"].items():
                tidy.append(
                    {
                        "condition": cond,
                        "score": n,
                        "mean": ci["mean"],
                        "lo": ci["lo"],
                        "hi": ci["hi"],
                        "n": ci["n"],
                        "missing": ci["missing"],
                        "routing_rate": res["routing_rate"].get(n),
                    }
                )
            for n in ("mtbench", "mmlu", "safety", "overall"):
                if n in res:
                    tidy.append(
                        {
                            "condition": cond,
                            "score": n,
                            "mean": res[n]["mean"],
                            "lo": res[n]["lo"],
                            "hi": res[n]["hi"],
                        }
                    )
        corr = summary["correlation"]
        routing = [
            {
                "category": n,
                "routing_rate_pct": corr.get("routing_rate_pct", {}).get(n),
                "persona_effect": corr.get("persona_effect", {}).get(n),
            }
            for n in summary["subscores"]
        ]
        wandb_log(
            args,
            "evaluate",
            {"eval/summary": tidy, "eval/routing": routing},
            {"pearson": corr.get("pearson"), "spearman": corr.get("spearman")},
        )
    return 0


def study_main(argv: list[str] | None = None) -> int:
    from prism_lightning.eval.study import study_cli

    return study_cli(argv)
