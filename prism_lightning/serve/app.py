"""The FastAPI application: OpenAI chat completions (plain and SSE), models, health and metrics."""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from prism_lightning.serve.engine import Event, Job, ServeEngine
from prism_lightning.serve.protocol import (
    APIError,
    ChatRequest,
    chunk_body,
    completion_body,
    completion_id,
    model_ids,
    parse_chat_request,
    prism_info,
    usage_body,
)

ROUTE_HEADER = "X-PRISM-Route"
GATE_HEADER = "X-PRISM-Gate-Probability"
ADAPTER_HEADER = "X-PRISM-Adapter"  # K-way: the adapter that answered


def create_app(engine: ServeEngine, served_name: str, *, default_max_tokens: int = 256) -> FastAPI:
    """An app serving ``engine`` as ``served_name`` (plus ``:on`` / ``:off``); the engine's worker runs
    for the app's lifetime and stops after the last in-flight request (uvicorn's graceful shutdown)."""
    metrics = engine.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="prism_lightning", lifespan=lifespan)

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

    def refuse(err: APIError) -> JSONResponse:
        metrics.requests.labels(status=str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise APIError(f"The request body is not valid JSON: {exc}.") from None
            chat = parse_chat_request(body, served_name, engine.adapter_names)
            row = engine.prepare(chat, default_max_tokens)
            job = engine.submit(row, chat.stop, chat.mode)
        except APIError as err:
            return refuse(err)
        metrics.prompt_tokens.inc(len(row.prompt_ids))
        event = await job.events.get()  # the route, known after the prefill's gate layer
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
            stream = _sse(job, chat, cid, prism, len(row.prompt_ids), metrics)
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
        try:
            parts = []
            while (event := await job.events.get()).kind == "delta":
                parts.append(event.text)
        finally:
            job.cancelled = True  # ends the row if this handler is cancelled (client gone)
        if event.kind == "error":
            return refuse(APIError(event.text, status=500, type="server_error"))
        usage = usage_body(len(row.prompt_ids), event.completion_tokens)
        metrics.requests.labels(status="200").inc()
        metrics.latency.observe(time.perf_counter() - job.arrived)
        body = completion_body(cid, chat.model, "".join(parts), event.finish_reason, usage, prism)
        return JSONResponse(body, headers=headers)

    return app


def _sse_line(body: dict[str, Any] | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


async def _sse(
    job: Job, chat: ChatRequest, cid: str, prism: dict, prompt_tokens: int, metrics
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; a client that leaves ends its row in the engine."""
    try:
        yield _sse_line(chunk_body(cid, chat.model, {"role": "assistant", "content": ""}, prism=prism))
        while True:
            event: Event = await job.events.get()
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
