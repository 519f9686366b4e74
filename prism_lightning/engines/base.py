"""The engine protocol: what evaluation, studies and (next) the bootstrap and ``serve`` ask of a model,
whichever engine runs it. Two implementations: :class:`~prism_lightning.engines.hf.HFEngine` (this
package's decode loop, routing decided inside the prefill) and
:class:`~prism_lightning.engines.vllm.VLLMEngine` (vLLM; the prefix gate routes each request before it
enters the engine). Both take the same arguments and return the same rows, so a scorer written once runs
on either.

Not in the protocol yet: streaming (the hf engine's :mod:`~prism_lightning.engines.hf_stream`, which
``serve`` and ``chat`` use, and ``serve``'s vLLM step loop) and the teacher's prompt top-k (the
bootstrap's hf task and :meth:`~prism_lightning.engines.vllm_core.VLLMCore.prompt_topk`).

``mode`` says how a PRISM checkpoint's adapter runs: ``off`` (the untouched base model), ``on``,
``gated`` (the gate decides per row) or ``gated_k`` (``gated`` on a K-way checkpoint: none or one of its
adapters per row). Routes follow :mod:`prism_lightning.model.route_rule`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prism_lightning.errors import ConfigError
from prism_lightning.generation import Sampling
from prism_lightning.model.route_rule import RouteSpec

__all__ = ["MODES", "Engine", "EngineOutput"]

MODES: tuple[str, ...] = ("off", "on", "gated", "gated_k")


@dataclass
class EngineOutput:
    text: str
    route: bool | None = None
    gate_prob: float | None = None
    finish_reason: str = "length"
    adapter: str | None = None  # K-way: the adapter the row ran with (None: the base model)


class Engine:
    """A model (plain, or a PRISM checkpoint) behind the protocol. Subclasses implement
    :meth:`_generate` and :meth:`_option_logprobs`, and say whether they hold an adapter."""

    backend = "engine"

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
    ) -> list[EngineOutput]:
        """Generate for chat-formatted prompts (one sampling config, or one per row). ``seeds``: one per
        row, so a row does not depend on its batch. ``route`` forces per-row routes (multi-turn: the
        first turn's route holds; K-way: an adapter's name) while the gate's probability is still
        recorded. ``batch_size`` bounds the hf engine's batches; vLLM schedules its own."""
        mode = self.check_mode(mode)
        if not prompts:
            return []
        return self._generate(list(prompts), sampling, mode, seeds, route, batch_size)

    def option_logprobs(
        self,
        prompts: Sequence[str],
        options: Sequence[Sequence[str]],
        *,
        mode: str = "off",
        batch_size: int = 16,
    ) -> tuple[torch.Tensor, list[bool | None], list[float | None]]:
        """Log-probability of each option as the next token after each prompt. An option is a list of
        spellings; its score is the logsumexp over those that are one token. Returns
        ([n, n_options] log-probs, per-row route, per-row gate probability)."""
        return self._option_logprobs(list(prompts), options, self.check_mode(mode), batch_size)

    # -- what an engine implements (``mode`` already checked, ``prompts`` a non-empty list for generate) --
    def _generate(
        self,
        prompts: list[str],
        sampling: Sampling,
        mode: str,
        seeds: Sequence[int] | None,
        route: Sequence[RouteSpec] | None,
        batch_size: int,
    ) -> list[EngineOutput]:
        raise NotImplementedError

    def _option_logprobs(
        self, prompts: list[str], options: Sequence[Sequence[str]], mode: str, batch_size: int
    ) -> tuple[torch.Tensor, list[bool | None], list[float | None]]:
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
