"""The ``endpoint`` engine: an OpenAI-compatible server (``/v1/chat/completions``: vLLM's, a hosted API,
this package's own ``serve``) behind the :class:`~prism_lightning.engines.base.Engine` protocol, so a
stage written once (the bootstrap's judge) runs on it unchanged.

Prompts are chat messages, built by :class:`MessagesFormatter` (the endpoint applies its own chat
template). Generation is one chat completion per row (``temperature``, ``top_p``, ``max_tokens``, a
sampled row's ``seed`` cut to 31 bits to fit any server's integer field, ``"\\n"`` as stop string for
``stop_at_newline``). Option scores come from a second request per row with ``logprobs: true,
top_logprobs: N, max_tokens: 1``: each option's log-probability is the logsumexp over the returned first
tokens that spell it; an option outside the top N gets the N-th log-probability (an upper bound).
Servers that refuse ``logprobs`` (this package's ``serve``) fail :meth:`EndpointEngine.probe` with one
clear error. Requests run ``concurrency`` at a time; a refused key, an unreachable server, a timeout or
an error status is an :class:`EndpointError` (one ``error:`` line, exit 2).

Only the standard library talks HTTP here (``urllib``). The API key is read from the environment
variable the caller names and is kept in memory only.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prism_lightning.chat_format import PLACEMENTS, conversation_messages
from prism_lightning.engines.base import Engine, EngineOutput
from prism_lightning.errors import ConfigError, PrismError
from prism_lightning.generation import SamplingConfig

__all__ = ["EndpointEngine", "EndpointError", "MessagesFormatter"]

#: Most servers cap ``top_logprobs`` at 20 (OpenAI's limit).
TOP_LOGPROBS = 20


class EndpointError(PrismError):
    """The endpoint could not be used (unreachable, key refused, timed out, an unexpected answer)."""


class MessagesFormatter:
    """The chat formatter of an endpoint: the same conversations as
    :class:`~prism_lightning.chat_format.ChatFormatter`, as a list of messages (the server renders them)."""

    supports_system = True

    def messages(
        self,
        turns: str | Sequence[str],
        context: str | None = None,
        placement: str = "system",
        replies: Sequence[str] = (),
    ) -> list[dict[str, str]]:
        if placement not in PLACEMENTS:
            raise ValueError(f"Unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}.")
        return conversation_messages(turns, context, placement if context else "none", replies)

    def prompt(
        self,
        turns: str | Sequence[str],
        context: str | None = None,
        placement: str = "system",
        replies: Sequence[str] = (),
        reply_start: str = "",
    ) -> list[dict[str, str]]:
        """The messages; ``reply_start`` (a local model's primer for its reply) is not sent: a chat API
        writes the whole assistant turn."""
        return self.messages(turns, context, placement, replies)


class EndpointEngine(Engine):
    """The protocol over HTTP (see the module docstring). No adapter, no routing: mode ``off`` only."""

    backend = "endpoint"
    free_option_scores = False  # scores cost a second request per row: asked for only when needed

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        concurrency: int = 8,
    ) -> None:
        super().__init__(None, None, MessagesFormatter(), name=f"{model} at {base_url}")
        self.base_url = base_url.rstrip("/")
        self.endpoint_model = model
        self._api_key = api_key
        self.timeout = float(timeout)
        self.concurrency = max(1, int(concurrency))

    @property
    def has_adapter(self) -> bool:
        return False

    def primed(self, prompt, text: str):
        """Messages are not primed: the server writes the whole assistant turn (as ``MessagesFormatter``)."""
        return prompt

    @property
    def is_kway(self) -> bool:
        return False

    # -- HTTP --------------------------------------------------------------------------------------
    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base_url}/chat/completions"
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            detail = _error_message(err)
            if err.code in (401, 403):
                raise EndpointError(
                    f"the judge endpoint {self.base_url} refused the request (HTTP {err.code}: {detail}); "
                    "check the API key in the environment variable named by bootstrap.judge.api_key_env."
                ) from None
            raise _HTTPStatusError(err.code, detail, f"the judge endpoint {self.base_url} answered HTTP "
                                   f"{err.code}: {detail}") from None  # fmt: skip
        except TimeoutError:
            raise EndpointError(
                f"the judge endpoint {self.base_url} did not answer within {self.timeout:g} s "
                "(bootstrap.judge.timeout)."
            ) from None
        except (urllib.error.URLError, ConnectionError) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, TimeoutError):
                raise EndpointError(
                    f"the judge endpoint {self.base_url} did not answer within {self.timeout:g} s "
                    "(bootstrap.judge.timeout)."
                ) from None
            raise EndpointError(f"cannot reach the judge endpoint {self.base_url}: {reason}.") from None
        except ValueError as err:  # not JSON
            raise EndpointError(
                f"the judge endpoint {self.base_url} answered something other than JSON: {err}"
            ) from None

    def _completion(self, messages, sampling: SamplingConfig, seed: int | None, stop_at_newline: bool):
        body: dict[str, Any] = {
            "model": self.endpoint_model,
            "messages": messages,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
        }
        if sampling.top_p != 1.0:
            body["top_p"] = sampling.top_p
        if seed is not None and not sampling.greedy:
            body["seed"] = int(seed) & 0x7FFFFFFF
        if stop_at_newline:
            body["stop"] = ["\n"]
        answer = self._post(body)
        try:
            choice = answer["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise EndpointError(
                f"the judge endpoint {self.base_url} answered without a choice: {answer!r:.300}"
            ) from None
        if stop_at_newline:
            text = text.split("\n", 1)[0]
        tokens = int((answer.get("usage") or {}).get("completion_tokens") or 0)
        finish = "stop" if choice.get("finish_reason") == "stop" else "length"
        return EngineOutput(text.strip(), finish_reason=finish, tokens=tokens)

    def _first_token_logprobs(self, messages) -> dict[str, float]:
        """{token text: log-probability} of the reply's first position (the top ``TOP_LOGPROBS``)."""
        body = {
            "model": self.endpoint_model,
            "messages": messages,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": TOP_LOGPROBS,
        }
        answer = self._post(body)
        try:
            first = answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            return {entry["token"]: float(entry["logprob"]) for entry in first}
        except (KeyError, IndexError, TypeError):
            raise EndpointError(
                f"the judge endpoint {self.base_url} returned no log-probabilities; set "
                "bootstrap.verdict_rule: strict to judge by the free-text verdicts."
            ) from None

    def probe(self, logprobs: bool) -> None:
        """One small request before any long work: the server answers, takes the key, serves the model,
        and (``logprobs``) returns log-probabilities."""
        messages = [{"role": "user", "content": "Reply with the letter A."}]
        if not logprobs:
            self._completion(messages, SamplingConfig(max_new_tokens=1), None, False)
            return
        try:
            self._first_token_logprobs(messages)
        except _HTTPStatusError as err:
            raise EndpointError(
                f"the judge endpoint {self.base_url} does not return log-probabilities (HTTP {err.code}: "
                f"{err.detail}); set bootstrap.verdict_rule: strict to judge by the free-text verdicts."
            ) from None

    # -- the protocol ------------------------------------------------------------------------------
    def _generate(
        self, prompts, sampling, mode, seeds, route, batch_size, stop_at_newline, score_options
    ) -> list[EngineOutput]:
        if route is not None:
            raise ConfigError("an endpoint runs no adapter: it takes no forced routes.")
        n = len(prompts)
        rows = [sampling] * n if isinstance(sampling, SamplingConfig) else list(sampling)
        unsupported = {"top_k": 0, "repetition_penalty": 1.0}
        for cfg in rows:
            for key, off in unsupported.items():
                if getattr(cfg, key) != off:
                    raise ConfigError(f"an OpenAI-compatible endpoint takes no {key}; leave it off.")

        def one(i: int) -> EngineOutput:
            seed = seeds[i] if seeds is not None else None
            out = self._completion(prompts[i], rows[i], seed, stop_at_newline)
            if score_options:
                out.option_scores = option_scores_from_tokens(
                    self._first_token_logprobs(prompts[i]), score_options
                )
            return out

        with ThreadPoolExecutor(max_workers=min(self.concurrency, n)) as pool:
            return list(pool.map(one, range(n)))

    def _option_logprobs(self, prompts, options, mode, batch_size, route):
        raise ConfigError(
            "option_logprobs over an endpoint is not supported; use generate(score_options=...)."
        )

    def _prompt_topk(self, sequences, k):
        raise ConfigError(
            "an endpoint returns no prompt log-probabilities (teacher targets need a local model)."
        )


class _HTTPStatusError(EndpointError):
    def __init__(self, code: int, detail: str, message: str) -> None:
        super().__init__(message)
        self.code, self.detail = code, detail


def _error_message(err: urllib.error.HTTPError) -> str:
    """The server's own message from an OpenAI-style error body, else the HTTP reason."""
    try:
        body = json.loads(err.read().decode("utf-8"))
        return str(body.get("error", {}).get("message") or body)
    except (ValueError, AttributeError, OSError):
        return str(err.reason)


def option_scores_from_tokens(
    top: Mapping[str, float], options: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """Each option's log-probability from a first position's top tokens: logsumexp over the tokens that
    spell it (a token equal to a spelling, or to the start of one, ignoring surrounding spaces and case,
    e.g. "T" for "TIE"); a token that starts spellings of two options counts for neither. An option no
    token spells gets the least returned log-probability (it is at most that)."""
    floor = min(top.values()) if top else -math.inf
    owners: dict[str, set[str]] = {}
    for token in top:
        text = token.strip().upper()
        if not text:
            continue
        for opt, spellings in options.items():
            if any(s.strip().upper().startswith(text) for s in spellings):
                owners.setdefault(token, set()).add(opt)
    out = {}
    for opt in options:
        values = [lp for tok, lp in top.items() if owners.get(tok) == {opt}]
        if not values:
            out[opt] = floor
            continue
        peak = max(values)
        out[opt] = peak + math.log(sum(math.exp(v - peak) for v in values))
    return out
