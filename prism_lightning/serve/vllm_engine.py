"""The `vllm` engine: vLLM's own engine and scheduler (continuous batching, paged KV cache), with the
PRISM adapter as a LoRA module that each request carries or not.

vLLM cannot stop a forward after layer k to ask the gate, so each request is routed before it enters
the engine: the ``vllm`` engine's :meth:`~prism_lightning.engines.vllm.VLLMEngine.request_routes` runs
the prefix gate (embeddings + layers <= k of the base model) on the request's first user turn (the
paper's rule) and the routing rule decides which ``LoRARequest`` (if any) the request carries (K-way:
one per adapter). The worker thread admits new requests, steps the engine
(``LLMEngine.step``, which returns each request's new tokens), streams them and aborts the requests
whose client left or whose stop string matched.
"""

from __future__ import annotations

import logging
import queue
import time
from pathlib import Path

from prism_lightning.engines.base import RowRoute
from prism_lightning.engines.text_stream import TextStream
from prism_lightning.serve.engine import Event, Job, ServeEngine
from prism_lightning.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)


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

    def shutdown(self) -> None:
        from prism_lightning.engines.vllm_core import shutdown_engines

        shutdown_engines()

    # -- worker ---------------------------------------------------------------------------------------
    def _work(self) -> None:
        engine = self.vllm.llm.llm_engine
        active: dict[str, tuple[Job, TextStream]] = {}
        stopping = False
        while active or not stopping:
            new: list[Job] = []
            try:
                while True:  # block only when nothing runs
                    job = self._queue.get(block=not active and not stopping and not new)
                    if job is None:
                        stopping = True
                    else:
                        new.append(job)
            except queue.Empty:
                pass
            self.metrics.waiting.set(self._queue.qsize())
            try:
                self._admit(engine, [j for j in new if not j.cancelled], active)
                for rid, (job, _) in list(active.items()):
                    if job.cancelled:
                        engine.abort_request([rid])
                        del active[rid]
                        self.metrics.cancelled.inc()
                        job.emit(Event("done", finish_reason="cancelled"))
                self.metrics.running.set(len(active))
                if active:
                    self._step(engine, active)
            except Exception as err:  # one failed step must not take the server down
                log.exception("vLLM step failed")
                for rid, (job, _) in list(active.items()):
                    engine.abort_request([rid])
                    job.emit(Event("error", text=f"generation failed: {type(err).__name__}: {err}"))
                active.clear()
        self.metrics.running.set(0)

    def _admit(self, engine, jobs: list[Job], active: dict[str, tuple[Job, TextStream]]) -> None:
        """Route the new requests (one layers-<=k pass over their first user turns) and add them."""
        if not jobs:
            return
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        from prism_lightning.engines.vllm_core import sampling_params

        started = time.perf_counter()
        self.metrics.batch_size.observe(len(jobs))
        loras, routes, probs, adapters = self.routing.request_routes(
            [job.row.first_turn_ids or job.row.prompt_ids for job in jobs],
            "gated",
            [job.row.route for job in jobs],
        )
        for job, lora, route, prob, adapter in zip(jobs, loras, routes, probs, adapters, strict=True):
            self.metrics.queue_wait.observe(started - job.arrived)
            row = job.row
            job.emit(Event("route", route=RowRoute(route, prob, adapter)))
            params = sampling_params(
                row.sampling,
                seed=row.seed,
                stop_token_ids=sorted(self._stop_ids),
                output_kind=RequestOutputKind.DELTA,
            )
            self._counter += 1
            rid = f"prism-{self._counter}"
            engine.add_request(rid, TokensPrompt(prompt_token_ids=row.prompt_ids), params, lora_request=lora)
            active[rid] = (job, TextStream(self.tokenizer, job.stop))

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
