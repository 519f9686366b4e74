"""The FastAPI application: OpenAI chat completions (plain and SSE), models, health and metrics, behind
the guard (API key, body size) with a bound on requests in flight and an optional per-request deadline."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from prism_lightning.serve.engine import Event, Job, ServeEngine
from prism_lightning.serve.guard import RETRY_AFTER_S, Admission, Guard, ServeLimits
from prism_lightning.serve.protocol import (
    APIError,
    ChatRequest,
    chunk_body,
    completion_body,
    completion_id,
    model_ids,
    parse_chat_request,
    parse_json_body,
    prism_info,
    usage_body,
)

ROUTE_HEADER = "X-PRISM-Route"
GATE_HEADER = "X-PRISM-Gate-Probability"
ADAPTER_HEADER = "X-PRISM-Adapter"  # K-way: the adapter that answered


def create_app(
    engine: ServeEngine,
    served_name: str,
    *,
    default_max_tokens: int = 256,
    limits: ServeLimits | None = None,
) -> FastAPI:
    """An app serving ``engine`` as ``served_name`` (plus ``:on`` / ``:off``); the engine's worker runs
    for the app's lifetime and stops after the last in-flight request (uvicorn's graceful shutdown)."""
    metrics = engine.metrics
    limits = limits or ServeLimits()
    admission = Admission(limits.max_in_flight, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="prism_lightning", lifespan=lifespan)
    app.add_middleware(Guard, limits=limits, metrics=metrics)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        err = APIError(str(exc.detail), status=exc.status_code, code=str(exc.status_code))
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(str(exc)).body(), status_code=400)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        data = [{"id": mid, "object": "model", "created": created, "owned_by": "prism_lightning"}
                for mid in model_ids(served_name, engine.adapter_names)]  # fmt: skip
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def refuse(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.requests.labels(status=str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        if not admission.enter():
            return refuse(admission.full_error(), {"Retry-After": str(RETRY_AFTER_S)})
        timeout = limits.request_timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        handed_off = False
        try:
            response = await answer(request, deadline)
            handed_off = isinstance(response, _Stream)  # the stream leaves when its last byte is sent
            return response
        except asyncio.TimeoutError:
            metrics.refused.labels(reason="timeout").inc()
            return refuse(_timeout_error(timeout))
        finally:
            if not handed_off:
                admission.leave()

    async def answer(request: Request, deadline: float | None) -> Response:
        try:
            try:
                body = parse_json_body(await request.body())
            except APIError as err:
                if err.code == "nesting_too_deep":
                    metrics.refused.labels(reason="nesting_too_deep").inc()
                raise
            chat = parse_chat_request(body, served_name, engine.adapter_names)
            row = engine.prepare(chat, default_max_tokens)
            job = engine.submit(row, chat.stop, chat.mode)
        except APIError as err:
            return refuse(err)
        try:
            return await respond(job, chat, len(row.prompt_ids), deadline)
        except BaseException:
            job.cancelled = True  # timed out, or this handler was cancelled (client gone)
            raise

    async def respond(job: Job, chat: ChatRequest, prompt_tokens: int, deadline: float | None) -> Response:
        metrics.prompt_tokens.inc(prompt_tokens)
        event = await _next(job, deadline)  # the route, known after the prefill's gate layer
        if event.kind == "error":
            return refuse(APIError(event.text, status=500, type="server_error"))
        route = event.route
        metrics.observe_route(chat.mode, route.route, route.gate_prob)
        kway = bool(engine.adapter_names)
        prism = prism_info(chat.mode, route.route, route.gate_prob, route.adapter, kway=kway)
        headers = {ROUTE_HEADER: prism["route"]}
        if route.adapter is not None:
            headers[ADAPTER_HEADER] = route.adapter
        if not math.isnan(route.gate_prob):
            headers[GATE_HEADER] = f"{route.gate_prob:.6f}"
        cid = completion_id()
        if chat.stream:
            stream = _sse(job, chat, cid, prism, prompt_tokens, metrics, deadline, limits.request_timeout_s)

            def close() -> None:
                job.cancelled = True  # also when the client left before the first chunk
                admission.leave()

            return _Stream(stream, close, media_type="text/event-stream", headers=headers)
        try:
            parts = []
            while (event := await _next(job, deadline)).kind == "delta":
                parts.append(event.text)
        finally:
            job.cancelled = True  # ends the row if this handler is cancelled (client gone)
        if event.kind == "error":
            return refuse(APIError(event.text, status=500, type="server_error"))
        usage = usage_body(prompt_tokens, event.completion_tokens)
        metrics.requests.labels(status="200").inc()
        metrics.latency.observe(time.perf_counter() - job.arrived)
        body = completion_body(cid, chat.model, "".join(parts), event.finish_reason, usage, prism)
        return JSONResponse(body, headers=headers)

    return app


class _Stream(StreamingResponse):
    """A streaming answer that calls ``on_close`` once it ends however it ends, even when the client
    left before the first chunk (so the generator never ran and its ``finally`` never will)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _next(job: Job, deadline: float | None) -> Event:
    """The job's next event; ``asyncio.TimeoutError`` once ``deadline`` (monotonic) has passed."""
    if deadline is None:
        return await job.events.get()
    return await asyncio.wait_for(job.events.get(), max(0.0, deadline - time.monotonic()))


def _timeout_error(timeout: float | None) -> APIError:
    return APIError(
        f"The request took longer than this server's request timeout ({timeout:g} s); it was cancelled.",
        status=504,
        type="server_error",
        code="timeout",
    )


def _sse_line(body: dict[str, Any] | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


async def _sse(
    job: Job,
    chat: ChatRequest,
    cid: str,
    prism: dict,
    prompt_tokens: int,
    metrics,
    deadline: float | None,
    timeout: float | None,
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; a client that leaves ends its row in the engine, and
    a stream past its deadline ends with an error event (its status line has been sent already)."""
    try:
        yield _sse_line(chunk_body(cid, chat.model, {"role": "assistant", "content": ""}, prism=prism))
        while True:
            try:
                event: Event = await _next(job, deadline)
            except asyncio.TimeoutError:
                metrics.refused.labels(reason="timeout").inc()
                metrics.requests.labels(status="504").inc()
                yield _sse_line(_timeout_error(timeout).body())
                return
            if event.kind == "delta":
                yield _sse_line(chunk_body(cid, chat.model, {"content": event.text}))
            elif event.kind == "done":
                yield _sse_line(chunk_body(cid, chat.model, {}, event.finish_reason))
                if chat.include_usage:
                    usage = usage_body(prompt_tokens, event.completion_tokens)
                    yield _sse_line(chunk_body(cid, chat.model, {}, usage=usage, choices=False))
                yield _sse_line("[DONE]")
                metrics.requests.labels(status="200").inc()
                metrics.latency.observe(time.perf_counter() - job.arrived)
                return
            else:
                err = APIError(event.text, status=500, type="server_error")
                yield _sse_line(err.body())
                metrics.requests.labels(status="500").inc()
                return
    finally:
        job.cancelled = True
