"""Choosing the next token per row: greedy, or sampled with temperature, top-k and top-p from each row's
own generator, so a row's sample never depends on its batch mates (the generation engine's sampler).
A repetition penalty reads which tokens each row has seen (:class:`SeenTokens`). The settings themselves
(:class:`SamplingConfig`) live here, below the decode loop that uses them (``generation`` re-exports them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each new token; ``temperature == 0`` means greedy (and seeds are ignored).

    ``top_k`` (0: off) and ``top_p`` narrow the sampled tokens, top-k first (transformers' and vLLM's
    order); ``repetition_penalty`` (1: off) divides a positive logit (multiplies a negative one) of every
    token already in the prompt or the answer, also when greedy, as transformers and vLLM do."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}.")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1: off), got {self.repetition_penalty}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# One config for every row, or one per prompt (rows with different settings share a batch, e.g.
# MT-Bench's per-category temperatures).
Sampling = SamplingConfig | Sequence[SamplingConfig]


# Top-p first looks among this many most likely tokens; a row whose nucleus reaches past them is
# redone over the whole vocabulary, so the result is exact either way.
TOP_P_CANDIDATES = 1024


def pick_tokens(logits: torch.Tensor, sampling: SamplingConfig, gens: list[torch.Generator]) -> torch.Tensor:
    """Next token per row from float32 logits [B, V]. Sampling uses the exponential race (argmax of
    p / E with E ~ Exp(1), equivalent to Gumbel-max): each row draws its noise from its own generator,
    so its stream is independent of its batch mates.

    With top-p, only the top ``TOP_P_CANDIDATES`` tokens are sorted and raced (sorting and drawing
    noise over a 50k-150k vocabulary per row was a third of a decode step on CPU)."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    scaled = logits / sampling.temperature
    if 0 < sampling.top_k < scaled.shape[-1]:
        # every candidate is among the top k: renormalise over them, then the nucleus (exact)
        top, idx = scaled.topk(sampling.top_k, dim=-1)
        probs = torch.softmax(top, dim=-1)
        if sampling.top_p < 1.0:
            probs = _nucleus(probs, sampling.top_p)
        return _race(probs, idx, gens)
    if sampling.top_p >= 1.0:
        return _race(torch.softmax(scaled, dim=-1), None, gens)
    k = min(TOP_P_CANDIDATES, scaled.shape[-1])
    top, idx = scaled.topk(k, dim=-1)  # sorted, most likely first
    probs = (top - scaled.logsumexp(dim=-1, keepdim=True)).exp()
    picked = _race(_nucleus(probs, sampling.top_p), idx, gens)
    # Tokens past the candidates are dropped only if the candidates already exceed top_p.
    for row in (probs.sum(dim=-1) <= sampling.top_p).nonzero().flatten().tolist():
        full, order = torch.softmax(scaled[row : row + 1], dim=-1).sort(dim=-1, descending=True)
        picked[row] = _race(_nucleus(full, sampling.top_p), order, gens[row : row + 1])[0]
    return picked


def _nucleus(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero a token when the tokens ranked above it already cover top_p (the first always stays)."""
    return sorted_probs.masked_fill((sorted_probs.cumsum(dim=-1) - sorted_probs) > top_p, 0.0)


class SeenTokens:
    """Which tokens each running row has in its prompt or answer so far ([rows, vocab] booleans), for
    the repetition penalty; only built when some row asks for one."""

    def __init__(self, prompts: list[list[int]], vocab: int, device: torch.device) -> None:
        self.mask = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
        for row, ids in enumerate(prompts):
            known = [t for t in ids if 0 <= t < vocab]  # added tokens past the logits never score
            self.mask[row, torch.tensor(known, dtype=torch.long, device=device)] = True

    @classmethod
    def needed(cls, sampling: list[SamplingConfig]) -> bool:
        return any(s.repetition_penalty != 1.0 for s in sampling)

    def add(self, tokens: torch.Tensor) -> None:
        self.mask[torch.arange(tokens.shape[0], device=tokens.device), tokens] = True

    def keep(self, rows: torch.Tensor) -> None:
        self.mask = self.mask[rows]

    def penalise(self, logits: torch.Tensor, sampling: list[SamplingConfig]) -> torch.Tensor:
        penalty = torch.tensor([s.repetition_penalty for s in sampling], device=logits.device)[:, None]
        return torch.where(self.mask, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def pick_rows(
    logits: torch.Tensor,
    sampling: list[SamplingConfig],
    gens: list[torch.Generator | None],
    seen: SeenTokens | None = None,
) -> torch.Tensor:
    """``pick_tokens`` per group of rows that share a config (each row keeps its own generator), after
    the repetition penalty when ``seen`` is given."""
    if seen is not None:
        logits = seen.penalise(logits, sampling)
    if all(s == sampling[0] for s in sampling):
        return pick_tokens(logits, sampling[0], gens)  # type: ignore[arg-type]
    picked = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for config in dict.fromkeys(sampling):
        rows = [j for j, s in enumerate(sampling) if s == config]
        idx = torch.tensor(rows, device=logits.device)
        picked[idx] = pick_tokens(logits[idx], config, [gens[j] for j in rows])  # type: ignore[misc]
    return picked


def _race(probs: torch.Tensor, token_ids: torch.Tensor | None, gens: list[torch.Generator]) -> torch.Tensor:
    noise = torch.empty_like(probs)
    for row, gen in enumerate(gens):
        noise[row].exponential_(generator=gen)
    choice = (probs / noise).argmax(dim=-1)
    return choice if token_ids is None else token_ids.gather(-1, choice[:, None]).squeeze(-1)
