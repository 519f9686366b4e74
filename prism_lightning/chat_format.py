"""Chat formatting with a context (persona) placed in the system prompt, the user turn, or nowhere, and
the replies of reasoning models (a thinking block, then the answer; see the section below).

"No persona" must be the same formatted prompt in every stage (queries, answers, teacher, training,
inference). Templates such as SmolLM2's or Qwen's insert their own default system prompt when a
conversation has none; we keep that behaviour for the no-persona prompt everywhere unless the
config sets ``base_system_prompt``, so student and gate always see what inference will see.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

Placement = Literal["system", "user", "none"]
PLACEMENTS: tuple[str, ...] = ("system", "user", "none")

# Used only when a tokenizer ships no chat template at all (e.g. a base model or a test tokenizer).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SENTINEL = "PRISM-SYSTEM-ROLE-PROBE-7f3a"


def supports_system_role(tokenizer) -> bool:
    """True when the chat template renders a system message (some, e.g. Mistral's, raise or drop it)."""
    probe = [{"role": "system", "content": _SENTINEL}, {"role": "user", "content": "hi"}]
    try:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception:  # templates signal "no system role" by raising from Jinja
        return False
    return _SENTINEL in rendered


def conversation_messages(
    turns: str | Sequence[str],
    context: str | None,
    where: str,
    replies: Sequence[str] = (),
    default_system: str | None = None,
) -> list[dict[str, str]]:
    """The messages of one conversation once the context's place is settled (``where``: system, user or
    none): in the system turn, or before the first user turn; ``default_system`` fills the system turn when
    the context does not. Local templates (:class:`ChatFormatter`) and chat APIs share it."""
    user_turns = [turns] if isinstance(turns, str) else list(turns)
    if not user_turns:
        raise ValueError("A conversation needs at least one user turn.")
    if len(replies) not in (len(user_turns), len(user_turns) - 1):
        raise ValueError("replies must answer every user turn, or all but the last.")
    msgs: list[dict[str, str]] = []
    if where == "system":
        msgs.append({"role": "system", "content": context})
    elif default_system is not None:
        msgs.append({"role": "system", "content": default_system})
    for i, user in enumerate(user_turns):
        if i == 0 and where == "user":
            user = f"{context}\n\n{user}"
        msgs.append({"role": "user", "content": user})
        if i < len(replies):
            msgs.append({"role": "assistant", "content": replies[i]})
    return msgs


class ChatFormatter:
    """Turns (query, context, placement) into the exact prompt string the model sees."""

    def __init__(self, tokenizer, *, base_system_prompt: str | None = None) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            log.warning("Tokenizer has no chat template; using a plain ChatML template.")
            tokenizer.chat_template = CHATML_TEMPLATE
        self.tokenizer = tokenizer
        self.base_system_prompt = base_system_prompt
        self.supports_system = supports_system_role(tokenizer)
        #: how a reasoning model's replies open their ``<think>`` block; None for a model that does not think
        self.thinking = thinking_format(tokenizer)
        self._warned_fallback = False

    def effective_placement(self, placement: str) -> str:
        """System placement falls back to the user turn, logged once, when the template has no system role."""
        if placement not in PLACEMENTS:
            raise ValueError(f"Unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}.")
        if placement == "system" and not self.supports_system:
            if not self._warned_fallback:
                log.warning("Chat template has no system role: persona goes before the user turn instead.")
                self._warned_fallback = True
            return "user"
        return placement

    def messages(
        self,
        turns: str | Sequence[str],
        context: str | None = None,
        placement: str = "system",
        replies: Sequence[str] = (),
    ) -> list[dict[str, str]]:
        """Messages for one conversation; the context goes into the first user turn when placed there."""
        where = self.effective_placement(placement) if context else "none"
        default_system = self.base_system_prompt if self.supports_system else None
        return conversation_messages(turns, context, where, replies, default_system)

    def prompt(
        self,
        turns: str | Sequence[str],
        context: str | None = None,
        placement: str = "system",
        replies: Sequence[str] = (),
        reply_start: str = "",
    ) -> str:
        """The prompt string with the generation prompt appended (ready for the assistant's next turn),
        then ``reply_start``: text the reply is primed to start with (the judge's "Verdict:")."""
        msgs = self.messages(turns, context, placement, replies)
        return (
            self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + reply_start
        )


# ------------------------------------------------------------------------------------------------
# Replies of reasoning models: a ``<think>...</think>`` block, then the answer.
#
# DeepSeek-R1-Distill models (and QwQ) end their generation prompt inside an open block (the template adds
# ``<think>\n``), so a reply is the reasoning, ``</think>``, then the answer; their template drops the block
# from earlier assistant turns. Other templates that know the tags (Qwen3's) let the model open the block
# itself. This section owns the rule every caller follows: :func:`split_reply` cuts a reply into its
# thinking and its answer, :func:`thinking_format` tells from a chat template whether a model thinks, and
# :class:`ThinkingFormat` builds the text that closes a block (when the budget runs out the block is closed
# for the model, and the row says so) and the full reply a model would have written.

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
