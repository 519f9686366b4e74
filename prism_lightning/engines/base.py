"""The engine protocol: what evaluation, studies, the bootstrap's stages and (next) ``serve`` ask of a model,
whichever engine runs it. Two local implementations: :class:`~prism_lightning.engines.hf.HFEngine` (this
package's decode loop, routing decided inside the prefill) and
:class:`~prism_lightning.engines.vllm.VLLMEngine` (vLLM; the prefix gate routes each request before it
enters the engine). Both take the same arguments and return the same rows, so a scorer written once runs
on either. :class:`~prism_lightning.engines.endpoint.EndpointEngine` puts an OpenAI-compatible server
behind the generating part of it (a bootstrap judge).

What the bootstrap's stages need is part of it: per-row seeds, stopping at the first line break
(queries), the verdict options' log-probabilities at the first generated position of the same request
(the judge), the top-k of the prompt's own positions over a response (teacher targets), and one reply
streamed as text deltas with its route known before the first of them (``chat``: the hf engine runs it
on :mod:`~prism_lightning.engines.hf_stream`, vLLM steps one request through its ``LLMEngine``). ``serve``
keeps its own schedulers over many requests (continuous batching), on the same streaming parts.

``mode`` says how a PRISM checkpoint's adapter runs: ``off`` (the untouched base model), ``on``,
``gated`` (the gate decides per row) or ``gated_k`` (``gated`` on a K-way checkpoint: none or one of its
adapters per row). Routes follow :mod:`prism_lightning.model.route_rule`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from prism_lightning.chat_format import ThinkingFormat, split_reply
from prism_lightning.errors import ConfigError
from prism_lightning.generation import Sampling, SamplingConfig, row_seed
from prism_lightning.model.route_rule import RouteSpec

__all__ = [
    "MODES",
    "Engine",
    "EngineOutput",
    "OptionLogprobs",
    "RowRoute",
    "first_token_ids",
    "option_scores",
]

MODES: tuple[str, ...] = ("off", "on", "gated", "gated_k")


@dataclass
class EngineOutput:
    text: str
    route: bool | None = None
    gate_prob: float | None = None
    finish_reason: str = "length"
    adapter: str | None = None  # K-way: the adapter the row ran with (None: the base model)
    token_ids: list[int] = field(default_factory=list)  # generated ids, the stopping token excluded
    tokens: int = 0  # generated tokens (an endpoint reports the count without the ids)
    option_scores: dict[str, float] | None = None  # ``score_options``: log-prob of each as first token
    # a reasoning model asked to think first (``think_tokens``): its reasoning, the tokens of the thinking
    # pass, and whether the model closed the block itself (False: the budget ran out, it was closed for it)
    thinking: str | None = None
    thinking_tokens: int = 0
    thinking_closed: bool | None = None


@dataclass
class RowRoute:
    """A row's route as soon as it is decided (before its first token): what a stream reports first."""

    route: bool  # an adapter runs
    gate_prob: float  # P(an adapter runs)
    adapter: str | None = None  # K-way: the adapter that runs (None: the base model)


class OptionLogprobs(NamedTuple):
    """What :meth:`Engine.option_logprobs` returns, one entry per row."""

    scores: torch.Tensor  # (n, n_options) log-probabilities
    routes: list[bool | None]  # adapter on/off (None: no adapter to route)
    probs: list[float | None]  # the gate's P(an adapter), where the gate decided
    adapters: list[str | None]  # K-way: the adapter the row ran with (None: the base model)


def first_token_ids(tokenizer, options: Mapping[str, Sequence[str]]) -> dict[str, list[int]]:
    """The first token of each spelling of each option (deduplicated); a first token two options share
    is dropped, since it cannot tell them apart."""
    ids: dict[str, list[int]] = {}
    for option, variants in options.items():
        firsts = []
        for variant in variants:
            toks = tokenizer(variant, add_special_tokens=False)["input_ids"]
            if toks:
                firsts.append(int(toks[0]))
        ids[option] = list(dict.fromkeys(firsts))
    counts: dict[int, int] = {}
    for toks in ids.values():
        for t in toks:
            counts[t] = counts.get(t, 0) + 1
    shared = {t for t, c in counts.items() if c > 1}
    out = {opt: [t for t in toks if t not in shared] for opt, toks in ids.items()}
    empty = [opt for opt, toks in out.items() if not toks]
    if empty:
        raise ValueError(f"the tokenizer cannot tell options {empty} apart by their first token")
    return out


def option_scores(
    logprobs: torch.Tensor, option_ids: Mapping[str, Sequence[int]], columns: Sequence[int] | None = None
) -> dict[str, float]:
    """Each option's log-probability: logsumexp of ``logprobs`` over the option's token ids;
    ``logprobs`` is indexed by token id, or holds one value per token of ``columns``."""
    where = {int(t): j for j, t in enumerate(columns)} if columns is not None else None
    out = {}
    for opt, toks in option_ids.items():
        index = [where[t] for t in toks] if where is not None else list(toks)
        out[opt] = float(torch.logsumexp(logprobs[index].float(), dim=0))
    return out


class Engine:
    """A model (plain, or a PRISM checkpoint) behind the protocol. Subclasses implement
    :meth:`_generate`, :meth:`_option_logprobs` and :meth:`_prompt_topk`, and say whether they hold an
    adapter."""

    backend = "engine"
    #: The options' first-token scores come from the prefill that starts the row, at no extra cost (an
    #: endpoint needs a second request per row, so a caller asks for them only when it needs them).
    free_option_scores = True

    def __init__(self, model, tokenizer, formatter, *, name: str = "model") -> None:
        self.model = model  # the judge-size rule counts its parameters (vLLM: a meta-device copy)
        self.tokenizer = tokenizer
        self.formatter = formatter
        self.name = name
        self._token_cache: dict[str, list[int]] = {}

    @property
    def has_adapter(self) -> bool:
        raise NotImplementedError

    @property
    def is_kway(self) -> bool:
        raise NotImplementedError

    def check_mode(self, mode: str) -> str:
        """The mode to run (``gated_k`` runs as ``gated`` on a K-way checkpoint)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        if mode != "off" and not self.has_adapter:
            raise ValueError(f"mode {mode!r} needs a PRISM checkpoint (--checkpoint)")
        if mode == "gated_k":
            if not self.is_kway:
                raise ConfigError(
                    "condition prism_k needs a K-way checkpoint (fit with model.adapters); this one has one "
                    "adapter: use prism."
                )
            return "gated"
        return mode

    # -- the protocol ------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str],
        sampling: Sampling,
        *,
        mode: str = "off",
        seeds: Sequence[int] | None = None,
        route: Sequence[RouteSpec] | None = None,
        batch_size: int = 8,
        stop_at_newline: bool = False,
        score_options: Mapping[str, Sequence[str]] | None = None,
        think_tokens: int | None = None,
        reply_start: str | Sequence[str] = "",
    ) -> list[EngineOutput]:
        """Generate for chat-formatted prompts (one sampling config, or one per row). ``seeds``: one per
        row, so a row does not depend on its batch. ``route`` forces per-row routes (multi-turn: the
        first turn's route holds; K-way: an adapter's name) while the gate's probability is still
        recorded. ``batch_size`` bounds the hf engine's batches; vLLM schedules its own.

        ``stop_at_newline``: a row ends at its first line break (:mod:`~prism_lightning.engines.line_break`;
        ``token_ids`` may end with a token that holds the break after other text, so cut the decoded ids
        at the first break). ``score_options`` (option name -> spellings): each row's
        ``option_scores`` holds each option's log-probability as the first generated token, from the
        request that starts the row (:func:`first_token_ids` picks the tokens), e.g. a judge's verdict.

        ``think_tokens``: a reasoning model (:attr:`thinking`) first thinks, sampled as its reply, for at most
        that many tokens; the block is closed (for the model when the budget runs out) and the reply is
        generated after it, so ``text`` is the answer alone, the options are scored after the block, and the
        row's ``thinking*`` fields say what came before (the route stays the one the thinking pass took).
        Ignored for a model that does not think. ``reply_start``: text the reply is primed with (after the
        thinking block when there is one), e.g. a judge's "Verdict:"; one for every row, or one per row."""
        mode = self.check_mode(mode)
        if not prompts:
            return []
        prompts = list(prompts)
        starts = [reply_start] * len(prompts) if isinstance(reply_start, str) else list(reply_start)
        fmt = self.thinking if think_tokens is not None else None
        if fmt is None:
            prompts = [self.primed(p, s) for p, s in zip(prompts, starts, strict=True)]
            return self._generate(
                prompts, sampling, mode, seeds, route, batch_size, stop_at_newline, score_options
            )
        continued, first = self._thinking_pass(
            prompts, fmt, sampling, think_tokens, mode, seeds, route, batch_size
        )
        if mode == "gated" and route is None:  # the decision of the thinking pass holds for the reply
            route = [(o.adapter or False) if self.is_kway else bool(o.route) for o in first]
        seeds = [row_seed(s, "after-thinking") for s in seeds] if seeds is not None else None
        continued = [self.primed(p, s) for p, s in zip(continued, starts, strict=True)]
        outs = self._generate(
            continued, sampling, mode, seeds, route, batch_size, stop_at_newline, score_options
        )
        for out, thought in zip(outs, first, strict=True):
            out.route, out.gate_prob, out.adapter = thought.route, thought.gate_prob, thought.adapter
            out.thinking, out.thinking_tokens = thought.thinking, thought.thinking_tokens
            out.thinking_closed = thought.thinking_closed
        return outs

    @property
    def thinking(self) -> ThinkingFormat | None:
        """How the replies of this model open a thinking block (its chat template); None: no thinking."""
        return getattr(self.formatter, "thinking", None)

    def primed(self, prompt, text: str):
        """``prompt`` followed by ``text``, the start of the reply (a chat API cannot be primed)."""
        return prompt + text if text else prompt

    def think(
        self, prompts: Sequence[str], think_tokens: int, *, batch_size: int = 8, reply_start: str = ""
    ) -> tuple[list[str], list[EngineOutput] | None]:
        """For a judge that scores options after a prompt: each prompt continued past a greedy thinking block
        of at most ``think_tokens`` (adapter off), then ``reply_start``; and the thinking pass's rows (None
        for a model that does not think, whose prompts are only primed)."""
        fmt = self.thinking
        if fmt is None or not prompts:
            return [self.primed(p, reply_start) for p in prompts], None
        greedy = SamplingConfig(max_new_tokens=think_tokens, temperature=0.0)
        continued, first = self._thinking_pass(
            list(prompts), fmt, greedy, think_tokens, "off", None, None, batch_size
        )
        return [self.primed(p, reply_start) for p in continued], first

    def _thinking_pass(
        self, prompts, fmt: ThinkingFormat, sampling, think_tokens, mode, seeds, route, batch_size
    ) -> tuple[list[str], list[EngineOutput]]:
        """The thinking pass: each row opened inside its block and sampled for at most ``think_tokens``, then
        cut at the end of the block (:func:`~prism_lightning.chat_format.split_reply`); returns the prompts
        continued past the closed block and the pass's rows with their ``thinking*`` fields."""
        rows = [sampling] * len(prompts) if isinstance(sampling, SamplingConfig) else list(sampling)
        budget = [replace(s, max_new_tokens=int(think_tokens)) for s in rows]
        opened = [p + fmt.opener for p in prompts]
        first = self._generate(opened, budget, mode, seeds, route, batch_size, False, None)
        continued = []
        for prompt, out in zip(prompts, first, strict=True):
            reply = split_reply(out.text, opened=True)
            out.thinking, out.thinking_tokens, out.thinking_closed = reply.thinking, out.tokens, reply.closed
            continued.append(prompt + fmt.closing(reply.thinking))
        return continued, first

    def stream(
        self,
        prompt: str,
        sampling: SamplingConfig,
        write: Callable[[str], object],
        *,
        mode: str = "off",
        seed: int | None = None,
        route: RouteSpec = None,
        first_turn: str | None = None,
        on_route: Callable[[RowRoute], object] | None = None,
    ) -> EngineOutput:
        """One reply to a chat-formatted ``prompt``, handed to ``write`` as text deltas while it is decoded
        (``chat``); the deltas join to the returned ``text``, which is what :meth:`generate` returns for the
        same prompt, sampling, seed and route. ``seed`` None: as :meth:`generate` without seeds.

        ``route`` forces the route as in :meth:`generate`. ``first_turn``: the first user turn's own
        prompt when ``prompt`` holds a longer conversation; the gate then decides on it (the paper's rule:
        a conversation keeps its first turn's route), unless the route is forced. ``on_route`` hears the
        route once it is decided, before the first delta. Callbacks rather than an iterator: the decode
        loop pushes each step's token, and turning that into a pull would need a thread around it."""
        return self._stream(prompt, sampling, write, self.check_mode(mode), seed, route, first_turn, on_route)

    def option_logprobs(
        self,
        prompts: Sequence[str],
        options: Sequence[Sequence[str]],
        *,
        mode: str = "off",
        batch_size: int = 16,
        route: Sequence[RouteSpec] | None = None,
    ) -> OptionLogprobs:
        """Log-probability of each option as the next token after each prompt. An option is a list of
        spellings; its score is the logsumexp over those that are one token. ``route`` forces per-row
        routes as in :meth:`generate` (a prompt scored with a route decided on another prompt: MMLU's
        raw format is routed on the chat-formatted question)."""
        if route is not None and len(route) != len(prompts):
            raise ValueError(f"got {len(route)} routes for {len(prompts)} prompts")
        return self._option_logprobs(list(prompts), options, self.check_mode(mode), batch_size, route)

    def prompt_topk(
        self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], k: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each (prompt ids, response ids): the top-k (values fp16 (n, k), indices int32 (n, k)) of
        the base model's (adapter off) distribution predicting each of the n response tokens, from one
        pass over prompt + response (a teacher's targets). The hf engine's values are logits, vLLM's
        log-probabilities: one constant per token apart, which a renormalised softmax removes."""
        if not sequences:
            return []
        return self._prompt_topk([(list(p), list(r)) for p, r in sequences], int(k))

    # -- what an engine implements (``mode`` already checked, ``prompts`` a non-empty list for generate) --
    def _generate(
        self,
        prompts: list[str],
        sampling: Sampling,
        mode: str,
        seeds: Sequence[int] | None,
        route: Sequence[RouteSpec] | None,
        batch_size: int,
        stop_at_newline: bool,
        score_options: Mapping[str, Sequence[str]] | None,
    ) -> list[EngineOutput]:
        raise NotImplementedError

    def _stream(
        self,
        prompt: str,
        sampling: SamplingConfig,
        write: Callable[[str], object],
        mode: str,
        seed: int | None,
        route: RouteSpec,
        first_turn: str | None,
        on_route: Callable[[RowRoute], object] | None,
    ) -> EngineOutput:
        raise ConfigError(f"the {self.backend} engine does not stream replies; use the hf engine")

    def _option_logprobs(
        self,
        prompts: list[str],
        options: Sequence[Sequence[str]],
        mode: str,
        batch_size: int,
        route: Sequence[RouteSpec] | None,
    ) -> OptionLogprobs:
        raise NotImplementedError

    def _prompt_topk(
        self, sequences: list[tuple[list[int], list[int]]], k: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    # -- tokens ------------------------------------------------------------------------------------
    def single_token(self, text: str) -> int | None:
        """The token id of ``text`` if it is exactly one token, else None."""
        if text not in self._token_cache:
            self._token_cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        toks = self._token_cache[text]
        return toks[0] if len(toks) == 1 else None

    def option_ids(self, variants: Sequence[str]) -> list[int]:
        """Token ids of the variants that are a single token (e.g. "A", " A"); duplicates dropped.
        When none is one token (a tiny test vocabulary), the first token of each variant."""
        ids: list[int] = []
        for v in variants:
            tok = self.single_token(v)
            if tok is not None and tok not in ids:
                ids.append(tok)
        if not ids:  # no one-token spelling: score each spelling's first token
            for v in variants:
                toks = self._token_cache.get(v) or []
                if toks and toks[0] not in ids:
                    ids.append(toks[0])
        if not ids:
            raise ValueError(f"none of {list(variants)} can be tokenized")
        return ids
