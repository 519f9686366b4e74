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
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path

from prism_lightning import run_paths
from prism_lightning.chat_format import PLACEMENTS
from prism_lightning.contexts import LENGTHS
from prism_lightning.eval import study as study_module
from prism_lightning.eval.conditions import CONDITIONS, Condition
from prism_lightning.eval.settings import (
    BENCHMARKS,
    EvalInputError,
    EvalSettings,
    check_benchmarks,
)
from prism_lightning.files import check_output_dir
from prism_lightning.settings_args import (
    HelpFormatter,
    add_dataclass_arguments,
    flag,
    nested,
    settings_from_namespace,
)

log = logging.getLogger(__name__)

__all__ = [
    "EngineSettings",
    "EvaluateSettings",
    "StudySettings",
    "evaluate_command",
    "evaluate_main",
    "find_checkpoint",
    "study_command",
    "study_main",
]


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


def _parser(prog: str, description: str | None, settings: type) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=f"python -m prism_lightning {prog}",
        description=description,
        epilog="Flags are spelled with underscores, as in every command; the older dashed spellings "
        "(--persona-length, --batch-size, ...) and --bootstrap (now --ci_resamples) still work.",
        formatter_class=HelpFormatter,
    )
    add_dataclass_arguments(ap, settings)
    return ap


@dataclass(kw_only=True)
class EngineSettings:
    """The model that answers, where it runs and on which generation backend (evaluate and study)."""

    model: str | None = flag(None)
    """base model (embedded name, local dir or hub id)"""
    device: str | None = flag(None)
    """cpu / cuda (default: cuda if available)"""
    dtype: str = flag("auto")
    """auto (bfloat16 on GPU and on CPUs with AMX / AVX512-BF16, else float32), bfloat16, float32"""
    threads: int | None = flag(None)
    """torch CPU threads (1 helps on a busy machine)"""
    backend: str = flag("hf", choices=("hf", "vllm"))
    """generation engine: hf (this package's decode loop) or vllm (needs the vllm extra)"""
    vllm: list[str] | None = flag(None, append=True, metavar="KEY=VALUE")
    """a vLLM engine setting (repeatable): tensor_parallel_size, data_parallel_size,
    gpu_memory_utilization, cpu_kv_cache_gib, max_model_len, max_num_seqs, enforce_eager, dtype"""

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise EvalInputError(f"--threads must be >= 1, got {self.threads}.")


@dataclass(kw_only=True)
class EvaluateSettings:
    """``evaluate``'s options, declared once: the command line is generated from these fields."""

    checkpoint: Path | None = flag(None)
    """exported PRISM checkpoint (or a run dir holding one)"""
    merge_weights: bool = flag(False)
    """serve batches routed all on with merged weights (faster; equals peft's merged model, not the
    unmerged adapter bit for bit; costs a second copy of the adapted projections)"""
    benchmarks: tuple[str, ...] = flag(BENCHMARKS, csv=True)
    """comma list of mtbench,mmlu,safety"""
    conditions: tuple[str, ...] | None = flag(None, csv=True)
    """comma list of base,persona,random_persona,lora,prism (default: all with a checkpoint, else
    base,persona,random_persona)"""
    persona_length: str | None = flag(None, choices=LENGTHS)
    """persona length of the persona conditions (default: the one the checkpoint distilled, else short)"""
    placement: str | None = flag(None, choices=("system", "user"))
    """persona placement (default: the checkpoint's, else system)"""
    out: Path = flag()
    """the run's output directory (rerunning with the same one resumes)"""
    engine: EngineSettings = nested(EngineSettings)
    scoring: EvalSettings = nested(EvalSettings)
    wandb: bool = flag(False)
    """log tables to W&B (offline without a key)"""
    wandb_project: str = flag("prism_lightning")
    """the W&B project"""


@dataclass(kw_only=True)
class StudySettings:
    """``study``'s options, declared once: the command line is generated from these fields."""

    benchmarks: tuple[str, ...] = flag(BENCHMARKS, csv=True)
    """comma list of mtbench,mmlu,safety"""
    personas: tuple[str, ...] = flag(("matched",), csv=True)
    """matched (default), all, or a comma list of names"""
    lengths: tuple[str, ...] = flag(LENGTHS, csv=True)
    """comma list of min,short,long"""
    placements: tuple[str, ...] = flag(PLACEMENTS, csv=True)
    """comma list of system,user,none"""
    out: Path = flag()
    """the study's output directory (rerunning with the same one resumes)"""
    engine: EngineSettings = nested(EngineSettings)
    scoring: EvalSettings = nested(EvalSettings)
    wandb: bool = flag(False)
    """log tables to W&B (offline without a key)"""
    wandb_project: str = flag("prism_lightning")
    """the W&B project"""


def _check_files(scoring: EvalSettings, out: Path) -> None:
    """The benchmark-file overrides exist and ``out`` can be a directory (a PrismError names the bad one)."""
    for name, path in scoring.paths.items():
        if not Path(path).expanduser().is_file():
            what = "is a directory" if Path(path).expanduser().is_dir() else "does not exist"
            raise EvalInputError(f"--{name}_file {path} {what}.")
    check_output_dir(out, "--out")


def _start(engine: EngineSettings) -> tuple[str, str]:
    """Logging, threads, then (device, dtype); called once every input has been checked."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if engine.threads:
        import torch

        torch.set_num_threads(engine.threads)
    from prism_lightning.backbone import default_device, inference_dtype

    device = engine.device or default_device()
    return device, inference_dtype(engine.dtype, device)


def generation_from(engine: EngineSettings):
    """The generation backend and vLLM settings of ``--backend``/``--vllm`` (checked before any load)."""
    from prism_lightning.engines import parse_overrides

    generation = parse_overrides(engine.vllm, engine.backend)
    if generation.backend != "vllm" and engine.vllm:
        raise EvalInputError("--vllm settings act only with --backend vllm.")
    if generation.backend == "vllm":
        from prism_lightning.engines.vllm_core import require_vllm

        require_vllm()
    return generation


def _load_judge(judge_model: str | None, dtype: str, generation, device: str):
    if not judge_model:
        return None
    from prism_lightning.backbone import BackboneConfig
    from prism_lightning.engines.hf import HFEngine

    if generation.backend == "vllm":
        from prism_lightning.engines.vllm import VLLMEngine

        judge = BackboneConfig(model=judge_model, dtype=dtype)
        return VLLMEngine.from_backbone_config(judge, generation)
    judge = BackboneConfig(model=judge_model, dtype=dtype).load(device)
    return HFEngine.from_backbone(judge, decode_compile=generation.decode_compile)


def _wandb_config(settings: EvaluateSettings | StudySettings, dtype: str) -> dict:
    """The run's settings as W&B's flat config: every scalar option under its flag's name."""
    config: dict = {}

    def add(obj: object) -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                add(value)
            elif isinstance(value, tuple) and all(isinstance(v, str) for v in value):
                config[f.metadata.get("name") or f.name] = ",".join(value)
            elif isinstance(value, (str, int, float, bool, type(None))):
                config[f.metadata.get("name") or f.name] = value
            elif isinstance(value, Path) and f.name != "out":  # the checkpoint, as its flag gave it
                config[f.metadata.get("name") or f.name] = str(value)

    add(settings)
    return {**config, "dtype": dtype}


# ------------------------------------------------------------------------------------------------
# evaluate


def _conditions(settings: EvaluateSettings) -> list[Condition]:
    if settings.conditions is None:
        names = list(CONDITIONS) if settings.checkpoint else ["base", "persona", "random_persona"]
    else:
        names = list(settings.conditions)
    if not names:
        raise EvalInputError(f"no condition given; choose from {', '.join(CONDITIONS)}.")
    length, placement = settings.persona_length or "short", settings.placement or "system"
    conditions = [Condition(n, length, placement, settings.scoring.seed) for n in names]
    need = [c.name for c in conditions if c.needs_checkpoint]
    if need and not settings.checkpoint:
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


def persona_defaults_from_checkpoint(settings: EvaluateSettings, ckpt: Path) -> EvaluateSettings:
    """``settings`` whose unset --persona_length/--placement take the checkpoint's, so the
    Expert-Prompting condition and the routing correlation use the persona that was distilled."""
    from prism_lightning.model.export import read_meta

    length, placement = distilled_persona(read_meta(ckpt))
    if settings.persona_length is None and length in LENGTHS:
        settings = replace(settings, persona_length=length)
        log.info("persona length %s (the checkpoint's)", length)
    if settings.placement is None and placement in ("system", "user"):
        settings = replace(settings, placement=placement)
        log.info("persona placement %s (the checkpoint's)", placement)
    return settings


def evaluate_main(argv: list[str] | None = None) -> int:
    """``evaluate`` from the command line: its flags are :class:`EvaluateSettings`'s fields."""
    ns = _parser("evaluate", __doc__, EvaluateSettings).parse_args(sys.argv[1:] if argv is None else argv)
    evaluate_command(settings_from_namespace(EvaluateSettings, ns))
    return 0


def evaluate_command(settings: EvaluateSettings) -> dict:
    """Score the benchmarks under the conditions (resuming the cached rows under ``settings.out``), print
    the table, write summary.json/csv; returns the summary. Every input is checked before a model loads."""
    benchmarks = check_benchmarks(settings.benchmarks)
    ckpt = find_checkpoint(settings.checkpoint) if settings.checkpoint else None
    persona_flags = [
        f
        for f, v in (("--persona_length", settings.persona_length), ("--placement", settings.placement))
        if v
    ]
    if ckpt is not None:
        settings = persona_defaults_from_checkpoint(settings, ckpt)
    conditions = _conditions(settings)
    if persona_flags and not any(c.name in ("persona", "random_persona") for c in conditions):
        raise EvalInputError(f"{persona_flags[0]} acts only with the persona or random_persona condition.")
    _check_files(settings.scoring, settings.out)
    engine_settings = settings.engine
    generation = generation_from(engine_settings)
    if settings.merge_weights and (ckpt is None or generation.backend == "vllm"):
        raise EvalInputError(
            "--merge_weights acts only with --checkpoint on the hf backend (vLLM applies the LoRA itself)."
        )

    device, dtype = _start(engine_settings)
    log.info("device %s, dtype %s", device, dtype)
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
        names = {f.name for f in dataclasses.fields(BackboneConfig)}
        saved = {k: v for k, v in saved.items() if k in names}
        saved.update(model=engine_settings.model or saved.get("model"), dtype=dtype)
        override = BackboneConfig(**saved)
        if generation.backend == "vllm":
            from prism_lightning.engines.vllm import VLLMEngine

            engine = VLLMEngine.from_checkpoint(
                ckpt, generation, backbone_override=override, gate_device=device
            )
            created = read_meta(ckpt).get("created")
            model_id = f"{ckpt.resolve()}@{created}:{override.model}:{dtype}:vllm"
        routed = (
            None
            if generation.backend == "vllm"
            else load_checkpoint(
                ckpt, device=device, backbone_override=override, merge_weights=settings.merge_weights
            )
        )
        if routed is not None:
            engine = HFEngine.from_routed(routed, name=str(ckpt), decode_compile=generation.decode_compile)
            base_name = routed.meta["base_model"]["name"]
            merged = ":merged" if settings.merge_weights else ""  # rows of the two paths are kept apart
            model_id = f"{ckpt.resolve()}@{routed.meta.get('created')}:{base_name}:{dtype}{merged}"
    elif generation.backend == "vllm":
        from prism_lightning.engines.vllm import VLLMEngine

        backbone = BackboneConfig(model=engine_settings.model or DEFAULT_MODEL, dtype=dtype)
        engine = VLLMEngine.from_backbone_config(backbone, generation)
        model_id = f"{backbone.model}:{dtype}:vllm"
    else:
        bb = BackboneConfig(model=engine_settings.model or DEFAULT_MODEL, dtype=dtype).load(device)
        engine = HFEngine.from_backbone(bb, decode_compile=generation.decode_compile)
        model_id = f"{bb.name}:{dtype}"
    summary = evaluate(
        engine,
        benchmarks=benchmarks,
        conditions=conditions,
        settings=settings.scoring,
        out=settings.out,
        model_id=model_id,
        judge=_load_judge(settings.scoring.judge_model, dtype, generation, device),
    )
    print(format_table(summary))
    print(
        f"\nwrote {run_paths.eval_summary(settings.out)} and summary.csv in {time.perf_counter() - t0:.0f} s"
    )
    if settings.wandb:
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
            project=settings.wandb_project,
            out=settings.out,
            job_type="evaluate",
            config=_wandb_config(settings, dtype),
            tables={"eval/summary": summary_rows(summary), "eval/routing": routing},
            summary={"pearson": corr.get("pearson"), "spearman": corr.get("spearman")},
        )
    return summary


# ------------------------------------------------------------------------------------------------
# study


def study_main(argv: list[str] | None = None) -> int:
    """``study`` from the command line: its flags are :class:`StudySettings`'s fields."""
    ns = _parser("study", study_module.__doc__, StudySettings).parse_args(
        sys.argv[1:] if argv is None else argv
    )
    study_command(settings_from_namespace(StudySettings, ns))
    return 0


def study_command(settings: StudySettings) -> list[dict]:
    """Score the persona grid (resuming the cached rows under ``settings.out``), print it and write
    study.csv/json; returns the grid's records. Every input is checked before a model loads."""
    from prism_lightning.contexts import ContextLibrary

    library = ContextLibrary.builtin()
    benchmarks = check_benchmarks(settings.benchmarks)
    personas, lengths, placements = study_module.check_grid(
        library, settings.personas, settings.lengths, settings.placements
    )
    _check_files(settings.scoring, settings.out)
    generation = generation_from(settings.engine)

    device, dtype = _start(settings.engine)
    from prism_lightning.backbone import DEFAULT_MODEL, BackboneConfig
    from prism_lightning.engines.hf import HFEngine
    from prism_lightning.eval.summary import wandb_log

    t0 = time.perf_counter()
    backbone = BackboneConfig(model=settings.engine.model or DEFAULT_MODEL, dtype=dtype)
    if generation.backend == "vllm":
        from prism_lightning.engines.vllm import VLLMEngine

        engine, model_id = VLLMEngine.from_backbone_config(backbone, generation), None
    else:
        bb = backbone.load(device)
        engine = HFEngine.from_backbone(bb, decode_compile=generation.decode_compile)
        model_id = f"{bb.name}:{dtype}"
    records = study_module.run_study(
        engine,
        benchmarks=benchmarks,
        personas=personas,
        lengths=lengths,
        placements=placements,
        settings=settings.scoring,
        out=settings.out,
        model_id=model_id or f"{backbone.model}:{dtype}:vllm",
        judge=_load_judge(settings.scoring.judge_model, dtype, generation, device),
        library=library,
    )
    print(study_module.format_grid(records))
    print(f"\nwrote {run_paths.study_csv(settings.out)} and study.json in {time.perf_counter() - t0:.0f} s")
    if settings.wandb:
        wandb_log(
            project=settings.wandb_project,
            out=settings.out,
            job_type="study",
            config=_wandb_config(settings, dtype),
            tables={"study/grid": records},
        )
    return records
