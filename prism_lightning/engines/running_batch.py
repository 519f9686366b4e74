"""A decode batch that rows join and leave between steps (continuous batching, as vLLM schedules).

:func:`~prism_lightning.generation.generate_batch` runs a fixed set of rows to the end; a server that
uses it makes a request arriving mid-batch wait for the whole batch. Here newcomers are prefilled on
their own (one forward over the newcomers, left-padded), their KV cache rows are left-padded to the
running cache's width and appended, and from the next step on they decode with the others. A row that
ends leaves at once and frees its slot.

A row's tokens do not depend on its batch mates: every row keeps its own positions (explicit
``position_ids``), its own mask columns and its own sampling generator, exactly as in
``generate_batch`` (so up to the batch invariance of the floating-point kernels, a row gets its lone
answer). Appending rows needs a cache of plain full-attention dynamic layers (what transformers builds
for decoder-only models without sliding windows); with any other layout ``can_admit`` is only true
while the batch is empty, i.e. the batch runs to its end before the next one starts.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import torch
import torch.nn.functional as F

from prism_lightning.generation import (
    SamplingConfig,
    _base_model,
    _forward_kwarg_names,
    _model_device,
    _new_cache,
    _trim_left,
    left_pad,
    stop_token_ids,
)
from prism_lightning.token_sampling import SeenTokens, pick_rows

# What one step (or one admission) tells its caller: the new token of each row (stop tokens are not part
# of an answer and never appear) and the rows that ended, with "stop" or "length"; ended rows have
# already left the batch.
StepResult = tuple[dict[Hashable, int], dict[Hashable, str]]


class RunningBatch:
    """Rows (named by hashable keys) decoding together on one model; one caller at a time."""

    def __init__(self, model, tokenizer, *, stop_ids: Sequence[int] | None = None) -> None:
        self.model = model
        self.device = _model_device(model)
        pad_id = tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else (tokenizer.eos_token_id or 0)
        self.stop_set = set(stop_ids if stop_ids is not None else stop_token_ids(tokenizer, model))
        self.cache_kw, keep_kw = _forward_kwarg_names(type(_base_model(model)))
        self.extra = {keep_kw: 1} if keep_kw else {}
        self.version = 0  # bumped whenever rows join or leave (callers keep per-row state aligned)
        self._clear()

    def _clear(self) -> None:
        self.keys: list[Hashable] = []  # the running rows, in batch order
        self.cache = None
        self.mask: torch.Tensor | None = None  # (rows, cache columns): 0 over each row's left padding
        self.pads: list[int] = []  # left padding of each row
        self.last_pos: torch.Tensor | None = None  # position of each row's next input token
        self.next_tok: torch.Tensor | None = None  # each row's last picked token, not yet fed
        self.gens: list[torch.Generator | None] = []
        self.sampling: list[SamplingConfig] = []
        self.left: list[int] = []  # tokens each row may still produce
        self.seen: SeenTokens | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def reset(self) -> None:
        """Forget every row (e.g. after a failed forward)."""
        self._clear()
        self.version += 1

    @property
    def can_admit(self) -> bool:
        """Whether new rows may join now (always when empty; otherwise only on an appendable cache)."""
        return not self.keys or _appendable(self.cache)

    # -- rows joining ---------------------------------------------------------------------------------
    @torch.no_grad()
    def admit(
        self,
        keys: Sequence[Hashable],
        prompts: Sequence[Sequence[int]],
        sampling: Sequence[SamplingConfig],
        seeds: Sequence[int],
    ) -> StepResult:
        """Prefill ``prompts`` (one forward over the newcomers alone), pick their first tokens and append
        the rows that go on to the running batch. A forward hook on the model sees this prefill as the
        next call (e.g. a routing controller armed by the caller)."""
        if not self.can_admit:
            raise RuntimeError("This batch's cache cannot take rows while others run.")
        if len(set(keys) | set(self.keys)) != len(keys) + len(self.keys):
            raise ValueError("Every row needs its own key.")
        ids = [[int(t) for t in p] for p in prompts]
        if any(not row for row in ids):
            raise ValueError("A prompt is empty; nothing to condition on.")
        ids_t, mask = left_pad(ids, self.pad_id, self.device)
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        width = ids_t.shape[1]
        pads = [width - len(row) for row in ids]
        cache = _new_cache(self.model)
        logits = self._forward(cache, ids_t, mask if any(pads) else None, positions)
        gens: list[torch.Generator | None] = []
        for seed, config in zip(seeds, sampling, strict=True):
            gen = None
            if not config.greedy:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(int(seed))
            gens.append(gen)
        sampling = list(sampling)
        seen = SeenTokens(ids, logits.shape[-1], self.device) if SeenTokens.needed(sampling) else None
        picked = pick_rows(logits, sampling, gens, seen)
        if seen is not None:
            seen.add(picked)
        left = [s.max_new_tokens for s in sampling]
        tokens, finished, kept = self._settle(list(keys), picked.tolist(), left)
        if not kept:
            return tokens, finished
        idx = torch.tensor(kept, dtype=torch.long, device=self.device)
        if len(kept) < len(keys):
            cache.batch_select_indices(idx)
            mask, picked = mask[idx], picked[idx]
            if seen is not None:
                seen.keep(idx)
        new = {
            "keys": [keys[j] for j in kept],
            "pads": [pads[j] for j in kept],
            "gens": [gens[j] for j in kept],
            "sampling": [sampling[j] for j in kept],
            "left": [left[j] for j in kept],
        }
        self._append(cache, mask, positions[idx, -1] + 1, picked, seen, new)
        return tokens, finished

    def _append(self, cache, mask, last_pos, next_tok, seen, new: dict) -> None:
        """Put prefilled rows after the running ones: both caches left-padded to one width."""
        n_new = len(new["keys"])
        if self.keys:
            width = max(self.mask.shape[1], mask.shape[1])
            old_pad, new_pad = width - self.mask.shape[1], width - mask.shape[1]
            for old_layer, new_layer in zip(self.cache.layers, cache.layers, strict=True):
                if not old_layer.is_initialized:
                    continue
                old_layer.keys = torch.cat(
                    [_pad_left(old_layer.keys, old_pad), _pad_left(new_layer.keys, new_pad)]
                )
                old_layer.values = torch.cat(
                    [_pad_left(old_layer.values, old_pad), _pad_left(new_layer.values, new_pad)]
                )
            self.mask = torch.cat([F.pad(self.mask, (old_pad, 0)), F.pad(mask, (new_pad, 0))])
            self.pads = [p + old_pad for p in self.pads] + [p + new_pad for p in new["pads"]]
            self.last_pos = torch.cat([self.last_pos, last_pos])
            self.next_tok = torch.cat([self.next_tok, next_tok])
            if seen is not None or self.seen is not None:  # rows without a penalty get empty rows
                vocab = (seen if seen is not None else self.seen).mask.shape[1]
                blank = torch.zeros((len(self.keys), vocab), dtype=torch.bool, device=self.device)
                old = self.seen.mask if self.seen is not None else blank
                add = seen.mask if seen is not None else blank.new_zeros((n_new, vocab))
                self.seen = self.seen if self.seen is not None else seen
                self.seen.mask = torch.cat([old, add])
        else:
            self.cache, self.mask, self.pads = cache, mask, list(new["pads"])
            self.last_pos, self.next_tok, self.seen = last_pos, next_tok, seen
        self.keys += new["keys"]
        self.gens += new["gens"]
        self.sampling += new["sampling"]
        self.left += new["left"]
        self.version += 1

    # -- decoding -------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> StepResult:
        """Feed every row its last token and pick the next one; rows that end leave the batch."""
        if not self.keys:
            return {}, {}
        padded = any(self.pads)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.keys), 1))], dim=-1)
        logits = self._forward(
            self.cache, self.next_tok[:, None], self.mask if padded else None, self.last_pos[:, None]
        )
        picked = pick_rows(logits, self.sampling, self.gens, self.seen)
        if self.seen is not None:
            self.seen.add(picked)
        self.last_pos = self.last_pos + 1
        self.next_tok = picked
        tokens, finished, kept = self._settle(list(self.keys), picked.tolist(), self.left)
        if len(kept) < len(self.keys):
            self._keep(kept)
        return tokens, finished

    def drop(self, keys: Iterable[Hashable]) -> None:
        """End rows now (a client went away, a stop string matched)."""
        gone = set(keys)
        kept = [j for j, key in enumerate(self.keys) if key not in gone]
        if len(kept) < len(self.keys):
            self._keep(kept)

    def _settle(self, keys: list, picked: list[int], left: list[int]) -> tuple[dict, dict, list[int]]:
        """Book one picked token per row (``left`` counts down in place); returns (tokens, finished,
        rows that go on)."""
        tokens, finished, kept = {}, {}, []
        for j, (key, tok) in enumerate(zip(keys, picked, strict=True)):
            if left[j] <= 0:
                finished[key] = "length"
            elif tok in self.stop_set:
                finished[key] = "stop"
            else:
                tokens[key] = tok
                left[j] -= 1
                if left[j] == 0:
                    finished[key] = "length"
                else:
                    kept.append(j)
        return tokens, finished, kept

    def _keep(self, kept: list[int]) -> None:
        if not kept:
            self.reset()
            return
        idx = torch.tensor(kept, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.last_pos, self.next_tok = self.mask[idx], self.last_pos[idx], self.next_tok[idx]
        if self.seen is not None:
            self.seen.keep(idx)
        for name in ("keys", "pads", "gens", "sampling", "left"):
            values = getattr(self, name)
            setattr(self, name, [values[j] for j in kept])
        trim = min(self.pads)
        if trim and _trim_left(self.cache, trim):
            self.mask = self.mask[:, trim:]
            self.pads = [p - trim for p in self.pads]
        self.version += 1

    def _forward(self, cache, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor):
        out = self.model(
            input_ids=ids,
            attention_mask=mask,  # None without padding: attention takes its causal fast path
            position_ids=positions,
            use_cache=True,
            **{self.cache_kw: cache},
            **self.extra,
        )
        return out.logits[:, -1, :].float()


def _appendable(cache) -> bool:
    """Rows can be appended to plain full-attention dynamic layers (padding them on the left is exact)."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return False
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _pad_left(states: torch.Tensor, columns: int) -> torch.Tensor:
    """(batch, heads, seq, dim) states with ``columns`` zero positions in front (masked out)."""
    return F.pad(states, (0, 0, columns, 0)) if columns else states
