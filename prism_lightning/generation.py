"""Batched generation engine shared by every stage (query and answer bootstrapping, routed inference,
evaluation).

We run our own decode loop instead of ``model.generate`` for three reasons:

* **Per-row deterministic sampling.** Every row samples from its own ``torch.Generator`` seeded by the
  caller, so a row's output does not depend on which rows share its batch, on the batch size, or on
  which process runs it (up to the batch invariance of the floating-point kernels). That is what lets
  several processes split a stage and still produce the same data.
* **Finished rows cost nothing.** A row that emits a stop token is removed from the running batch
  (KV cache, ids, mask, positions, generators), instead of being padded along until the longest row
  ends. (The static-cache compiled decode, :mod:`prism_lightning.static_decode`, trades this for fixed
  shapes: there a finished row's slot runs on, unread, until the batch ends.)
* **Hooks can follow the rows.** The prefill is one ``model(...)`` call over the whole batch (a
  forward hook can, e.g., compute a routing decision there), and ``on_rows_kept`` tells the caller
  which rows survive each compaction so per-row state kept outside the model stays aligned.
* **Rows can stream.** ``on_step`` sees each step's new tokens as they are picked (a server streams
  them, ``chat`` prints them) and may end rows early (a stop string matched, a client went away).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from prism_lightning.static_decode import decoder_for, use_static_decode
from prism_lightning.token_sampling import Sampling, SamplingConfig, SeenTokens, pick_rows

# End-of-turn markers of common chat templates (ChatML, Llama 3, Phi-3, Llama 2 / Mistral).
END_OF_TURN_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>")

Prompt = str | Sequence[int]

# on_step(new_tokens, finished) after every decode step: ``new_tokens`` maps a row (its index in the
# batch as given) to the token it just got (stop tokens are not part of the answer and never appear),
# ``finished`` maps each row that ended at this step to its finish reason. It may return rows to end
# now; they leave the batch with finish reason "cancelled".
StepCallback = Callable[[dict[int, int], dict[int, str]], Iterable[int] | None]


@dataclass
class Generation:
    """One row's result. ``token_ids`` excludes the stop token; ``text`` is decoded without special
    tokens and stripped. ``finish_reason`` is "stop" (a stop token was sampled), "length", or
    "cancelled" (ended by ``on_step``)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    # log-softmax of the prefill's next-token logits (V,), when asked for: a judge reads its option
    # scores from the same prefill that starts its free-text verdict, instead of a second forward.
    first_log_probs: torch.Tensor | None = None


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Every token that ends an answer: the tokenizer's EOS, the generation config's EOS (int or list)
    and the chat end-of-turn markers that exist in the vocabulary. Chat models often end a turn with a
    token that is not ``eos_token`` (e.g. ``<|eot_id|>``), so stopping on EOS alone runs on."""
    ids: list[int] = []

    def add(value) -> None:
        if value is None:
            return
        if isinstance(value, int):
            ids.append(value)
        else:
            ids.extend(int(v) for v in value)

    add(getattr(tokenizer, "eos_token_id", None))
    gen_config = getattr(model, "generation_config", None) if model is not None else None
    if gen_config is not None:
        add(getattr(gen_config, "eos_token_id", None))
    for token in END_OF_TURN_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(token)
        # Unknown tokens map to unk: keep the id only if it maps back to the same token.
        if isinstance(tid, int) and tokenizer.convert_ids_to_tokens(tid) == token:
            ids.append(tid)
    return list(dict.fromkeys(ids))


def row_seed(global_seed: int, key: str) -> int:
    """A stable 63-bit seed for one row from a run seed and the row's id (``hash()`` is salted per
    process, so it cannot be used to make processes agree)."""
    digest = hashlib.sha256(f"{global_seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    sampling: Sampling,
    *,
    seeds: Sequence[int] | None = None,
    on_rows_kept: Callable[[torch.Tensor], None] | None = None,
    stop_ids: Sequence[int] | None = None,
    keep_first_log_probs: bool = False,
    on_step: StepCallback | None = None,
    decode_compile: str = "off",
) -> list[Generation]:
    """Generate for one batch of already chat-formatted prompts (strings, tokenized without adding
    special tokens, or lists of token ids taken as they are).

    The prefill is a single ``model(...)`` call over the left-padded batch; decoding then feeds one
    token per step. When rows finish, they are dropped from the running batch and
    ``on_rows_kept(kept)`` is called with the indices (into the batch as it was just before that
    compaction, on the model's device) of the rows that continue. It is not called when no row
    continues. ``stop_ids`` defaults to :func:`stop_token_ids`. ``keep_first_log_probs`` fills
    ``Generation.first_log_probs`` from the prefill. ``on_step`` streams the tokens (see
    :data:`StepCallback`); rows with ``max_new_tokens == 0`` never appear in it.

    ``decode_compile`` (auto, on, off; see :mod:`prism_lightning.static_decode`): decode on a static
    KV cache with a compiled step (auto: on CUDA). Rows then stay in the model's batch until it ends,
    which is padded to a power of two: ``on_rows_kept`` is called once, after the prefill, with the row
    each slot copies (padding slots repeat row 0), and not at compactions.
    """
    if len(prompts) == 0:
        return []
    static = use_static_decode(decode_compile, model)
    ids = _tokenize(tokenizer, prompts)
    rows = _per_row(sampling, len(ids))
    seeds = _resolve_seeds(seeds, rows)
    stops = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer, model)
    return _generate_ids(
        model, tokenizer, ids, rows, seeds, stops, on_rows_kept, keep_first_log_probs, on_step, static
    )


def generate(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    sampling: Sampling,
    *,
    batch_size: int = 8,
    seeds: Sequence[int] | None = None,
    progress: bool = False,
    desc: str = "generate",
    stop_ids: Sequence[int] | None = None,
    keep_first_log_probs: bool = False,
    decode_compile: str = "off",
) -> list[Generation]:
    """Generate for any number of prompts in batches of ``batch_size``, returned in input order.

    ``sampling`` is one config for all prompts or one per prompt (rows with different temperatures
    or lengths then still share batches). Prompts are sorted by token length (longest first) so each
    batch holds similar lengths and wastes little padding (and the longest batch runs first, so
    memory problems show at once). Without ``seeds``, sampling draws one seed per prompt from
    torch's global generator, in input order, so results still do not depend on ``batch_size``.
    ``stop_ids``, ``keep_first_log_probs`` and ``decode_compile`` as in :func:`generate_batch`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if len(prompts) == 0:
        return []
    static = use_static_decode(decode_compile, model)
    ids = _tokenize(tokenizer, prompts)
    rows = _per_row(sampling, len(ids))
    seeds = _resolve_seeds(seeds, rows)
    stops = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer, model)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    results: list[Generation | None] = [None] * len(ids)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ids), desc=desc, unit="prompt")
    try:
        for chunk in balanced_batches(order, batch_size):
            outs = _generate_ids(
                model,
                tokenizer,
                [ids[i] for i in chunk],
                [rows[i] for i in chunk],
                [seeds[i] for i in chunk],
                stops,
                None,
                keep_first_log_probs,
                None,
                static,
            )
            for i, out in zip(chunk, outs, strict=True):
                results[i] = out
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# internals


def balanced_batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """Split ``order`` into the fewest batches of at most ``batch_size``, of near-equal size: 40 rows
    at batch 32 run as 20 + 20, not 32 + 8 (the 8-row batch would decode as many steps for a
    quarter of the work)."""
    n = len(order)
    if n == 0:
        return []
    n_batches = -(-n // batch_size)
    base, extra = divmod(n, n_batches)
    out, start = [], 0
    for b in range(n_batches):
        size = base + (b < extra)
        out.append(list(order[start : start + size]))
        start += size
    return out


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every row's last prompt token in the last column, which is where
    every prefill in this package reads the next-token logits and the gate its features."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return input_ids.to(device), mask.to(device)


def _tokenize(tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
    texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    ids: list[list[int] | None] = [None if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    if texts:
        # The chat template already holds BOS / special tokens: add none.
        encoded = tokenizer([prompts[i] for i in texts], add_special_tokens=False)["input_ids"]
        for i, row in zip(texts, encoded, strict=True):
            ids[i] = list(row)
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"Prompt {i} is empty after tokenization; nothing to condition on.")
    return ids  # type: ignore[return-value]


def _per_row(sampling: Sampling, n: int) -> list[SamplingConfig]:
    if isinstance(sampling, SamplingConfig):
        return [sampling] * n
    rows = list(sampling)
    if len(rows) != n:
        raise ValueError(f"Got {len(rows)} sampling configs for {n} prompts.")
    return rows


def _resolve_seeds(seeds: Sequence[int] | None, sampling: list[SamplingConfig]) -> list[int]:
    n = len(sampling)
    if seeds is not None:
        if len(seeds) != n:
            raise ValueError(f"Got {len(seeds)} seeds for {n} prompts.")
        return [int(s) for s in seeds]
    if all(s.greedy for s in sampling):
        return [0] * n
    return torch.randint(0, 2**62, (n,)).tolist()


def _base_model(model):
    """The transformers model under wrappers such as peft's PeftModel (for signature checks)."""
    seen = set()
    while hasattr(model, "get_base_model") and id(model) not in seen:
        seen.add(id(model))
        inner = model.get_base_model()
        if inner is model:
            break
        model = inner
    return model


@lru_cache(maxsize=64)
def _forward_kwarg_names(forward_cls: type) -> tuple[str, str | None]:
    """(cache kwarg, logits-to-keep kwarg) for a model class: transformers 5 renamed
    ``past_key_values`` to ``cache``; older versions use ``num_logits_to_keep`` or nothing."""
    params = inspect.signature(forward_cls.forward).parameters
    cache_name = "cache" if "cache" in params else "past_key_values"
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return cache_name, keep


def _new_cache(model):
    from transformers import DynamicCache

    config = getattr(_base_model(model), "config", None)
    try:
        return DynamicCache(config=config)  # sliding-window / hybrid layer layout from the config
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def _trim_left(cache, columns: int) -> bool:
    """Drop the first ``columns`` cache positions (padding shared by every running row, left behind
    when the longer rows finished). Only for plain full-attention dynamic layers, where slicing is
    exact (positions are explicit, so nothing else moves); returns whether it trimmed."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return False
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return False
    for layer in layers:
        if layer.is_initialized and layer.keys is not None and layer.keys.numel():
            layer.keys = layer.keys[..., columns:, :]
            layer.values = layer.values[..., columns:, :]
    return True


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _stream_step(
    on_step: StepCallback,
    step_tokens: list[int],
    alive: list[int],
    kept: list[int],
    budget: list[int],
    finish: list[str],
) -> list[int]:
    """Report one decode step to ``on_step`` and drop the rows it ends; returns the rows that go on."""
    going_on = set(kept)
    new_tokens: dict[int, int] = {}
    finished: dict[int, str] = {}
    for j, tok in enumerate(step_tokens):
        row = alive[j]
        if budget[row] == 0:
            continue
        if finish[row] != "stop":
            new_tokens[row] = tok
        if j not in going_on:
            finished[row] = finish[row]
    ended = set(on_step(new_tokens, finished) or ())
    if not ended:
        return kept
    for j in kept:
        if alive[j] in ended:
            finish[alive[j]] = "cancelled"
    return [j for j in kept if alive[j] not in ended]


@torch.no_grad()
def _generate_ids(
    model,
    tokenizer,
    ids: list[list[int]],
    sampling: list[SamplingConfig],
    seeds: list[int],
    stop_ids: list[int],
    on_rows_kept: Callable[[torch.Tensor], None] | None,
    keep_first_log_probs: bool = False,
    on_step: StepCallback | None = None,
    static: bool = False,
) -> list[Generation]:
    n = len(ids)
    lengths = [len(row) for row in ids]
    budget = [s.max_new_tokens for s in sampling]
    if max(budget) == 0:
        return [Generation("", [], "length", lengths[i]) for i in range(n)]

    device = _model_device(model)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    input_ids, mask = left_pad(ids, pad_id, device)
    width = input_ids.shape[1]
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)

    gens: list[torch.Generator | None] = []
    for seed, config in zip(seeds, sampling, strict=True):
        gen = None
        if not config.greedy:
            gen = torch.Generator(device=device)
            gen.manual_seed(seed)
        gens.append(gen)
    run_sampling = list(sampling)  # config of each running row

    cache = _new_cache(model)
    cache_kw, keep_kw = _forward_kwarg_names(type(_base_model(model)))
    extra = {keep_kw: 1} if keep_kw else {}

    def forward(step_ids: torch.Tensor, step_mask: torch.Tensor, step_pos: torch.Tensor) -> torch.Tensor:
        out = model(
            input_ids=step_ids,
            # No padding left in the running batch: no mask, so attention can take its causal fast path
            # (what `model.generate` does too).
            attention_mask=step_mask if padded else None,
            position_ids=step_pos,
            use_cache=True,
            **{cache_kw: cache},
            **extra,
        )
        return out.logits[:, -1, :].float()

    stop_set = set(stop_ids)
    alive = list(range(n))  # original row of each running row
    pads = [width - length for length in lengths]  # left padding of each running row
    padded = any(pads)
    out_tokens: list[list[int]] = [[] for _ in range(n)]
    finish = ["length"] * n
    last_pos = positions[:, -1]

    logits = forward(input_ids, mask, positions)  # prefill: one call over the whole batch
    first = torch.log_softmax(logits, dim=-1).cpu() if keep_first_log_probs else None
    seen = SeenTokens(ids, logits.shape[-1], device) if SeenTokens.needed(sampling) else None
    decoder = decoder_for(model) if static else None
    for step in range(max(budget)):
        next_tok = pick_rows(logits, run_sampling, gens, seen)
        if seen is not None:
            seen.add(next_tok)
        kept: list[int] = []
        step_tokens = next_tok.tolist()  # the one host sync per step
        for j, tok in enumerate(step_tokens):
            row = alive[j]
            if budget[row] == 0:  # a row with no budget only took part in the prefill
                continue
            if tok in stop_set:
                finish[row] = "stop"
            else:
                out_tokens[row].append(tok)
                if len(out_tokens[row]) < budget[row]:
                    kept.append(j)
        if on_step is not None:
            kept = _stream_step(on_step, step_tokens, alive, kept, budget, finish)
        if not kept:
            break
        if decoder is not None and step == 0:  # the prefilled batch moves to the static cache
            slots = decoder.begin(cache, mask, last_pos, next_tok, width + max(budget), cache_kw, extra)
            cache = None
            if on_rows_kept is not None:
                on_rows_kept(slots)
        if len(kept) < len(alive):
            idx = torch.tensor(kept, dtype=torch.long, device=device)
            next_tok = next_tok[idx]
            if decoder is not None:
                decoder.keep(idx)
            else:
                cache.batch_select_indices(idx)
                mask, last_pos = mask[idx], last_pos[idx]
                pads = [pads[j] for j in kept]
                trim = min(pads)
                if trim and _trim_left(cache, trim):
                    mask = mask[:, trim:]
                    pads = [p - trim for p in pads]
                padded = any(pads)
            alive = [alive[j] for j in kept]
            gens = [gens[j] for j in kept]
            run_sampling = [run_sampling[j] for j in kept]
            if seen is not None:
                seen.keep(idx)
            if on_rows_kept is not None and decoder is None:
                on_rows_kept(idx)
        if decoder is not None:
            logits = decoder.step(next_tok)
            continue
        if padded:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        last_pos = last_pos + 1
        logits = forward(next_tok[:, None], mask, last_pos[:, None])

    return [
        Generation(
            text=tokenizer.decode(out_tokens[i], skip_special_tokens=True).strip(),
            token_ids=out_tokens[i],
            finish_reason=finish[i],
            prompt_tokens=lengths[i],
            first_log_probs=None if first is None else first[i],
        )
        for i in range(n)
    ]
