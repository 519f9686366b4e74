"""A static KV cache and a compiled one-token decode step for :mod:`prism_lightning.generation`.

On a GPU the eager decode loop is launch-bound: one token per row per step costs hundreds of small
kernel launches, and the dynamic cache grows (new shapes) every step. Here the prefill still runs eagerly
on a dynamic cache, exactly as before (so a routing gate decides inside it and the first-token log
probabilities are unchanged); its keys and values are then copied into a transformers ``StaticCache`` of
fixed size, and every decode step is one call of a ``torch.compile``-d forward whose shapes never change:

* **Batch buckets.** The batch is padded up to a power of two; padding slots copy row 0 (its cache, mask,
  position and token), so they compute real, finite values that nobody reads.
* **Length buckets.** The cache holds a power of two >= prompt width + the longest answer.
* **Rows that finish stay in place.** Their slots keep running (as padding) instead of being cut out,
  so the shapes stay fixed until the batch ends; only the rows still running are read and sampled.

Sampling stays outside the compiled step (each row draws from its own generator, as in the eager path),
so per-row seeds keep their streams. Whatever per-row state a caller keeps outside the model (a routing
controller's mask) follows the padded batch through ``on_rows_kept`` once, after the prefill.

The cache and the compiled step are kept per model and reused while the buckets stay the same, which a
run of equal-sized batches does (one compilation per bucket pair; CUDA graphs on a GPU).
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["DECODE_COMPILE", "StaticDecoder", "decoder_for", "use_static_decode"]

#: Compilations of the decode step a process may make (one per batch x length bucket pair it meets: up to
#: 9 batch buckets x 7 length buckets for batches of 1-256 and caches of 64-4,096 tokens).
RECOMPILE_LIMIT = 64

# decode_compile settings: auto (on for CUDA, off elsewhere), on, off
DECODE_COMPILE: tuple[str, ...] = ("auto", "on", "off")
MIN_CACHE_LEN = 64

_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _config(model):
    seen = set()
    while hasattr(model, "get_base_model") and id(model) not in seen:  # through peft wrappers
        seen.add(id(model))
        model = model.get_base_model()
    return getattr(model, "config", None)


def full_attention_only(model) -> bool:
    """Whether every layer of ``model`` gets a plain full-attention static cache layer (no sliding
    window, no linear attention), which is what the padded copy of the prefill assumes."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    config = _config(model)
    if config is None:
        return False
    try:
        layers = StaticCache(config=config, max_cache_len=MIN_CACHE_LEN).layers
    except (TypeError, ValueError, KeyError):
        return False
    return bool(layers) and all(type(layer) is StaticLayer for layer in layers)


def use_static_decode(setting: str, model) -> bool:
    """Resolve a ``decode_compile`` setting for ``model``: ``auto`` is on for CUDA models whose cache can
    be static and off otherwise; ``on`` for a model that cannot is an error."""
    if setting not in DECODE_COMPILE:
        raise ValueError(f"decode_compile must be one of {', '.join(DECODE_COMPILE)}, got {setting!r}.")
    if setting == "off":
        return False
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    supported = full_attention_only(model)
    if setting == "auto":
        return supported and device.type == "cuda"
    if not supported:
        raise ValueError(
            "decode_compile=on needs a model whose layers are all full attention (a static KV cache); "
            f"{type(model).__name__} has sliding-window or other layers: use decode_compile=off or auto."
        )
    return True


def batch_bucket(rows: int) -> int:
    """The padded batch size: the next power of two."""
    return 1 << max(0, rows - 1).bit_length()


def length_bucket(tokens: int) -> int:
    """The cache length: the next power of two, at least :data:`MIN_CACHE_LEN`."""
    return max(MIN_CACHE_LEN, 1 << max(0, tokens - 1).bit_length())


class StaticDecoder:
    """One model's static cache and compiled step; one batch decodes at a time.

    ``compiled`` False runs the same static-cache step eagerly (to measure what each part buys);
    ``backend`` is torch.compile's (inductor; benchmarks may pick a cheaper one off-GPU)."""

    def __init__(self, model, *, compiled: bool = True, backend: str = "inductor") -> None:
        self._model = weakref.ref(model)  # the per-model registry must not keep the model alive
        self.compiled = compiled
        self.backend = backend
        self._cache_kw, self._kwargs = "past_key_values", {}
        self._cache = None
        self._key: tuple | None = None
        self._compiled_step = None
        self._fresh = True

    def begin(
        self,
        prefill_cache,
        mask: torch.Tensor,
        last_pos: torch.Tensor,
        next_tok: torch.Tensor,
        length: int,
        cache_kw: str,
        extra: dict,
    ) -> torch.Tensor:
        """Take over a prefilled batch: ``prefill_cache`` (a dynamic cache of ``n`` rows, all columns of
        ``mask``), each row's last position and its first sampled token; ``length`` is the most tokens
        (prompt width + the longest answer) the cache must hold; ``cache_kw`` the model's keyword for
        the cache and ``extra`` what else each forward takes. Returns the row map (slot -> row), for
        per-row state kept outside the model."""
        from transformers import StaticCache

        self._cache_kw, self._kwargs = cache_kw, {"use_cache": True, **extra}
        n, width = mask.shape
        bucket = batch_bucket(n)
        rows = torch.cat([torch.arange(n), torch.zeros(bucket - n, dtype=torch.long)]).to(mask.device)
        key = (bucket, length_bucket(length), mask.device)
        if key != self._key:
            self._cache = StaticCache(config=_config(self._model()), max_cache_len=key[1])
            self._key = key
        for source, target in zip(prefill_cache.layers, self._cache.layers, strict=True):
            keys, values = source.keys[rows], source.values[rows]
            if not target.is_initialized:
                target.lazy_initialization(keys, values)
            target.keys[:, :, :width].copy_(keys)
            target.values[:, :, :width].copy_(values)
            target.cumulative_length.fill_(width)
        self._column = width
        self._mask = torch.zeros((bucket, key[1]), dtype=mask.dtype, device=mask.device)
        self._mask[:, :width] = mask[rows]
        self._positions = last_pos[rows].clone()
        self._tokens = next_tok[rows].clone()
        self._slots = torch.arange(n, device=mask.device)  # the slot of each running row
        self._fresh = True  # the next step may meet new shapes or inputs: a recompilation
        return rows

    def keep(self, kept: torch.Tensor) -> None:
        """Rows left the batch: only ``kept`` (indices into the running rows) are read from now on."""
        self._slots = self._slots[kept]

    @torch.no_grad()
    def step(self, next_tok: torch.Tensor) -> torch.Tensor:
        """Feed each running row its token; returns the running rows' next-token logits (float32)."""
        self._tokens[self._slots] = next_tok
        self._mask[:, self._column] = 1
        self._column += 1
        self._positions += 1
        run = self._step
        if self.compiled:
            if self._compiled_step is None:
                graphs = self._tokens.device.type == "cuda" and self.backend == "inductor"
                self._compiled_step = torch.compile(
                    self._step,
                    backend=self.backend,
                    dynamic=False,
                    mode="reduce-overhead" if graphs else None,
                )
            run = self._compiled_step
            if self._tokens.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are read already
        args = (self._cache, self._tokens[:, None], self._mask, self._positions[:, None])
        if self.compiled and self._fresh:
            # Each bucket pair is one more compilation of the same step; past dynamo's default limit (8)
            # it would fall back to eager silently for the rest of the process.
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                logits = run(*args)
        else:
            logits = run(*args)
        self._fresh = False
        return logits[self._slots]

    def _step(self, cache, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
        out = self._model()(
            input_ids=tokens, attention_mask=mask, position_ids=positions, **{self._cache_kw: cache},
            **self._kwargs,
        )  # fmt: skip
        return out.logits[:, -1, :].float()


def decoder_for(model) -> StaticDecoder:
    """The model's decoder (made on first use, kept while the model lives)."""
    decoder = _decoders.get(model)
    if decoder is None:
        decoder = _decoders[model] = StaticDecoder(model)
    return decoder
