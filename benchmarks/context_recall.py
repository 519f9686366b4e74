"""Context recall: did the adapter learn the fact sheet? Exact-match recall on held-out questions.

For a checkpoint trained on a reference context (``configs/contexts/fact_sheet.yaml``), asks the recall
set's questions (never seen by the bootstrap) greedily under four conditions of the one loaded model:
base without the context, base with the context in the prompt, the adapter forced on without the context,
and the gate's own choice; prints recall per condition, the share of the with-context recall the adapter
recovers, and writes every reply and the summary to JSON.

    python -m prism_lightning fit --config configs/contexts/fact_sheet.yaml
    python benchmarks/context_recall.py --checkpoint checkpoints/fact_sheet \\
        --json benchmarks/results/context_recall_cpu.json

A script rather than an ``evaluate`` condition: recall needs a context and its own question set, not a
benchmark's categories and judge, and like the other measurements here it records the machine and commit
beside the numbers. The scoring lives in ``prism_lightning.eval.recall`` for reuse.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout


def main(argv: list[str] | None = None) -> dict:
    from prism_lightning.contexts import example_path
    from prism_lightning.eval.recall import CONDITIONS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="an exported run (checkpoints/<run>)")
    parser.add_argument("--questions", default=None, help="recall set YAML (default: the fact sheet's)")
    parser.add_argument("--conditions", default=",".join(CONDITIONS), help="comma list of the conditions")
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--placement", default="system", choices=("system", "user"))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--json", default=None, help="write rows + summary here")
    args = parser.parse_args(argv)
    questions = args.questions or example_path("fact_sheet_questions")
    return run(args, questions)


def run(args, questions) -> dict:
    import dataclasses

    import torch

    from prism_lightning.eval.recall import load_recall_set, run_recall
    from prism_lightning.model.export import load_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.limit is not None and args.limit < 1:
        raise SystemExit("error: --limit must be >= 1")
    recall_set = load_recall_set(questions)  # before loading any model
    if args.limit:
        recall_set = dataclasses.replace(recall_set, questions=recall_set.questions[: args.limit])
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    routed = load_checkpoint(args.checkpoint, device="cpu" if not torch.cuda.is_available() else None)
    start = time.perf_counter()
    result = run_recall(
        routed,
        recall_set,
        conditions=conditions,
        max_new_tokens=args.max_new_tokens,
        placement=args.placement,
        batch_size=args.batch_size,
    )
    seconds = time.perf_counter() - start
    summary = result["summary"]
    print(f"recall on {len(recall_set.questions)} held-out questions about {recall_set.context.name!r}")
    print(f"{'condition':<10} {'recall':>8} {'recalled':>9} {'prompt tokens':>14} {'routed on':>10}")
    for name, row in summary["conditions"].items():
        print(
            f"{name:<10} {row['recall']:>8.1%} {row['recalled']:>4}/{row['questions']:<4} "
            f"{row['mean_prompt_tokens']:>14.1f} {row['routed_on']:>10}"
        )
    for key in ("recovered_share", "recovered_share_above_base"):
        if key in summary:
            value = summary[key]
            print(f"{key}: {'n/a' if value is None else f'{value:.2f}'}")
    if args.json:
        from benchmarks.context_savings import machine

        out = {
            "checkpoint": str(args.checkpoint),
            "questions_file": str(questions),
            "context": recall_set.context.name,
            "max_new_tokens": args.max_new_tokens,
            "placement": args.placement,
            "seconds": round(seconds, 1),
            "machine": machine(),
            "training_config": routed.meta.get("training_config"),
            "bootstrap_split": (routed.meta.get("bootstrap_summary") or {}).get("verdicts"),
            **result,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    from prism_lightning.errors import PrismError

    try:
        main()
    except PrismError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
