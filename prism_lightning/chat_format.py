"""Chat formatting with a context (persona) placed in the system prompt, the user turn, or nowhere.

"No persona" must be the same formatted prompt in every stage (queries, answers, teacher, training,
inference). Templates such as SmolLM2's or Qwen's insert their own default system prompt when a
conversation has none; we keep that behaviour for the no-persona prompt everywhere unless the
config sets ``base_system_prompt``, so student and gate always see what inference will see.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

from prism_lightning.thinking import thinking_format

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
