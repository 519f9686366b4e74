"""The runner's task factory: opens the engines the stages run on, once per run and only when a stage
has work, and builds the four stage tasks on them (queries, answers, teacher: the base model; verdicts:
the judge, which is the base model unless ``bootstrap.judge`` names another local model or an
OpenAI-compatible endpoint, :class:`~prism_lightning.engines.endpoint.EndpointEngine`).

The engine is picked by ``bootstrap.generation.backend``: ``hf`` (this package's decode loop, under the
predict Trainers' devices) or ``vllm`` (one vLLM engine per model, driven from one plain CPU process;
chat formatters come from the tokenizer alone, so a stage with nothing to do loads no weights).
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch

from prism_lightning.backbone import BackboneConfig
from prism_lightning.bootstrap.answers import AnswerTask
from prism_lightning.bootstrap.config import BootstrapConfig
from prism_lightning.bootstrap.queries import QueryTask
from prism_lightning.bootstrap.teacher import TeacherTask
from prism_lightning.bootstrap.verdicts import VerdictTask
from prism_lightning.engines import open_engine
from prism_lightning.engines.base import Engine

__all__ = ["StageTasks"]


class StageTasks:
    """The engines of one bootstrap run (base, judge) and the stage tasks on them. ``device``: where the
    hf engine loads its models. :meth:`close` frees them (vLLM: stops its engines unless
    ``keep_engines``)."""

    def __init__(
        self,
        config: BootstrapConfig,
        backbone: BackboneConfig,
        device: str = "cpu",
        keep_engines: bool = False,
    ) -> None:
        self.config, self.backbone, self.device, self.keep_engines = config, backbone, device, keep_engines
        self.generation = config.generation
        self.on_vllm = self.generation.backend == "vllm"
        self.loaded: list[str] = []
        self._engines: dict[str, Engine] = {}
        self._formatters: dict[str, Any] = {}

    # -- what the runner asks ----------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Rows per predict batch; on vLLM enough to fill its continuous batching (``max_num_seqs``)."""
        if self.on_vllm:
            return max(self.config.batch_size, self.generation.max_num_seqs)
        return self.config.batch_size

    def trainer_kwargs(self, trainer_kwargs: dict[str, Any]) -> dict[str, Any]:
        """vLLM: one plain CPU process drives the engine (vLLM places the model on its own devices)."""
        if not self.on_vllm:
            return trainer_kwargs
        return {**trainer_kwargs, "accelerator": "cpu", "devices": 1, "strategy": "auto", "num_nodes": 1}

    def formatter(self):
        return self._formatter(self.backbone, self.base)

    def judge_formatter(self):
        judge = self.config.judge
        if judge is not None and judge.is_endpoint:
            return self._endpoint().formatter
        return self._formatter(self.judge_config, self.judge)

    # -- engines -----------------------------------------------------------------------------------
    @property
    def judge_config(self) -> BackboneConfig:
        """The local model that judges (the base model unless ``bootstrap.judge`` names another)."""
        judge = self.config.judge
        if judge is None or judge.is_endpoint or judge.backbone() == self.backbone:
            return self.backbone
        return judge.backbone()

    def base(self) -> Engine:
        return self._open(self.backbone, timed=True)

    def judge(self) -> Engine:
        judge = self.config.judge
        if judge is not None and judge.is_endpoint:
            return self._endpoint()
        if self.judge_config is self.backbone:
            return self.base()
        return self._open(self.judge_config, timed=False)

    def check_judge(self) -> None:
        """Before any stage runs: an endpoint judge answers one small request, and returns
        log-probabilities when the logprob rule needs them (else one clear error, before long work)."""
        judge = self.config.judge
        if judge is not None and judge.is_endpoint:
            self._endpoint().probe(logprobs=self.config.verdict_rule == "logprob")

    def _endpoint(self) -> Engine:
        from prism_lightning.engines.endpoint import EndpointEngine

        judge = self.config.judge
        if "endpoint" not in self._engines:
            self._engines["endpoint"] = EndpointEngine(
                judge.base_url, judge.model, api_key=judge.api_key(), timeout=judge.timeout,
                concurrency=judge.concurrency,
            )  # fmt: skip
            self.loaded.append(f"{judge.model} at {judge.base_url} (endpoint)")
        return self._engines["endpoint"]

    def _open(self, backbone: BackboneConfig, timed: bool) -> Engine:
        if backbone.model not in self._engines:
            start = time.perf_counter()
            engine = open_engine(backbone, self.generation, device=self.device)
            if self.on_vllm:
                self.loaded.append(f"{backbone.model} (vLLM, {engine.engine.start_seconds:.1f} s)")
            else:
                self.loaded.append(
                    f"{backbone.model} ({time.perf_counter() - start:.1f} s)" if timed else backbone.model
                )
            self._engines[backbone.model] = engine
        return self._engines[backbone.model]

    def _formatter(self, backbone: BackboneConfig, engine):
        """The engine's chat formatter; on vLLM read from the tokenizer without starting the engine."""
        if not self.on_vllm:
            return engine().formatter
        if backbone.model not in self._formatters:
            from prism_lightning.engines.vllm_core import text_side

            self._formatters[backbone.model] = text_side(backbone)[1]
        return self._formatters[backbone.model]

    # -- the stage tasks ---------------------------------------------------------------------------
    def queries(self) -> QueryTask:
        c = self.config
        return QueryTask(
            self.base(), c.query_sampling(), c.seed, c.query_stop_at_newline, c.thinking_max_new_tokens
        )

    def answers(self) -> AnswerTask:
        c = self.config
        return AnswerTask(
            self.base(), c.answer_sampling(), c.seed, c.thinking_max_new_tokens, c.answer_samples
        )

    def verdicts(self) -> VerdictTask:
        c = self.config
        return VerdictTask(self.judge(), c.judge_max_new_tokens, c.verdict_rule, c.thinking_max_new_tokens)

    def teacher(self) -> TeacherTask:
        c = self.config
        return TeacherTask(self.base(), c.teacher_top_k, c.max_response_tokens)

    def close(self) -> None:
        self._engines.clear()
        if self.on_vllm and not self.keep_engines:
            from prism_lightning.engines.vllm_core import shutdown_engines

            shutdown_engines()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
