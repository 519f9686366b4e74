"""The server's front door, for a server on a network: the API key, the request-body size limit and the
bound on requests in flight. They run before any route reads or parses a request, so a client without
the key, or with a body too large, costs the server almost nothing."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prism_lightning.serve.protocol import APIError

if TYPE_CHECKING:  # the CLI imports this module before it checks that prometheus_client is installed
    from prism_lightning.serve.metrics import ServeMetrics

OPEN_PATHS = frozenset({"/health"})  # a load balancer's probe needs no key
CHAT_PATH = "/v1/chat/completions"
DEFAULT_MAX_BODY_BYTES = 1 << 20
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServeLimits:
    """What the app enforces per request. ``api_key`` None: no authentication; ``max_in_flight`` None:
    no admission bound; ``request_timeout_s`` None: no deadline."""

    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_in_flight: int | None = None
    request_timeout_s: float | None = None


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class Guard:
    """ASGI middleware: checks the bearer key (in constant time, on equal-length digests, so neither the
    key's content nor its length leaks through timing), then reads the body up to ``max_body_bytes``,
    refusing early on a larger ``Content-Length`` and as soon as a chunked body passes the limit, and
    hands the app the buffered body."""

    def __init__(self, app: Any, *, limits: ServeLimits, metrics: ServeMetrics) -> None:
        self.app, self.limits, self.metrics = app, limits, metrics
        self._key = None if limits.api_key is None else _digest(limits.api_key.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self._key is not None and scope["path"] not in OPEN_PATHS:
            refusal = self._check_key(headers.get(b"authorization"))
            if refusal is not None:
                await self._refuse(scope, send, refusal, "unauthorized", {"www-authenticate": "Bearer"})
                return
        limit = self.limits.max_body_bytes
        too_large = APIError(
            f"The request body is larger than this server's limit of {limit} bytes.",
            status=413,
            code="request_too_large",
        )
        declared = headers.get(b"content-length", b"").strip()
        if declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, send, too_large, "body_too_large", {"connection": "close"})
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # a chunked (or lying) body: stop reading here
                await self._refuse(scope, send, too_large, "body_too_large", {"connection": "close"})
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: the disconnect a streaming answer listens for

        await self.app(scope, replay, send)

    def _check_key(self, header: bytes | None) -> APIError | None:
        scheme, _, token = (header or b"").partition(b" ")
        if header is None or scheme.lower() != b"bearer" or not token.strip():
            return APIError(
                "No API key was sent; send it as `Authorization: Bearer YOUR_KEY`.", status=401, code=None
            )
        if not hmac.compare_digest(_digest(token.strip()), self._key):
            return APIError("Incorrect API key provided.", status=401, code="invalid_api_key")
        return None

    async def _refuse(
        self, scope: dict, send: Any, err: APIError, reason: str, headers: dict[str, str]
    ) -> None:
        self.metrics.refused.labels(reason=reason).inc()
        if scope["path"] == CHAT_PATH:
            self.metrics.requests.labels(status=str(err.status)).inc()
        body = json.dumps(err.body()).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": err.status, "headers": raw})
        await send({"type": "http.response.body", "body": body, "more_body": False})


class Admission:
    """Counts chat requests from admission to their last byte and refuses more than ``limit`` at once.
    The engine's own queue is unbounded; bounding requests in flight here bounds it too (at most
    ``limit`` minus the running batch wait). One event loop touches the count, so it needs no lock."""

    def __init__(self, limit: int | None, metrics: ServeMetrics) -> None:
        self.limit, self.metrics, self.count = limit, metrics, 0

    def enter(self) -> bool:
        if self.limit is not None and self.count >= self.limit:
            self.metrics.refused.labels(reason="queue_full").inc()
            return False
        self.count += 1
        self.metrics.in_flight.set(self.count)
        return True

    def leave(self) -> None:
        self.count -= 1
        self.metrics.in_flight.set(self.count)

    def full_error(self) -> APIError:
        return APIError(
            f"The server is busy ({self.limit} requests in flight); retry after {RETRY_AFTER_S} s.",
            status=429,
            type="rate_limit_error",
            code="queue_full",
        )
