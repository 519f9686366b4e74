"""The bootstrap stages on a vLLM engine: the same jobs in, the same rows out as the hf tasks in
:mod:`prism_lightning.bootstrap` (queries, answers, verdicts, teacher), so the stage machinery (shards,
resume, hashes, finalize) and training cannot tell which backend made a row.

Each task is a parameter-free :class:`StageTask` that forwards its batch of jobs to the process's
engine (:func:`~prism_lightning.engines.vllm_core.get_engine`); vLLM batches and schedules the
requests itself. What differs from hf, and why it does not change the rows' meaning:

* per-row seeds go in as ``SamplingParams.seed`` (a row does not depend on its batch, as with hf; the
  two backends' random streams differ, so sampled rows differ between backends, greedy ones match up
  to kernel rounding);
* the query line-break rule: tokens with only whitespace before a line break stop the row (hf: the same
  stop ids); a token with text before its break (Qwen's ``"?\\n"``) stops it through vLLM's ``"\\n"``
  stop string, the token is kept and :func:`~prism_lightning.bootstrap.queries.first_line` cuts the
  text, exactly the hf rule's result;
* verdict option scores come from ``logprob_token_ids`` at the first generated position of the
  free-text verdict's own request (hf: the same prefill's log-softmax);
* teacher values are top-k log-probabilities from ``prompt_logprobs`` (hf: raw logits; the difference
  is one constant per token, which the distillation loss's renormalised softmax removes).
"""

from __future__ import annotations

import torch

from prism_lightning.bootstrap.answers import answer_rows
from prism_lightning.bootstrap.queries import line_break_token_ids, query_rows
from prism_lightning.bootstrap.stage import StageTask
from prism_lightning.bootstrap.teacher import (
    end_of_turn_id,
    prompt_token_ids,
    response_token_ids,
    teacher_row,
)
from prism_lightning.bootstrap.verdicts import ORDERS, label_row, option_token_ids, parse_verdict
from prism_lightning.engines.vllm_core import VLLMCore
from prism_lightning.generation import SamplingConfig, row_seed

__all__ = ["VLLMAnswerTask", "VLLMQueryTask", "VLLMTeacherTask", "VLLMVerdictTask"]


class _VLLMTask(StageTask):
    def __init__(self, engine: VLLMCore) -> None:
        super().__init__()
        self.engine = engine
        self.tokenizer = engine.tokenizer


class VLLMQueryTask(_VLLMTask):
    """Stage 1 (queries), rows as :class:`~prism_lightning.bootstrap.queries.QueryTask` writes them."""

    def __init__(self, engine: VLLMCore, sampling: SamplingConfig, seed: int, stop_at_newline: bool = True):
        super().__init__(engine)
        self.sampling, self.seed, self.stop_at_newline = sampling, seed, stop_at_newline
        self.stop_ids = None
        if stop_at_newline:
            leading, _merged = line_break_token_ids(engine.tokenizer)
            self.stop_ids = list(dict.fromkeys(engine.stop_ids + leading))

    def process(self, jobs):
        seeds = [row_seed(self.seed, f"queries:{job['id']}") for job in jobs]
        gens = self.engine.generate(
            [j["prompt"] for j in jobs],
            self.sampling,
            seeds=seeds,
            stop_ids=self.stop_ids,
            stop_strings=["\n"] if self.stop_at_newline else None,
        )
        return query_rows(jobs, gens, self.tokenizer, self.stop_at_newline)


class VLLMAnswerTask(_VLLMTask):
    """Stage 2 (base and persona answers), rows as :class:`~prism_lightning.bootstrap.answers.AnswerTask`."""

    def __init__(self, engine: VLLMCore, sampling: SamplingConfig, seed: int) -> None:
        super().__init__(engine)
        self.sampling, self.seed = sampling, seed

    def process(self, jobs):
        prompts = [j["base_prompt"] for j in jobs] + [j["persona_prompt"] for j in jobs]
        seeds = [row_seed(self.seed, f"answers:{j['id']}:base") for j in jobs] + [
            row_seed(self.seed, f"answers:{j['id']}:persona") for j in jobs
        ]
        gens = self.engine.generate(prompts, self.sampling, seeds=seeds)
        return answer_rows(jobs, gens[: len(jobs)], gens[len(jobs) :])


class VLLMVerdictTask(_VLLMTask):
    """Stage 3 (both judge orders: free text and option log-probabilities), rows as
    :class:`~prism_lightning.bootstrap.verdicts.VerdictTask`."""

    def __init__(self, engine: VLLMCore, max_new_tokens: int, rule: str) -> None:
        super().__init__(engine)
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
        self.option_ids = option_token_ids(engine.tokenizer)
        self.rule = rule

    def process(self, jobs):
        prompts = [j["order_persona_first"] for j in jobs] + [j["order_base_first"] for j in jobs]
        flat = [t for toks in self.option_ids.values() for t in toks]
        gens = self.engine.generate(prompts, self.sampling, score_ids=flat)
        rows, n = [], len(jobs)
        for i, job in enumerate(jobs):
            orders = {}
            for k, order in enumerate(ORDERS):
                gen = gens[i + k * n]
                scores = dict(zip(flat, gen.first_log_probs.tolist(), strict=True))
                orders[order] = {
                    "raw": gen.text,
                    "parsed": parse_verdict(gen.text),
                    "logprobs": {
                        opt: float(torch.logsumexp(torch.tensor([scores[t] for t in toks]), dim=0))
                        for opt, toks in self.option_ids.items()
                    },
                    "tokens": len(gen.token_ids),
                }
            rows.append(label_row(job, orders, self.rule))
        return rows


class VLLMTeacherTask(_VLLMTask):
    """Stage 5's teacher targets: rows and tensors as
    :class:`~prism_lightning.bootstrap.teacher.TeacherTask` writes them."""

    def __init__(self, engine: VLLMCore, top_k: int, max_response_tokens: int) -> None:
        super().__init__(engine)
        self.top_k, self.max_response_tokens = top_k, max_response_tokens
        self.eot = end_of_turn_id(engine.tokenizer)

    def process(self, jobs):
        pairs = [
            (
                prompt_token_ids(self.tokenizer, job["prompt"]),
                response_token_ids(self.tokenizer, job["response"], self.max_response_tokens, self.eot),
            )
            for job in jobs
        ]
        k = min(self.top_k, len(self.tokenizer))
        tops = self.engine.prompt_topk(pairs, k)
        rows = []
        for job, (prompt_ids, response_ids), (values, indices) in zip(jobs, pairs, tops, strict=True):
            rows.append(teacher_row(job, prompt_ids, response_ids, values, indices))
        return rows


class VLLMStageTasks:
    """The bootstrap runner's task factory for the vllm backend: chat formatters without loading any
    weights into this process, and the four tasks on the base model's engine (a distinct judge gets
    its own engine). Engines start on first use; :meth:`close` stops them unless ``keep_engines``."""

    def __init__(self, config, backbone, keep_engines: bool = False) -> None:
        self.config, self.backbone, self.keep_engines = config, backbone, keep_engines
        self.generation = config.generation
        self.loaded: list[str] = []
        self._text: dict[str, tuple] = {}

    @property
    def batch_size(self) -> int:
        """Rows per predict batch: enough for vLLM's continuous batching to fill ``max_num_seqs``."""
        return max(self.config.batch_size, self.generation.max_num_seqs)

    def trainer_kwargs(self, trainer_kwargs: dict) -> dict:
        """One plain CPU process drives the engine (vLLM places the model on its own devices)."""
        return {**trainer_kwargs, "accelerator": "cpu", "devices": 1, "strategy": "auto", "num_nodes": 1}

    def _judge_config(self):
        judge = self.config.judge
        return self.backbone if judge is None or judge == self.backbone else judge

    def _formatter(self, backbone):
        from prism_lightning.engines.vllm_core import text_side

        if backbone.model not in self._text:
            self._text[backbone.model] = text_side(backbone)
        return self._text[backbone.model][1]

    def formatter(self):
        return self._formatter(self.backbone)

    def judge_formatter(self):
        return self._formatter(self._judge_config())

    def _engine(self, backbone) -> VLLMCore:
        from prism_lightning.engines.vllm_core import get_engine

        engine = get_engine(self.generation, backbone)
        name = f"{backbone.model} (vLLM, {engine.start_seconds:.1f} s)"
        if name not in self.loaded:
            self.loaded.append(name)
        return engine

    def queries(self):
        c = self.config
        return VLLMQueryTask(self._engine(self.backbone), c.query_sampling(), c.seed, c.query_stop_at_newline)

    def answers(self):
        c = self.config
        return VLLMAnswerTask(self._engine(self.backbone), c.answer_sampling(), c.seed)

    def verdicts(self):
        c = self.config
        return VLLMVerdictTask(self._engine(self._judge_config()), c.judge_max_new_tokens, c.verdict_rule)

    def teacher(self):
        c = self.config
        return VLLMTeacherTask(self._engine(self.backbone), c.teacher_top_k, c.max_response_tokens)

    def close(self) -> None:
        if not self.keep_engines:
            from prism_lightning.engines.vllm_core import shutdown_engines

            shutdown_engines()
