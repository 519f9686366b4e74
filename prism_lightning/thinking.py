"""Replies of reasoning models: a ``<think>...</think>`` block, then the answer.

DeepSeek-R1-Distill models (and QwQ) end their generation prompt inside an open block (the template adds
``<think>\\n``), so a reply is the reasoning, ``</think>``, then the answer; their template drops the
block from earlier assistant turns. Other templates that know the tags (Qwen3's) let the model open the
block itself. This module owns the rule every caller follows: :func:`split_reply` cuts a reply into its
thinking and its answer, :func:`thinking_format` tells from a chat template whether a model thinks, and
:class:`ThinkingFormat` builds the text that closes a block (when the budget runs out the block is closed
for the model, and the row says so) and the full reply a model would have written.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
#: What follows the reasoning before the answer starts (DeepSeek-R1's own layout).
CLOSE_TEXT = f"\n{THINK_CLOSE}\n\n"

_PROBE = "PRISM-THINKING-PROBE-5b2e"


@dataclass(frozen=True)
class Reply:
    """A reply cut at its thinking block. ``thinking`` is None when the reply has no block; ``closed`` is
    False when the block never ended (the thinking budget ran out), and then ``answer`` is empty."""

    thinking: str | None
    answer: str
    closed: bool = True


def split_reply(text: str, opened: bool = False) -> Reply:
    """Thinking and answer of ``text``. ``opened``: the prompt ended inside the block (the reply starts in
    it); a reply that starts with ``<think>`` opens it itself. The block ends at the first ``</think>``;
    without one, an open block is unterminated (no answer) and a reply outside any block is all answer."""
    body = text.lstrip()
    if body.startswith(THINK_OPEN):
        body, opened = body[len(THINK_OPEN) :], True
    head, close, tail = body.partition(THINK_CLOSE)
    if close:
        return Reply(head.strip(), tail.strip(), True)
    if opened:
        return Reply(body.strip(), "", False)
    return Reply(None, text, True)


@dataclass(frozen=True)
class ThinkingFormat:
    """How a thinking model's reply starts: ``opener`` is the text our prompt adds to open the block ("" when
    the chat template's generation prompt already opens it, ``<think>\\n`` when the model would open it)."""

    opener: str = ""

    def closing(self, thinking: str) -> str:
        """What follows a prompt to put ``thinking`` in a closed block: the next token starts the answer."""
        return self.opener + thinking + CLOSE_TEXT

    def full_reply(self, thinking: str, answer: str) -> str:
        """The reply as the model writes it after its generation prompt: block, then answer (what a student
        learns to continue from the same prompt)."""
        return self.closing(thinking) + answer

    def identity(self) -> dict[str, object]:
        """What of the format changes the rows (part of stage hashes and evaluation keys)."""
        return {"opener": self.opener, "close": CLOSE_TEXT}


def thinking_format(tokenizer) -> ThinkingFormat | None:
    """The model's thinking format, read from its chat template: the generation prompt ends inside an open
    ``<think>`` block (DeepSeek-R1-Distill), or the template knows ``</think>`` without opening it (the model
    opens it: we open it for the model, so every reply has a block); None for a model that does not think."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or THINK_CLOSE not in template and THINK_OPEN not in template:
        return None
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": _PROBE}], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # a template that cannot render a lone user turn: judge by its text alone
        rendered = ""
    tail = rendered.rpartition(_PROBE)[2]
    if THINK_OPEN in tail and THINK_CLOSE not in tail.rpartition(THINK_OPEN)[2]:
        return ThinkingFormat(opener="")
    if THINK_CLOSE in template:
        return ThinkingFormat(opener=THINK_OPEN + "\n")
    return None
