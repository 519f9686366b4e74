"""The thinking of a reasoning model in the bootstrap's rows: the fields a row keeps of a generation's
thinking block (none for a model that does not think, so its rows keep their schema) and the counts a
stage reports, the blocks that ran out of ``bootstrap.thinking_max_new_tokens`` above all."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["thinking_counts", "thinking_fields", "thinking_warnings"]


def thinking_fields(gen, prefix: str = "") -> dict[str, Any]:
    """``{<prefix>thinking, <prefix>thinking_tokens, <prefix>thinking_closed}`` of a generation that thought
    first, else nothing."""
    if getattr(gen, "thinking", None) is None:
        return {}
    return {
        f"{prefix}thinking": gen.thinking,
        f"{prefix}thinking_tokens": int(gen.thinking_tokens),
        f"{prefix}thinking_closed": bool(gen.thinking_closed),
    }


def thinking_counts(
    rows: Sequence[Mapping[str, Any]], prefixes: Sequence[str] = ("",)
) -> dict[str, int] | None:
    """The thinking blocks under ``prefixes`` of ``rows``: how many, how many ran out of the budget (closed
    for the model, so what follows them answers a cut reasoning), the tokens spent; None: no row thought."""
    blocks = [r[f"{p}thinking_closed"] for r in rows for p in prefixes if f"{p}thinking_closed" in r]
    if not blocks:
        return None
    return {
        "blocks": len(blocks),
        "unterminated": sum(1 for closed in blocks if not closed),
        "tokens": sum(int(r.get(f"{p}thinking_tokens", 0)) for r in rows for p in prefixes),
    }


def thinking_warnings(per_stage: Mapping[str, Mapping[str, int]]) -> list[str]:
    """One warning per stage whose thinking ran out of the budget."""
    return [
        f"{t['unterminated']} of {t['blocks']} thinking blocks of the {stage} stage ran out of "
        "bootstrap.thinking_max_new_tokens and were closed for the model (thinking_closed: false in their "
        "rows): what follows them answers a cut reasoning; raise the budget to let the model finish"
        for stage, t in per_stage.items()
        if t["unterminated"]
    ]
