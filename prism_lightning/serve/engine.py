"""The engines behind the server. ``ServeEngine`` renders and checks prompts and queues requests for one
worker thread; ``HFServeEngine`` is the project's own routed generation behind a batch scheduler.

``continuous`` (the default) schedules as vLLM does: a request that arrives while others decode joins
the running batch at the next step (its own prefill settles its route; its KV cache rows are appended),
and a row that ends leaves at once, freeing its slot (up to ``max_batch_size`` rows run). ``static``
is the older policy, kept to measure against: the worker takes the first waiting request, collects what
else arrives within a short window and runs that batch to its end before taking the next.

Either way the batch window applies when the worker is idle (the first request waits that long for
company), every new token is decoded and pushed to its request's asyncio queue, so answers stream token
by token, and a request whose client went away is ended at the next step instead of decoding to its
limit.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from prism_lightning.engines.hf_stream import RoutedBatchRunner, RoutedRunningBatch, RowRoute, RowSpec
from prism_lightning.engines.text_stream import TextStream
from prism_lightning.generation import SamplingConfig
from prism_lightning.serve.metrics import ServeMetrics
from prism_lightning.serve.protocol import APIError, ChatRequest

log = logging.getLogger(__name__)

SCHEDULERS = ("continuous", "static")


@dataclass
class Event:
    """What a request hears from the engine: "route", then "delta"s, then "done" (or "error")."""

    kind: str
    text: str = ""
    route: RowRoute | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class Job:
    row: RowSpec
    stop: list[str]
    mode: str
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # set by the request's side when its client is gone
    done: bool = False
    first_token_at: float | None = None

    def emit(self, event: Event) -> None:
        if event.kind in ("done", "error"):
            self.done = True
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


Running = dict[int, tuple[Job, TextStream]]  # the continuous scheduler's rows: key -> (job, its text)


class ServeEngine:
    """What the app needs of an engine: prompt rendering and limits, a request queue drained by one
    worker thread, and the engine's metrics. Subclasses implement ``_work``."""

    name = "engine"

    def __init__(
        self, tokenizer, formatter, *, context_len: int, metrics: ServeMetrics | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.formatter = formatter
        self.context_len = context_len
        self.metrics = metrics or ServeMetrics()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.adapter_names: list[str] = []  # K-way: the adapters a request may name (NAME:<adapter>)

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name=f"prism-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Let the running requests finish, then end the worker."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self.shutdown()

    def shutdown(self) -> None:
        """Release what the engine holds beyond the worker (nothing for hf)."""

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- requests -------------------------------------------------------------------------------------
    def prepare(self, request: ChatRequest, default_max_tokens: int) -> RowSpec:
        """The request as an engine row: its prompt rendered and measured against the context."""
        formatter = self.formatter
        prompt = formatter.prompt(request.user_turns, request.system, "system", request.replies)
        ids = self._encode(prompt)
        room = self.context_len - len(ids)
        if room < 1:
            raise APIError(
                f"The prompt is {len(ids)} tokens; this model's context is {self.context_len} tokens "
                "and the answer needs at least one more.",
                param="messages",
                code="context_length_exceeded",
            )
        if request.max_tokens is not None and request.max_tokens > room:
            raise APIError(
                f"This model's context is {self.context_len} tokens, but you asked for "
                f"{len(ids) + request.max_tokens} ({len(ids)} in the messages, {request.max_tokens} in the "
                "completion). Lower max_tokens or shorten the messages.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        max_tokens = request.max_tokens if request.max_tokens is not None else min(default_max_tokens, room)
        sampling = SamplingConfig(max_tokens, temperature=request.temperature, top_p=request.top_p)
        seed = request.seed if request.seed is not None else (0 if sampling.greedy else secrets.randbits(62))
        single_turn = request.system is None and len(request.user_turns) == 1
        first = None if single_turn else self._encode(formatter.prompt(request.user_turns[0]))
        return RowSpec(ids, sampling, seed=seed, route=request.route, first_turn_ids=first)

    def submit(self, row: RowSpec, stop: Sequence[str], mode: str) -> Job:
        """Queue a row (from the event loop); its events arrive on ``job.events``."""
        if not self.alive:
            raise APIError("The server is shutting down.", status=503, type="server_error")
        job = Job(row, list(stop), mode, asyncio.get_running_loop())
        self._queue.put(job)
        self.metrics.waiting.set(self._queue.qsize())
        return job

    def _encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def _work(self) -> None:
        raise NotImplementedError

    def _finish(self, job: Job, stream: TextStream, reason: str) -> None:
        if job.done:
            return
        tail = stream.finish()
        if tail:
            job.emit(Event("delta", text=tail))
        tokens = len(stream.token_ids)
        self.metrics.completion_tokens.inc(tokens)
        job.emit(Event("done", finish_reason=reason, completion_tokens=tokens))


class HFServeEngine(ServeEngine):
    """Continuous (or static) batching over a ``RoutedModel`` on one worker thread."""

    name = "hf"

    def __init__(
        self,
        routed,
        *,
        max_batch_size: int = 32,
        batch_window_s: float = 0.02,
        max_model_len: int | None = None,
        scheduler: str = "continuous",
        metrics: ServeMetrics | None = None,
    ) -> None:
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}.")
        native = int(getattr(routed.model.config, "max_position_embeddings", 0) or 1 << 30)
        context = min(native, max_model_len) if max_model_len else native
        super().__init__(routed.tokenizer, routed.formatter, context_len=context, metrics=metrics)
        self.routed = routed
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.scheduler = scheduler
        self._runner = RoutedBatchRunner(routed)
        self.adapter_names = self._runner.adapter_names

    # -- worker ---------------------------------------------------------------------------------------
    def _work(self) -> None:
        if self.scheduler == "continuous":
            self._work_continuous()
        else:
            self._work_static()

    def _collect(self, room: int, idle: bool) -> tuple[list[Job], bool]:
        """Up to ``room`` waiting jobs and whether the stop sign came. ``idle``: block for the first job,
        then wait ``batch_window_s`` for others; otherwise take only what is already waiting."""
        jobs: list[Job] = []
        stopping = False
        if idle:
            first = self._queue.get()
            if first is None:
                return jobs, True
            jobs.append(first)
        deadline = time.perf_counter() + self.batch_window_s
        while len(jobs) < room:
            try:
                if idle:
                    job = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                else:
                    job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                stopping = True
                break
            jobs.append(job)
        self.metrics.waiting.set(self._queue.qsize())
        live = []
        for job in jobs:
            if job.cancelled:
                self.metrics.cancelled.inc()
                job.emit(Event("done", finish_reason="cancelled"))
            else:
                live.append(job)
        return live, stopping

    def _work_static(self) -> None:
        stopping = False
        while not stopping:
            jobs, stopping = self._collect(self.max_batch_size, idle=True)
            if jobs:
                self._run(jobs)

    def _work_continuous(self) -> None:
        batch = RoutedRunningBatch(self._runner)
        running: Running = {}
        keys = itertools.count()
        stopping = False
        while running or not stopping:
            if not stopping and batch.can_admit and len(running) < self.max_batch_size:
                jobs, stopping = self._collect(self.max_batch_size - len(running), idle=not running)
                if jobs:
                    self._admit(batch, running, [(next(keys), job) for job in jobs])
            if running:
                self._step(batch, running)
            self.metrics.running.set(len(running))

    def _admit(self, batch: RoutedRunningBatch, running: Running, new: list[tuple[int, Job]]) -> None:
        """Prefill the newcomers into the running batch; they hear their routes, then first tokens."""
        m = self.metrics
        started = time.perf_counter()
        m.batch_size.observe(len(new))
        for key, job in new:
            m.queue_wait.observe(started - job.arrived)
            running[key] = (job, TextStream(self.tokenizer, job.stop))

        def on_route(routes: list[RowRoute]) -> None:
            for (_, job), route in zip(new, routes, strict=True):
                job.emit(Event("route", route=route))

        try:
            tokens, finished = batch.admit([k for k, _ in new], [job.row for _, job in new], on_route)
        except Exception as err:  # one failed prefill must not take the server down
            self._fail(batch, running, err)
            return
        self._deliver(batch, running, tokens, finished)

    def _step(self, batch: RoutedRunningBatch, running: Running) -> None:
        try:
            tokens, finished = batch.step()
        except Exception as err:
            self._fail(batch, running, err)
            return
        self._deliver(batch, running, tokens, finished)

    def _deliver(self, batch: RoutedRunningBatch, running: Running, tokens: dict, finished: dict) -> None:
        """Stream a step's tokens; end the rows that finished, matched a stop string or lost their client."""
        now = time.perf_counter()
        ended = [
            key
            for key, token in tokens.items()
            if self._stream_token(*running[key], token, now, engine_finished=key in finished)
        ]
        for key, reason in finished.items():
            job, stream = running.pop(key)
            self._finish(job, stream, "stop" if stream.stopped else reason)
        if ended:
            batch.drop(ended)
            for key in ended:
                del running[key]

    def _stream_token(
        self, job: Job, stream: TextStream, token: int, now: float, *, engine_finished: bool
    ) -> bool:
        """Send a request its new token (both schedulers). True when the request ends here although the
        engine would go on (a stop string matched, or its client went away); a row the engine finished
        is ended by the caller with the engine's reason."""
        if job.first_token_at is None:
            job.first_token_at = now
            self.metrics.ttft.observe(now - job.arrived)
        delta = stream.add(token)
        if delta:
            job.emit(Event("delta", text=delta))
        if engine_finished:
            return False
        if stream.stopped:
            self._finish(job, stream, "stop")
            return True
        if job.cancelled:
            self.metrics.cancelled.inc()
            job.emit(Event("done", finish_reason="cancelled"))
            return True
        return False

    def _fail(self, batch: RoutedRunningBatch, running: Running, err: Exception) -> None:
        log.exception("A step of %d running requests failed", len(running))
        for job, _ in running.values():
            if not job.done:
                job.emit(Event("error", text=f"generation failed: {type(err).__name__}: {err}"))
        running.clear()
        batch.reset()

    def _run(self, jobs: list[Job]) -> None:
        started = time.perf_counter()
        m = self.metrics
        m.batch_size.observe(len(jobs))
        m.running.set(len(jobs))
        for job in jobs:
            m.queue_wait.observe(started - job.arrived)
        streams = [TextStream(self.tokenizer, job.stop) for job in jobs]

        def on_route(routes: list[RowRoute]) -> None:
            for job, route in zip(jobs, routes, strict=True):
                job.emit(Event("route", route=route))

        def on_step(new_tokens: dict[int, int], finished: dict[int, str]) -> list[int]:
            now = time.perf_counter()
            ended = [
                i
                for i, token in new_tokens.items()
                if self._stream_token(jobs[i], streams[i], token, now, engine_finished=i in finished)
            ]
            for i, reason in finished.items():
                self._finish(jobs[i], streams[i], "stop" if streams[i].stopped else reason)
            return ended

        try:
            outs, _ = self._runner.run([job.row for job in jobs], on_route=on_route, on_step=on_step)
            for job, stream, out in zip(jobs, streams, outs, strict=True):
                if not job.done:  # e.g. a row that ended on a stop token before any step reported it
                    self._finish(job, stream, out.finish_reason)
        except Exception as err:  # one failed batch must not take the server down
            log.exception("Batch of %d requests failed", len(jobs))
            for job in jobs:
                if not job.done:
                    job.emit(Event("error", text=f"generation failed: {type(err).__name__}: {err}"))
        finally:
            m.running.set(0)
