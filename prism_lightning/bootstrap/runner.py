"""Orchestration of the bootstrap: queries -> answers -> verdicts -> teacher targets.

Each stage is a :class:`~prism_lightning.bootstrap.store.StageStore` keyed by its settings and its
upstream stages. A finished stage is read from disk (no Trainer, no model) once its files match the
content hashes in its meta.json; one that does not (a truncated, garbled or missing file, or rows
computed from other upstream rows) is deleted together with the stages after it and recomputed, with
one warning line per deleted directory. The engines (the base model's, and the judge's when it is
another model; :class:`~prism_lightning.bootstrap.tasks.StageTasks`) open lazily, once, only when some
stage has work to do, and are freed at the end.
:func:`run_bootstrap` writes ``<run_dir>/bootstrap/summary.json``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from prism_lightning import run_paths
from prism_lightning.backbone import BackboneConfig, model_thinking
from prism_lightning.bootstrap import answers as answers_mod
from prism_lightning.bootstrap import queries as queries_mod
from prism_lightning.bootstrap import teacher as teacher_mod
from prism_lightning.bootstrap import verdicts as verdicts_mod
from prism_lightning.bootstrap.config import BootstrapConfig
from prism_lightning.bootstrap.prompts import PROMPT_VERSION
from prism_lightning.bootstrap.stage import barrier, dist_ready, global_rank, run_stage
from prism_lightning.bootstrap.store import (
    FORMAT_VERSION,
    StageCheck,
    StageStore,
    finished_dir_problem,
    stage_hash,
)
from prism_lightning.bootstrap.summary import STAGES, build_summary
from prism_lightning.bootstrap.tasks import StageTasks
from prism_lightning.contexts import Context, ContextLibrary
from prism_lightning.files import atomic_write_json, read_written_jsonl

log = logging.getLogger(__name__)


@dataclass
class BootstrapResult:
    """Where each finished stage lives and the run summary (also in ``summary_path``)."""

    run_dir: Path
    stages: dict[str, StageStore]
    summary: dict[str, Any]
    summary_path: Path
    personas: list[Context] = field(default_factory=list)

    @property
    def stage_dirs(self) -> dict[str, Path]:
        return {name: store.path for name, store in self.stages.items()}

    def rows(self, stage: str) -> list[dict[str, Any]]:
        return self.stages[stage].read_rows()


def _load_device(trainer_kwargs: dict[str, Any]) -> str:
    accelerator = str(trainer_kwargs.get("accelerator") or "auto").lower()
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def resolve_personas(config: BootstrapConfig) -> list[Context]:
    """The selected contexts; unknown names and empty selections fail here, before anything is written."""
    library = ContextLibrary.from_config(config.context_files)
    if isinstance(config.personas, (list, tuple)) and not config.personas:
        raise ValueError(
            f"bootstrap.personas is empty; give names from: {', '.join(library.names)}, or 'all'"
        )
    return library.select(config.personas)


def judge_references(config: BootstrapConfig, personas: list[Context]) -> dict[str, str]:
    """The document of each reference context, as the judge sees it (``judge_sees_reference``)."""
    if not config.judge_sees_reference:
        return {}
    return {c.name: c.text(config.persona_length) for c in personas if c.kind == "reference"}


def stage_settings(
    config: BootstrapConfig, backbone: BackboneConfig, personas: list[Context]
) -> dict[str, dict[str, Any]]:
    """The settings that affect each stage (the stage hash covers these plus the upstream hashes). A reasoning
    model's thinking enters the stages it generates in (none for a model that does not think)."""
    model = asdict(backbone)
    judge = config.judge.identity(config.verdict_rule) if config.judge is not None else model
    thinks = config.thinking_key(model_thinking(backbone))
    judge_thinks = {}
    if "self" in config.verifier and not (config.judge is not None and config.judge.is_endpoint):
        judge_thinks = config.thinking_key(
            model_thinking(config.judge.backbone() if config.judge else backbone)
        )
    texts = {c.name: c.text(config.persona_length) for c in personas}
    show_texts = config.query_prompt == "persona_text"
    references = judge_references(config, personas)
    settings = {
        "queries": {
            "model": model,
            # a reference context's query prompt shows its text (personas keep their old hash)
            "personas": [
                [c.name, c.description, c.expertise]
                + ([] if c.kind == "persona" else [c.kind, c.text("long")])
                for c in personas
            ],
            "queries_per_persona": config.queries_per_persona,
            "query_temperature": config.query_temperature,
            "query_max_new_tokens": config.query_max_new_tokens,
            "min_query_chars": config.min_query_chars,
            "query_stop_at_newline": config.query_stop_at_newline,
            # 2: a token that carries text before its line break (Qwen's "?\n") keeps that text
            "line_break_rule": 2,
            "seed": config.seed,
            "prompt_version": PROMPT_VERSION,
            **config.sampling_filters(),
            **thinks,
            **({"query_prompt": config.query_prompt, "persona_texts": texts} if show_texts else {}),
            **(
                {
                    "query_prompt": "examples",
                    "query_examples": config.query_examples,
                    "example_queries": {c.name: list(c.example_queries) for c in personas},
                }
                if config.query_prompt == "examples"
                else {}
            ),
        },
        "answers": {
            "model": model,
            "persona_texts": texts,
            "placement": config.placement,
            "answer_temperature": config.answer_temperature,
            "answer_max_new_tokens": config.answer_max_new_tokens,
            "seed": config.seed,
            **config.sampling_filters(),
            # one answer per query (the default) keeps the hashes from before the key existed
            **({"answer_samples": config.answer_samples} if config.answer_samples > 1 else {}),
            **thinks,
        },
        "verdicts": {
            "judge": judge,
            "judge_max_new_tokens": config.judge_max_new_tokens,
            "prompt_version": PROMPT_VERSION,
            "verdict_rule": config.verdict_rule,
            # only runs with reference contexts show the judge a document (other hashes stay as they were)
            **({"judge_references": references} if references else {}),
            **config.verifier_key(),
            **judge_thinks,
        },
        "teacher": {
            "model": model,
            "persona_texts": texts,
            "placement": config.placement,
            "teacher_top_k": config.teacher_top_k,
            "max_response_tokens": config.max_response_tokens,
        },
    }
    backend = config.generation.identity()  # None for hf: its hashes stay as they were
    if backend is not None:
        for stage in settings.values():
            stage["generation"] = backend
    return settings


def stage_stores(
    config: BootstrapConfig,
    backbone: BackboneConfig,
    run_dir: str | Path,
    personas: list[Context] | None = None,
) -> dict[str, StageStore]:
    personas = personas if personas is not None else resolve_personas(config)
    settings = stage_settings(config, backbone, personas)
    root = run_paths.bootstrap_dir(run_dir)
    q = StageStore(root, "queries", settings["queries"])
    a = StageStore(root, "answers", settings["answers"], [q])
    v = StageStore(root, "verdicts", settings["verdicts"], [a])
    t = StageStore(root, "teacher", settings["teacher"], [v])
    return {"queries": q, "answers": a, "verdicts": v, "teacher": t}


def _judge_key(store: StageStore) -> str:
    """Hash of the verdict stage without its rule: the same judgments serve both rules."""
    settings = {k: v for k, v in store.settings.items() if k != "verdict_rule"}
    return stage_hash("judgments", settings, list(store.upstream.values()))


def _reusable_judgments(store: StageStore) -> list[dict[str, Any]] | None:
    """Rows of an intact verdicts stage with the same judge and the same answers, another rule."""
    key = _judge_key(store)
    lineage = store.upstream_lineage()
    pattern = f"{run_paths.stage_dir_glob('verdicts')}/{run_paths.STAGE_META}"
    for meta_path in sorted(store.path.parent.glob(pattern)):
        other = meta_path.parent
        if other == store.path or not (other / run_paths.STAGE_DONE).exists():
            continue
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            continue
        if meta.get("stats", {}).get("judge_key") != key or meta.get("upstream_rows_sha256") != lineage:
            continue
        problem = finished_dir_problem(other, meta)
        if problem is None:
            return read_written_jsonl(other / run_paths.STAGE_ROWS)
        log.info("not reusing the judgments in %s: %s", other, problem)
    return None


def _rank0_check(store: StageStore) -> StageCheck:
    """Rank 0's :meth:`StageStore.check`, on every rank: all ranks must take the same branch."""
    check = store.check() if global_rank() == 0 or not dist_ready() else None
    if dist_ready():
        box = [check]
        torch.distributed.broadcast_object_list(box, src=0)
        check = box[0]
    return check


def run_bootstrap(
    config: BootstrapConfig,
    backbone_config: BackboneConfig,
    run_dir: str | Path,
    trainer_kwargs: dict[str, Any] | None = None,
    *,
    keep_engines: bool = False,
) -> BootstrapResult:
    """Bring every bootstrap stage under ``run_dir`` to done and return where they are + the summary.

    A second call with the same settings loads no model and creates no Trainer. ``trainer_kwargs``
    go to the predict Trainers (``devices``, ``accelerator``, ``strategy``, ``callbacks`` ...).
    ``config.generation.backend`` picks the engine (hf: this package's decode loop under those
    Trainers; vllm: one vLLM engine, stopped at the end unless ``keep_engines``).
    """
    start_all = time.perf_counter()
    trainer_kwargs = dict(trainer_kwargs or {})
    run_dir = Path(run_dir)
    personas = resolve_personas(config)
    by_name = {c.name: c for c in personas}
    stores = stage_stores(config, backbone_config, run_dir, personas)
    tasks = StageTasks(config, backbone_config, _load_device(trainer_kwargs), keep_engines=keep_engines)
    trainer_kwargs = tasks.trainer_kwargs(trainer_kwargs)
    if "self" in config.verifier and not _rank0_check(stores["verdicts"]).done:
        tasks.check_judge()  # an endpoint judge answers (and gives log-probs if the rule needs them)
    timings: dict[str, dict[str, Any]] = {}
    problems: dict[str, str] = {}

    def reuse(name: str) -> bool:
        """True when stage ``name`` is finished and intact. A stage that cannot be trusted is deleted
        (rank 0) with every stage after it, so that a kill during its recomputation cannot leave the
        later stages behind as if they were still valid."""
        store = stores[name]
        check = _rank0_check(store)
        if check.done:
            if check.legacy:  # finished by a version that recorded no hashes: record them now
                if global_rank() == 0:
                    store.record_legacy_hashes()
                    log.info("%s: recorded content hashes in %s", name, store.meta_path)
                barrier()
            return True
        if check.problem is None:
            return False
        later = [stores[s] for s in STAGES[STAGES.index(name) + 1 :] if stores[s].path.exists()]
        if global_rank() == 0:
            after = " and the stages after it" if later else ""
            log.warning(
                "bootstrap stage %s (%s) cannot be reused: %s; recomputing it%s",
                name, store.path, check.problem, after,
            )  # fmt: skip
            for other in reversed(later):
                log.warning(
                    "bootstrap stage %s (%s) comes after %s, which is recomputed; deleting it",
                    other.stage, other.path, name,
                )  # fmt: skip
                other.remove()
            store.remove()
        problems[name] = check.problem
        barrier()
        return False

    def run(name: str, jobs_fn, task_fn, finalize, batch_size: int, token_keys=()):
        store = stores[name]
        t0 = time.perf_counter()
        if reuse(name):
            timings[name] = {"cached": True, "seconds": 0.0}
            return store.meta()
        return compute(name, jobs_fn, task_fn, finalize, batch_size, token_keys, t0)

    def compute(name: str, jobs_fn, task_fn, finalize, batch_size: int, token_keys, t0: float):
        store = stores[name]
        jobs = jobs_fn()
        meta = run_stage(
            store,
            jobs,
            task_fn,
            finalize,
            batch_size=batch_size,
            trainer_kwargs=trainer_kwargs,
            token_keys=token_keys,
        )
        timings[name] = {"cached": False, "seconds": round(time.perf_counter() - t0, 3)}
        return meta

    by_examples = config.query_prompt == "examples"
    shown_examples = [q for c in personas for q in c.example_queries] if by_examples else []
    try:
        # 1. queries
        run(
            "queries",
            lambda: queries_mod.query_jobs(
                tasks.formatter(),
                personas,
                config.queries_per_persona,
                config.persona_length if config.query_prompt == "persona_text" else None,
                examples=(config.seed, config.query_examples) if config.query_prompt == "examples" else None,
            ),
            tasks.queries,
            lambda rows: queries_mod.finalize_queries(
                rows, config.min_query_chars, list(by_name), known=shown_examples
            ),
            tasks.batch_size,
            ("tokens", "thinking_tokens"),
        )
        # 2. answers
        run(
            "answers",
            lambda: answers_mod.answer_jobs(
                tasks.formatter(),
                stores["queries"].read_rows(),
                by_name,
                config.persona_length,
                config.placement,
            ),
            tasks.answers,
            answers_mod.finalize_answers,
            tasks.batch_size,
            (
                "base_tokens",
                "persona_tokens",
                "base_thinking_tokens",
                "persona_thinking_tokens",
                "persona_sample_tokens",
            ),
        )
        # 3. verdicts (judgments are reused across rules)
        vstore = stores["verdicts"]
        judge_key = _judge_key(vstore)

        verifiers = config.verifier
        programs = (
            {c.name: config.verifier_programs[c.name] for c in personas} if "program" in verifiers else {}
        )

        def finalize_verdicts(rows):
            if "self" in verifiers:
                rows, stats = verdicts_mod.finalize_verdicts(rows, config.verdict_rule)
            else:
                stats = {"pairs": len(rows), "rule": "program"}
            if verifiers != ["self"]:
                texts = {c.name: c.text(config.persona_length) for c in personas}
                judged = verdicts_mod.program_verdicts(stores["answers"].read_rows(), programs, texts)
                rows = [{**r, **judged.get(r["id"], {})} for r in rows]
                rows, verifier_stats = verdicts_mod.decide_by_verifiers(rows, verifiers, config.verdict_rule)
                stats.update(verifier_stats)
                split = stats.setdefault("split", {})
                if "program" in verifiers:
                    split["program"] = stats.pop("program_split")
            stats["judge_key"] = judge_key
            return rows, stats

        t0 = time.perf_counter()
        cached = reuse("verdicts")
        reused = None if cached else _reusable_judgments(vstore)
        unjudged = not cached and reused is None and "self" not in verifiers
        if unjudged:  # programs only: no model judges, the pairs are labelled in place
            reused = [
                {"id": a["id"], "persona": a["persona"], "query": a["query"]}
                for a in stores["answers"].read_rows()
            ]
        if cached:
            timings["verdicts"] = {"cached": True, "seconds": 0.0}
        elif reused is not None:  # same judgments, another rule: relabel instead of re-judging
            if global_rank() == 0:
                vstore.begin()
                rows, stats = finalize_verdicts(reused)
                vstore.finish(
                    rows,
                    {
                        "seconds": 0.0,
                        "jobs": len(rows),
                        "computed_rows": 0,
                        "resumed_rows": 0,
                        "tokens_generated": 0,
                        "tokens_per_second": 0.0,
                        "stats": stats,
                        "reused_judgments": not unjudged,
                    },
                )
            barrier()
            timings["verdicts"] = {
                "cached": False,
                "reused": not unjudged,
                "seconds": round(time.perf_counter() - t0, 3),
            }
        else:
            compute(
                "verdicts",
                lambda: verdicts_mod.verdict_jobs(
                    tasks.judge_formatter(), stores["answers"].read_rows(), judge_references(config, personas)
                ),
                tasks.verdicts,
                finalize_verdicts,
                tasks.batch_size,
                ("judge_tokens",),
                t0,
            )

        # 4. teacher targets for the distill rows
        def teacher_jobs():
            verdicts = stores["verdicts"].read_rows()
            answers = {r["id"]: r for r in stores["answers"].read_rows()}
            distill = [r for r in verdicts if r["gate_target"] == 1]
            return teacher_mod.teacher_jobs(
                tasks.formatter(), distill, answers, by_name, config.persona_length, config.placement
            )

        run(
            "teacher",
            teacher_jobs,
            tasks.teacher,
            teacher_mod.finalize_teacher,
            tasks.batch_size,
        )
    finally:
        loaded = list(tasks.loaded)
        tasks.close()

    for name, problem in problems.items():
        timings[name]["recomputed_because"] = problem
    summary = build_summary(config, stores, timings, time.perf_counter() - start_all, loaded, run_dir)
    summary_path = run_paths.bootstrap_summary(run_dir)
    if global_rank() == 0:
        atomic_write_json(summary_path, summary)
    for message in summary["warnings"]:
        log.warning(message)
    return BootstrapResult(run_dir, stores, summary, summary_path, personas)
