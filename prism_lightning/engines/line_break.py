"""Stopping a row at its first line break, the same way on every engine (the bootstrap's query stage
asks for one line). Two kinds of vocabulary token hold a line break: those with nothing but whitespace
before it stop the row at once (nothing is lost), and merged ones with text before it (Qwen's and
Llama 3's ``"?\\n"``, ``":\\n"``) are kept, the row ending one step later, so the text before the break
survives. The hf engine forces that later stop with :class:`StopAfterLineBreak`; vLLM stops on the
``"\\n"`` stop string; either way the caller cuts the decoded tokens at their first break.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["StopAfterLineBreak", "line_break_token_ids"]


def line_break_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Vocabulary tokens whose text holds a line break: (those with nothing but whitespace before the
    first break, those with text before it)."""
    ids = range(len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in ids])
    leading: list[int] = []
    merged: list[int] = []
    for i, text in zip(ids, texts, strict=True):
        if "\n" in text:
            (merged if text.split("\n", 1)[0].strip() else leading).append(i)
    return leading, merged


class StopAfterLineBreak:
    """While active, a decode step whose input token holds a line break after other text (a merged
    token such as "?\\n", just sampled) puts all of that row's next-token mass on a stop token.

    The decode loop drops the token that stops a row, so stopping *on* "?\\n" would lose the "?".
    Instead the row keeps that token and ends one step later, on ``stop_id``. The prefill (the forward
    of each batch, several tokens per row) is left alone: its last token is the prompt's.
    """

    def __init__(self, model, merged_ids: Sequence[int], stop_id: int) -> None:
        self.model = model
        self.merged = torch.tensor(sorted(set(merged_ids)), dtype=torch.long)
        self.stop_id = int(stop_id)
        self._handle = None

    def __enter__(self) -> StopAfterLineBreak:
        self._handle = self.model.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module, args, kwargs, output):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None or input_ids.shape[1] != 1:  # a prefill (every batch has its own)
            return None
        logits = output.logits if hasattr(output, "logits") else output[0]
        hit = torch.isin(input_ids[:, -1], self.merged.to(input_ids.device))
        forced = torch.full_like(logits[0, -1], float("-inf"))
        forced[self.stop_id] = 0.0
        logits[:, -1] = torch.where(hit[:, None], forced, logits[:, -1])
        return None
