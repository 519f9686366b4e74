"""Choosing the next token per row: greedy, or sampled with temperature and top-p from each row's own
generator, so a row's sample never depends on its batch mates (the generation engine's sampler)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from prism_lightning.generation import SamplingConfig

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


def pick_rows(
    logits: torch.Tensor, sampling: list[SamplingConfig], gens: list[torch.Generator | None]
) -> torch.Tensor:
    """``pick_tokens`` per group of rows that share a config (each row keeps its own generator)."""
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
