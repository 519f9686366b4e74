"""``python -m prism_lightning evaluate`` and ``... study``: arguments, their checks, model loading.

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
import sys
import time
from pathlib import Path

from prism_lightning import run_paths
from prism_lightning.chat_format import PLACEMENTS
from prism_lightning.contexts import LENGTHS
from prism_lightning.eval import benchmarks as B
from prism_lightning.eval import study as study_module
from prism_lightning.eval.conditions import CONDITIONS, Condition
from prism_lightning.eval.settings import (
    BENCH_FILES,
    BENCHMARKS,
    EvalInputError,
    EvalSettings,
    check_benchmarks,
)
from prism_lightning.files import check_output_dir

log = logging.getLogger(__name__)

__all__ = ["evaluate_main", "find_checkpoint", "study_main"]


def csv_list(text: str) -> list[str]:
    """A comma list from the command line, blanks dropped."""
    return [t.strip() for t in text.split(",") if t.strip()]


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (with prism.json), or a run directory holding exactly one."""
    from prism_lightning.model.export import PRISM_JSON

    p = Path(path).expanduser()
    if (p / PRISM_JSON).is_file():
        return p
    if not p.exists():
        raise EvalInputError(f"--checkpoint {p} does not exist; give a directory exported by `fit`.")
    if not p.is_dir():
        raise EvalInputError(f"--checkpoint {p} is a file; give a directory exported by `fit`.")
    if p.is_dir():
        found = sorted(q.parent for q in p.glob(f"*/{PRISM_JSON}")) or sorted(
            q.parent for q in p.glob(f"*/*/{PRISM_JSON}")
        )
        if len(found) == 1:
            return found[0]
        if found:
            raise EvalInputError(f"{p} holds several checkpoints: {', '.join(map(str, found))}; pick one.")
    raise EvalInputError(f"{p} is not a PRISM checkpoint (no {PRISM_JSON} in it or one level down).")


# old spellings of the flags: still accepted, not listed by --help
_ALIASES: set[str] = set()


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` lists each option under its underscore name only, not its older aliases."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        shown = [s for s in action.option_strings if s not in _ALIASES]
        if not shown or shown == action.option_strings:
            return super()._format_action_invocation(action)
        if action.nargs == 0:
            return ", ".join(shown)
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return ", ".join(f"{s} {metavar}" for s in shown)


def _flag(ap: argparse.ArgumentParser, name: str, *aliases: str, **kwargs) -> None:
    """``--name`` (underscores, the project's spelling) plus, as aliases, its dashed spelling and any
    older names, so existing scripts keep working."""
    dashed = f"--{name.replace('_', '-')}"
    old = ([dashed] if dashed != f"--{name}" else []) + list(aliases)
    _ALIASES.update(old)
    ap.add_argument(f"--{name}", *old, **kwargs)


def _parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=f"python -m prism_lightning {prog}",
        description=description,
        epilog="Flags are spelled with underscores, as in every command; the older dashed spellings "
        "(--persona-length, --batch-size, ...) and --bootstrap (now --ci_resamples) still work.",
        formatter_class=_HelpFormatter,
    )


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The options ``evaluate`` and ``study`` share: model, device, item limit, settings, files, W&B."""
    _flag(ap, "model", default=None, help="base model (embedded name, local dir or hub id)")
    _flag(ap, "device", default=None, help="cpu / cuda (default: cuda if available)")
    _flag(
        ap,
        "dtype",
        default="auto",
        help="auto (bfloat16 on GPU and on CPUs with AMX / AVX512-BF16, else float32), bfloat16, float32",
    )
    _flag(ap, "threads", type=int, default=None, help="torch CPU threads (1 helps on a busy machine)")
    _flag(
        ap,
        "backend",
        default="hf",
        choices=["hf", "vllm"],
        help="generation engine: hf (this package's decode loop) or vllm (needs the vllm extra)",
    )
    _flag(
        ap,
        "vllm",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a vLLM engine setting (repeatable): tensor_parallel_size, data_parallel_size, "
        "gpu_memory_utilization, cpu_kv_cache_gib, max_model_len, max_num_seqs, enforce_eager, dtype",
    )
    _flag(ap, "limit", type=int, default=None, help="items per sub-score group (default: all)")
    _flag(ap, "seed", type=int, default=0)
    _flag(
        ap,
        "batch_size",
        type=int,
        default=64,
        help="generation batch size (large batches pay off even on CPU: 2.7x the tokens/s of 8)",
    )
    _flag(ap, "mmlu_batch_size", type=int, default=16, help="batch size of MMLU's scoring forwards")
    _flag(
        ap,
        "judge_batch_size",
        type=int,
        default=16,
        help="batch size of the judge's scoring forwards (logprob ratings, safety yes/no)",
    )
    _flag(
        ap,
        "mmlu_format",
        default="chat",
        choices=list(B.MMLU_FORMATS),
        help="raw: the paper's plain-text MMLU prompt scored on ' A'..' D' (persona as a system prefix); "
        "chat: the question as a chat user turn scored on the assistant's first token",
    )
    _flag(ap, "mtbench_max_new_tokens", type=int, default=256)
    _flag(ap, "safety_max_new_tokens", type=int, default=256)
    _flag(
        ap,
        "judge_mode",
        choices=["auto", "generate", "logprob"],
        default="auto",
        help="generate: FastChat [[rating]] parsing (unparsable = missing); "
        "logprob: expected rating from the judge's next-token probabilities after 'Rating: [['; "
        "auto: generate for judges of 1B parameters or more, else logprob",
    )
    _flag(ap, "judge_max_new_tokens", type=int, default=256)
    _flag(ap, "judge_model", default=None, help="judge model (default: the base model itself)")
    _flag(
        ap,
        "thinking_max_new_tokens",
        type=int,
        default=1024,
        help="a reasoning model's thinking budget (its chat template opens a <think> block): the MT-Bench "
        "and safety answers, and a reasoning judge's rating or yes/no, are read after the block",
    )
    _flag(ap, "safety_sets", default=",".join(B.SAFETY_SETS), help="comma list of the safety sets")
    _flag(
        ap,
        "ci_resamples",
        "--bootstrap",  # its old name, kept working; it never meant the bootstrap stage
        type=int,
        default=1000,
        help="bootstrap resamples of every 95%% confidence interval",
    )
    for name in BENCH_FILES:
        _flag(
            ap,
            f"{name}_file",
            dest=f"file_{name}",
            metavar="FILE",
            default=None,
            help=f"local file replacing the pinned {name} data (same format)",
        )
    _flag(ap, "wandb", action="store_true", help="log tables to W&B (offline without a key)")
    _flag(ap, "wandb_project", default="prism_lightning")


def settings_from(args: argparse.Namespace) -> EvalSettings:
    """The checked settings of the parsed arguments (a PrismError names the bad one)."""
    if args.threads is not None and args.threads < 1:
        raise EvalInputError(f"--threads must be >= 1, got {args.threads}.")
    paths = {k[5:]: v for k, v in vars(args).items() if k.startswith("file_") and v}
    for name, path in paths.items():
        if not Path(path).expanduser().is_file():
            what = "is a directory" if Path(path).expanduser().is_dir() else "does not exist"
            raise EvalInputError(f"--{name}_file {path} {what}.")
    check_output_dir(args.out, "--out")
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
        judge_batch_size=args.judge_batch_size,
        n_resamples=args.ci_resamples,
        safety_sets=tuple(csv_list(args.safety_sets)),
        paths=paths,
        mmlu_format=args.mmlu_format,
        thinking_max_new_tokens=args.thinking_max_new_tokens,
    )


def _start(args: argparse.Namespace) -> tuple[str, str]:
    """Logging, threads, then (device, dtype); called once every input has been checked."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from prism_lightning.backbone import default_device, inference_dtype

    device = args.device or default_device()
    return device, inference_dtype(args.dtype, device)


def generation_from(args: argparse.Namespace):
    """The generation backend and vLLM settings of ``--backend``/``--vllm`` (checked before any load)."""
    from prism_lightning.engines import parse_overrides

    generation = parse_overrides(args.vllm, args.backend)
    if generation.backend != "vllm" and args.vllm:
        raise EvalInputError("--vllm settings act only with --backend vllm.")
    if generation.backend == "vllm":
        from prism_lightning.engines.vllm_core import require_vllm

        require_vllm()
    return generation


def _load_judge(args: argparse.Namespace, device: str):
    if not args.judge_model:
        return None
    from prism_lightning.backbone import BackboneConfig
    from prism_lightning.engines.hf import HFEngine

    if args.generation.backend == "vllm":
        from prism_lightning.engines.vllm import VLLMEngine

        judge = BackboneConfig(model=args.judge_model, dtype=args.dtype)
        return VLLMEngine.from_backbone_config(judge, args.generation)
    return HFEngine.from_backbone(BackboneConfig(model=args.judge_model, dtype=args.dtype).load(device))


def _wandb_config(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}


# ------------------------------------------------------------------------------------------------
# evaluate


def _conditions(args: argparse.Namespace) -> list[Condition]:
    if args.conditions is None:
        names = list(CONDITIONS) if args.checkpoint else ["base", "persona", "random_persona"]
    else:
        names = csv_list(args.conditions)
    if not names:
        raise EvalInputError(f"no condition given; choose from {', '.join(CONDITIONS)}.")
    length, placement = args.persona_length or "short", args.placement or "system"
    conditions = [Condition(n, length, placement, args.seed) for n in names]
    need = [c.name for c in conditions if c.needs_checkpoint]
    if need and not args.checkpoint:
        raise EvalInputError(
            f"condition(s) {', '.join(need)} need a PRISM checkpoint: give --checkpoint DIR, or run only "
            "base, persona, random_persona."
        )
    return conditions


def distilled_persona(meta: dict) -> tuple[str | None, str | None]:
    """(persona length, placement) the checkpoint's bootstrap distilled, from its recorded fit config;
    (None, None) when the checkpoint does not record them (an export made from Python)."""
    boot = ((meta.get("training_config") or {}).get("data") or {}).get("bootstrap") or {}
    return boot.get("persona_length"), boot.get("placement")


def persona_defaults_from_checkpoint(args: argparse.Namespace, ckpt: Path) -> None:
    """Unset --persona_length/--placement take the checkpoint's, so the Expert-Prompting condition and
    the routing correlation use the persona that was distilled."""
    from prism_lightning.model.export import read_meta

    length, placement = distilled_persona(read_meta(ckpt))
    if args.persona_length is None and length in LENGTHS:
        args.persona_length = length
        log.info("persona length %s (the checkpoint's)", length)
    if args.placement is None and placement in ("system", "user"):
        args.placement = placement
        log.info("persona placement %s (the checkpoint's)", placement)


def evaluate_main(argv: list[str] | None = None) -> int:
    ap = _parser("evaluate", __doc__)
    ap.add_argument("--checkpoint", default=None, help="exported PRISM checkpoint (or a run dir holding one)")
    ap.add_argument(
        "--merge_weights",
        action="store_true",
        help="serve batches routed all on with merged weights (faster; equals peft's merged model, not the "
        "unmerged adapter bit for bit; costs a second copy of the adapted projections)",
    )
    ap.add_argument(
        "--benchmarks", default=",".join(BENCHMARKS), help="comma list of " + ",".join(BENCHMARKS)
    )
    ap.add_argument(
        "--conditions",
        default=None,
        help=f"comma list of {','.join(CONDITIONS)} (default: all with a checkpoint, "
        "else base,persona,random_persona)",
    )
    _flag(
        ap,
        "persona_length",
        default=None,
        choices=list(LENGTHS),
        help="persona length of the persona conditions (default: the one the checkpoint distilled, "
        "else short)",
    )
    _flag(
        ap,
        "placement",
        default=None,
        choices=["system", "user"],
        help="persona placement (default: the checkpoint's, else system)",
    )
    _flag(ap, "out", required=True, type=Path)
    add_common_args(ap)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)

    # every input is checked before a model loads
    benchmarks = check_benchmarks(csv_list(args.benchmarks))
    ckpt = find_checkpoint(args.checkpoint) if args.checkpoint else None
    persona_flags = [
        f for f, v in (("--persona_length", args.persona_length), ("--placement", args.placement)) if v
    ]
    if ckpt is not None:
        persona_defaults_from_checkpoint(args, ckpt)
    conditions = _conditions(args)
    if persona_flags and not any(c.name in ("persona", "random_persona") for c in conditions):
        raise EvalInputError(f"{persona_flags[0]} acts only with the persona or random_persona condition.")
    settings = settings_from(args)
    args.generation = generation_from(args)
    if args.merge_weights and (ckpt is None or args.generation.backend == "vllm"):
        raise EvalInputError(
            "--merge_weights acts only with --checkpoint on the hf backend (vLLM applies the LoRA itself)."
        )

    device, args.dtype = _start(args)
    log.info("device %s, dtype %s", device, args.dtype)
    from prism_lightning.backbone import DEFAULT_MODEL, BackboneConfig
    from prism_lightning.engines.hf import HFEngine
    from prism_lightning.eval.runner import evaluate
    from prism_lightning.eval.summary import format_table, summary_rows, wandb_log

    t0 = time.perf_counter()
    if ckpt is not None:
        import dataclasses

        from prism_lightning.model.export import load_checkpoint, read_meta

        # the checkpoint's backbone settings, with this command's dtype (and --model if given)
        saved = dict(read_meta(ckpt)["base_model"]["backbone"])
        fields = {f.name for f in dataclasses.fields(BackboneConfig)}
        saved = {k: v for k, v in saved.items() if k in fields}
        saved.update(model=args.model or saved.get("model"), dtype=args.dtype)
        override = BackboneConfig(**saved)
        if args.generation.backend == "vllm":
            from prism_lightning.engines.vllm import VLLMEngine

            engine = VLLMEngine.from_checkpoint(
                ckpt, args.generation, backbone_override=override, gate_device=device
            )
            created = read_meta(ckpt).get("created")
            model_id = f"{ckpt.resolve()}@{created}:{override.model}:{args.dtype}:vllm"
        routed = None if args.generation.backend == "vllm" else load_checkpoint(
            ckpt, device=device, backbone_override=override, merge_weights=args.merge_weights
        )
        if routed is not None:
            engine = HFEngine.from_routed(routed, name=str(ckpt))
            base_name = routed.meta["base_model"]["name"]
            merged = ":merged" if args.merge_weights else ""  # rows of the two paths are kept apart
            model_id = f"{ckpt.resolve()}@{routed.meta.get('created')}:{base_name}:{args.dtype}{merged}"
    elif args.generation.backend == "vllm":
        from prism_lightning.engines.vllm import VLLMEngine

        backbone = BackboneConfig(model=args.model or DEFAULT_MODEL, dtype=args.dtype)
        engine = VLLMEngine.from_backbone_config(backbone, args.generation)
        model_id = f"{backbone.model}:{args.dtype}:vllm"
    else:
        bb = BackboneConfig(model=args.model or DEFAULT_MODEL, dtype=args.dtype).load(device)
        engine = HFEngine.from_backbone(bb)
        model_id = f"{bb.name}:{args.dtype}"
    summary = evaluate(
        engine,
        benchmarks=benchmarks,
        conditions=conditions,
        settings=settings,
        out=args.out,
        model_id=model_id,
        judge=_load_judge(args, device),
    )
    print(format_table(summary))
    print(f"\nwrote {run_paths.eval_summary(args.out)} and summary.csv in {time.perf_counter() - t0:.0f} s")
    if args.wandb:
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
            project=args.wandb_project,
            out=args.out,
            job_type="evaluate",
            config=_wandb_config(args),
            tables={"eval/summary": summary_rows(summary), "eval/routing": routing},
            summary={"pearson": corr.get("pearson"), "spearman": corr.get("spearman")},
        )
    return 0


# ------------------------------------------------------------------------------------------------
# study


def study_main(argv: list[str] | None = None) -> int:
    from prism_lightning.contexts import ContextLibrary

    ap = _parser("study", study_module.__doc__)
    ap.add_argument(
        "--benchmarks", default=",".join(BENCHMARKS), help="comma list of " + ",".join(BENCHMARKS)
    )
    ap.add_argument("--personas", default="matched", help="matched (default), all, or a comma list of names")
    ap.add_argument("--lengths", default=",".join(LENGTHS), help=f"comma list of {','.join(LENGTHS)}")
    ap.add_argument(
        "--placements", default=",".join(PLACEMENTS), help="comma list of " + ",".join(PLACEMENTS)
    )
    _flag(ap, "out", required=True, type=Path)
    add_common_args(ap)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)

    # every input is checked before a model loads
    library = ContextLibrary.builtin()
    benchmarks = check_benchmarks(csv_list(args.benchmarks))
    personas, lengths, placements = study_module.check_grid(
        library, csv_list(args.personas), csv_list(args.lengths), csv_list(args.placements)
    )
    settings = settings_from(args)
    args.generation = generation_from(args)

    device, args.dtype = _start(args)
    from prism_lightning.backbone import DEFAULT_MODEL, BackboneConfig
    from prism_lightning.engines.hf import HFEngine
    from prism_lightning.eval.summary import wandb_log

    t0 = time.perf_counter()
    backbone = BackboneConfig(model=args.model or DEFAULT_MODEL, dtype=args.dtype)
    if args.generation.backend == "vllm":
        from prism_lightning.engines.vllm import VLLMEngine

        engine, model_id = VLLMEngine.from_backbone_config(backbone, args.generation), None
    else:
        bb = backbone.load(device)
        engine, model_id = HFEngine.from_backbone(bb), f"{bb.name}:{args.dtype}"
    records = study_module.run_study(
        engine,
        benchmarks=benchmarks,
        personas=personas,
        lengths=lengths,
        placements=placements,
        settings=settings,
        out=args.out,
        model_id=model_id or f"{backbone.model}:{args.dtype}:vllm",
        judge=_load_judge(args, device),
        library=library,
    )
    print(study_module.format_grid(records))
    print(f"\nwrote {run_paths.study_csv(args.out)} and study.json in {time.perf_counter() - t0:.0f} s")
    if args.wandb:
        wandb_log(
            project=args.wandb_project,
            out=args.out,
            job_type="study",
            config=_wandb_config(args),
            tables={"study/grid": records},
        )
    return 0
