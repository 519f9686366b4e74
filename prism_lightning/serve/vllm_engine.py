"""The `vllm` engine: vLLM's own engine and scheduler (continuous batching, paged KV cache), with the
PRISM adapter as a LoRA module that each request carries or not.

vLLM cannot stop a forward after layer k to ask the gate, so each request is routed before it enters
the engine: the ``vllm`` engine's :meth:`~prism_lightning.engines.vllm.VLLMEngine.request_routes` runs
the prefix gate (embeddings + layers <= k of the base model) on the request's first user turn (the
paper's rule) and the routing rule decides which ``LoRARequest`` (if any) the request carries (K-way:
one per adapter). The worker thread routes new requests, admits them in arrival order, steps the engine
(``LLMEngine.step``, which returns each request's new tokens), streams them and aborts the requests
whose client left or whose stop string matched.

On vLLM's CPU build a request without an adapter that shares an engine step with adapter requests runs
the last adapter (see ``VLLMCore._run``), so there the engine holds one group at a time: requests with
an adapter, or requests without one. A request of the other group waits (and those behind it with it)
until the running ones end. On a GPU every request is admitted at once.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from prism_lightning.engines.base import RowRoute
from prism_lightning.engines.text_stream import TextStream
from prism_lightning.serve.engine import Event, Job, ServeEngine
from prism_lightning.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)


@dataclass
class _Routed:
    """A routed request not yet in the engine."""

    job: Job
    lora: object  # its LoRARequest, or None: the base model
    params: object  # its SamplingParams


class VLLMServeEngine(ServeEngine):
    """A routed checkpoint on a vLLM engine (started once, in this process on CPU)."""

    name = "vllm"

    def __init__(
        self,
        checkpoint: str | Path,
        *,
        threshold: float | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 32,
        metrics: ServeMetrics | None = None,
    ) -> None:
        from prism_lightning.engines import GenerationConfig
        from prism_lightning.engines.vllm import VLLMEngine
        from prism_lightning.engines.vllm_core import vllm_device

        config = GenerationConfig(
            backend="vllm", max_model_len=max_model_len or 4096, max_num_seqs=max_num_seqs
        )
        self.routing = VLLMEngine.from_checkpoint(checkpoint, config, gate_device=vllm_device())
        if threshold is not None:
            self.routing.prefix_gate.threshold = float(threshold)
        self.vllm = self.routing.engine
        context = int(self.vllm.llm.llm_engine.model_config.max_model_len)
        super().__init__(self.vllm.tokenizer, self.vllm.formatter, context_len=context, metrics=metrics)
        self.adapter_names = list(self.routing.adapter_names)
        self._stop_ids = set(self.vllm.stop_ids)
        self._counter = 0
        # CPU build: requests with and without an adapter must not share a step (module docstring)
        self.one_group_at_a_time = vllm_device() == "cpu"
        self._running_base = False  # the group in the engine (when one_group_at_a_time)

    def shutdown(self) -> None:
        from prism_lightning.engines.vllm_core import shutdown_engines

        shutdown_engines()

    # -- worker ---------------------------------------------------------------------------------------
    def _work(self) -> None:
        engine = self.vllm.llm.llm_engine
        active: dict[str, tuple[Job, TextStream]] = {}
        waiting: deque[_Routed] = deque()  # routed, not yet admitted (the other group runs)
        stopping = False
        while active or waiting or not stopping:
            new: list[Job] = []
            try:
                while True:  # block only when nothing runs or waits
                    job = self._queue.get(block=not active and not waiting and not stopping and not new)
                    if job is None:
                        stopping = True
                    else:
                        new.append(job)
            except queue.Empty:
                pass
            fresh = [j for j in new if not j.cancelled]
            try:
                waiting.extend(self._route(fresh))
                fresh = []
                for routed in [w for w in waiting if w.job.cancelled]:
                    waiting.remove(routed)
                    self.metrics.cancelled.inc()
                    routed.job.emit(Event("done", finish_reason="cancelled"))
                for rid, (job, _) in list(active.items()):
                    if job.cancelled:
                        engine.abort_request([rid])
                        del active[rid]
                        self.metrics.cancelled.inc()
                        job.emit(Event("done", finish_reason="cancelled"))
                self._admit(engine, waiting, active)
                self.metrics.waiting.set(self._queue.qsize() + len(waiting))
                self.metrics.running.set(len(active))
                if active:
                    self._step(engine, active)
            except Exception as err:  # one failed step must not take the server down
                log.exception("vLLM step failed")
                for rid in active:
                    engine.abort_request([rid])
                failed = [job for job, _ in active.values()] + [w.job for w in waiting] + fresh
                for job in failed:
                    job.emit(Event("error", text=f"generation failed: {type(err).__name__}: {err}"))
                active.clear()
                waiting.clear()
        self.metrics.running.set(0)

    def _route(self, jobs: list[Job]) -> list[_Routed]:
        """Route the new requests (one layers-<=k pass over their first user turns)."""
        if not jobs:
            return []
        from vllm.sampling_params import RequestOutputKind

        from prism_lightning.engines.vllm_core import sampling_params

        self.metrics.batch_size.observe(len(jobs))
        loras, routes, probs, adapters = self.routing.request_routes(
            [job.row.first_turn_ids or job.row.prompt_ids for job in jobs],
            "gated",
            [job.row.route for job in jobs],
        )
        out = []
        for job, lora, route, prob, adapter in zip(
            jobs, loras or [None] * len(jobs), routes, probs, adapters, strict=True
        ):
            job.emit(Event("route", route=RowRoute(route, prob, adapter)))
            params = sampling_params(
                job.row.sampling,
                seed=job.row.seed,
                stop_token_ids=sorted(self._stop_ids),
                output_kind=RequestOutputKind.DELTA,
            )
            out.append(_Routed(job, lora, params))
        return out

    def _admit(self, engine, waiting: deque[_Routed], active: dict[str, tuple[Job, TextStream]]) -> None:
        """Add the waiting requests to the engine in arrival order, up to the first one of the group that
        is not running (``one_group_at_a_time``); it goes in when the engine is empty."""
        from vllm.inputs import TokensPrompt

        now = time.perf_counter()
        while waiting:
            head = waiting[0]
            base = head.lora is None
            if self.one_group_at_a_time and active and base != self._running_base:
                return
            waiting.popleft()
            self._running_base = base
            self.metrics.queue_wait.observe(now - head.job.arrived)
            self._counter += 1
            rid = f"prism-{self._counter}"
            prompt = TokensPrompt(prompt_token_ids=head.job.row.prompt_ids)
            engine.add_request(rid, prompt, head.params, lora_request=head.lora)
            active[rid] = (head.job, TextStream(self.tokenizer, head.job.stop))

    def _step(self, engine, active: dict[str, tuple[Job, TextStream]]) -> None:
        now = time.perf_counter()
        for out in engine.step():
            entry = active.get(out.request_id)
            if entry is None:
                continue
            job, stream = entry
            completion = out.outputs[0]
            for token in completion.token_ids:
                if token in self._stop_ids:
                    continue
                if job.first_token_at is None:
                    job.first_token_at = now
                    self.metrics.ttft.observe(now - job.arrived)
                delta = stream.add(int(token))
                if delta:
                    job.emit(Event("delta", text=delta))
            if stream.stopped and not out.finished:
                engine.abort_request([out.request_id])
                del active[out.request_id]
                self._finish(job, stream, "stop")
            elif out.finished:
                del active[out.request_id]
                reason = "stop" if stream.stopped or completion.finish_reason == "stop" else "length"
                self._finish(job, stream, reason)
