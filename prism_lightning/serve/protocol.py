"""The OpenAI chat-completions protocol: request validation and the response / error bodies.

Validation is written out by hand rather than left to FastAPI's pydantic models: OpenAI clients expect
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status, not FastAPI's 422 detail list.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ROUTE_SUFFIXES = {"": None, ":on": True, ":off": False}
MAX_STOP_STRINGS = 4
MAX_JSON_DEPTH = 64  # a chat request nests 4 deep; json.loads recurses once per level
# A JSON string (escapes included) or one bracket: brackets inside strings do not count as nesting.
_STRING_OR_BRACKET = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


class APIError(Exception):
    """A request the server refuses; becomes an OpenAI-shaped error body with ``status``."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A validated chat-completions request (the prompt is not rendered yet)."""

    model: str
    route: bool | str | None  # forced route from the model name (K-way: an adapter); None: the gate decides
    system: str | None
    user_turns: list[str]
    replies: list[str]
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False

    @property
    def mode(self) -> str:
        """gated, on (the adapter, or a named one) or off."""
        return "on" if isinstance(self.route, str) else {None: "gated", True: "on", False: "off"}[self.route]


def model_ids(name: str, adapters: Sequence[str] = ()) -> list[str]:
    """The served model names: NAME (the gate routes), NAME:on, NAME:off, and NAME:<adapter> for each
    adapter of a K-way checkpoint."""
    return [name + suffix for suffix in ROUTE_SUFFIXES] + [f"{name}:{a}" for a in adapters]


def parse_json_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The request body as JSON. The nesting is measured first, by a scan with no recursion, since
    ``json.loads`` recurses once per level and dies of ``RecursionError`` on a deep enough body."""
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(raw):
        bracket = match.group()
        if bracket in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                raise APIError(
                    f"The request body nests arrays and objects more than {max_depth} levels deep.",
                    code="nesting_too_deep",
                )
        elif bracket in (b"]", b"}"):
            depth -= 1
    try:
        return json.loads(raw)
    except ValueError as exc:  # bad JSON, bad UTF-8, an integer of more than 4300 digits
        raise APIError(f"The request body is not valid JSON: {exc}.") from None


def _route_of(model: str, name: str) -> bool | str | None:
    suffix = model[len(name) :]
    return ROUTE_SUFFIXES[suffix] if suffix in ROUTE_SUFFIXES else suffix[1:]


def parse_chat_request(body: Any, served_name: str, adapters: Sequence[str] = ()) -> ChatRequest:
    """Check every field a client may get wrong; raise :class:`APIError` naming the first problem."""
    if not isinstance(body, dict):
        raise APIError("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError("`model` is required and must be a string.", param="model")
    served = model_ids(served_name, adapters)
    if model not in served:
        raise APIError(
            f"The model `{model}` does not exist; this server has {', '.join(served)}.",
            status=404,
            param="model",
            code="model_not_found",
        )
    system, users, replies = _conversation(body.get("messages"))
    n = body.get("n", 1)
    if n is not None and (not _is_int(n) or n != 1):
        raise APIError("Only `n` = 1 is supported.", param="n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise APIError("`logprobs` is not supported by this server.", param="logprobs")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise APIError(f"`max_tokens` must be an integer >= 1, got {max_tokens!r}.", param="max_tokens")
    temperature = _number(body, "temperature", 1.0, low=0.0, high=2.0)
    top_p = _number(body, "top_p", 1.0, low=0.0, high=1.0)
    if top_p == 0:
        raise APIError("`top_p` must be in (0, 1], got 0.", param="top_p")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise APIError(f"`seed` must be an integer, got {seed!r}.", param="seed")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise APIError("`stream` must be a boolean.", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError("`stream_options` must be an object.", param="stream_options")
    return ChatRequest(
        model=model,
        route=_route_of(model, served_name),
        system=system,
        user_turns=users,
        replies=replies,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=None if seed is None else int(seed),
        stop=_stop(body.get("stop")),
        stream=bool(stream),
        include_usage=bool(options.get("include_usage", False)),
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, key: str, default: float, *, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise APIError(f"`{key}` must be a number, got {value!r}.", param=key)
    if not low <= value <= high:
        raise APIError(f"`{key}` must be between {low:g} and {high:g}, got {value!r}.", param=key)
    return float(value)


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError("`stop` must be a non-empty string or a list of non-empty strings.", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(f"`stop` takes at most {MAX_STOP_STRINGS} strings.", param="stop")
    return list(stops)


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
            if not isinstance(text, str):
                raise APIError(f"messages[{i}].content: only text parts are supported.", param="messages")
            texts.append(text)
        return "".join(texts)
    raise APIError(f"messages[{i}].content must be a string or a list of text parts.", param="messages")


def _conversation(messages: Any) -> tuple[str | None, list[str], list[str]]:
    """(system prompt, user turns, assistant replies) from alternating user / assistant messages that
    end with a user turn, after optional system (or developer) messages."""
    if not isinstance(messages, list) or not messages:
        raise APIError("`messages` must be a non-empty list of messages.", param="messages")
    systems: list[str] = []
    users: list[str] = []
    replies: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(f"messages[{i}] must be an object with `role` and `content`.", param="messages")
        role = message.get("role")
        if role in ("system", "developer"):
            if users:
                raise APIError(f"messages[{i}]: system messages must come first.", param="messages")
            systems.append(_content(message, i))
        elif role == "user":
            if len(users) != len(replies):
                raise APIError(f"messages[{i}]: two user turns in a row.", param="messages")
            users.append(_content(message, i))
        elif role == "assistant":
            if len(users) != len(replies) + 1:
                raise APIError(f"messages[{i}]: an assistant turn must follow a user turn.", param="messages")
            replies.append(_content(message, i))
        else:
            raise APIError(
                f"messages[{i}].role must be system, developer, user or assistant, got {role!r}.",
                param="messages",
            )
    if not users or len(users) != len(replies) + 1:
        raise APIError("The conversation must end with a user message.", param="messages")
    if not users[0].strip():
        raise APIError("The first user message is empty.", param="messages")
    return ("\n\n".join(systems) if systems else None), users, replies


# -- response bodies ---------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def prism_info(
    mode: str, route: bool, gate_prob: float, adapter: str | None = None, kway: bool = False
) -> dict[str, Any]:
    """The ``prism`` field of a response; a K-way server also names the adapter (null: the base)."""
    info = {
        "route": "adapter" if route else "base",
        "mode": mode,
        "gate_probability": None if math.isnan(gate_prob) else round(gate_prob, 6),
    }
    if kway:
        info["adapter"] = adapter
    return info


def completion_body(
    cid: str, model: str, text: str, finish_reason: str, usage: dict[str, int], prism: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage,
        "prism": prism,
    }


def chunk_body(
    cid: str,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    *,
    prism: dict[str, Any] | None = None,
    usage: dict[str, int] | None = None,
    choices: bool = True,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        if choices
        else [],
    }
    if prism is not None:
        body["prism"] = prism
    if usage is not None:
        body["usage"] = usage
    return body


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
