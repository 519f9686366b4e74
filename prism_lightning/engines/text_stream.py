"""Token ids -> text deltas for one answer, as the tokens arrive.

A token does not always decode to whole characters (byte-level BPE splits multi-byte characters) and
the project's answers are stripped (``Generation.text``), so each step decodes the whole answer again
and sends only the part that can no longer change: trailing whitespace, an incomplete character and a
tail that could still grow into a stop string are held back. The deltas therefore add up to exactly
the non-streamed answer.
"""

from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    """Incremental detokenisation of one generated answer, with OpenAI-style stop strings."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.token_ids: list[int] = []
        self.stopped = False  # a stop string matched: the answer ends before it
        self._text = ""  # the answer so far (leading whitespace dropped, cut at a stop string)
        self._sent = ""  # what the deltas have carried so far

    def add(self, token_id: int) -> str:
        """Take one new token; return the text that is now final (possibly empty)."""
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True).lstrip()
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            self._text = text[:cut]
            return ""  # finish() sends the rest, stripped
        self._text = text
        safe = text.rstrip().rstrip("\ufffd")  # trailing spaces / a half-decoded character may still change
        held = self._stop_prefix_len(safe)
        if held:  # the answer may end before that tail, and it ends stripped
            safe = safe[: len(safe) - held].rstrip()
        return self._advance(safe)

    def finish(self) -> str:
        """The last delta: whatever remains of the final (stripped) answer."""
        return self._advance(self.text)

    @property
    def text(self) -> str:
        """The whole answer as the non-streaming response carries it."""
        return self._text.strip()

    def _advance(self, safe: str) -> str:
        if len(safe) <= len(self._sent) or not safe.startswith(self._sent):
            return ""  # nothing new, or the decoder rewrote earlier text (never unsent)
        delta = safe[len(self._sent) :]
        self._sent = safe
        return delta

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if s.startswith(text[-n:]):
                    best = n
                    break
        return best
