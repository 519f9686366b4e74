"""Program verifiers: code that decides whether the context helped, where its benefit can be checked.

A self-judging 135M model is a coin flip; a fact sheet, a style guide or a tool registry needs no judge,
because whether an answer used it can be checked. A program verifier is any callable
``(query, base_answer, context_answer, context_text) -> "persona" | "base" | "tie"`` named as
``module:function`` in ``data.bootstrap.verifier_programs``. The three below serve the shipped example
contexts (``prism_lightning/contexts/examples/``) and work for any context written the same way.

Each one scores both answers with the same rule and lets the higher score win, so the label says "the
context made the answer better by this measure", exactly the question the self-judge is asked.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from prism_lightning.errors import ConfigError

VERDICTS = ("persona", "base", "tie")
Program = Callable[[str, str, str, str], str]

_STOP = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "can",
        "do",
        "does",
        "for",
        "from",
        "has",
        "have",
        "how",
        "i",
        "in",
        "is",
        "it",
        "its",
        "made",
        "my",
        "of",
        "on",
        "or",
        "our",
        "per",
        "the",
        "this",
        "to",
        "up",
        "we",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "you",
        "your",
    ]
)


def _norm(text: str) -> str:
    """Lower case, thousands separators and spacing removed: "2,340 euros" and "2340euros" compare equal."""
    return re.sub(r"[\s,]+", "", text.lower())


def _stem(word: str) -> str:
    return word.lower()[:5]


def _content_words(text: str) -> set[str]:
    return {
        _stem(w) for w in re.findall(r"[A-Za-z][A-Za-z\-]+", text) if w.lower() not in _STOP and len(w) > 2
    }


@dataclass(frozen=True)
class Fact:
    """One bullet of a fact sheet: the words that say what it is about and the values it states."""

    topic: frozenset[str]
    values: tuple[str, ...]


_VALUE = re.compile(
    r"\d[\d,.]*\s?(?:[A-Za-z%€]+\b)?"  # numbers with their unit: 17.8 kg, 612 Wh, 2,340 euros
    r"|\b[A-Z][A-Za-z0-9]*(?:[\- ][A-Z][A-Za-z0-9]*)+\b"  # names: Orrin Mobility, K9-ASSIST, Fjord Blue
    r"|\b[A-Z]{2,}[0-9]+\b"  # codes: IPX5
    r"|\b[\w.+-]+@[\w.-]+\b"  # addresses
)


def parse_fact_sheet(text: str) -> list[Fact]:
    """The lines of a context that state something checkable, each with its topic words and its values."""
    facts = []
    for line in text.splitlines():
        line = line.strip().removeprefix("-")
        values = tuple(dict.fromkeys(_norm(v) for v in _VALUE.findall(line) if len(_norm(v)) >= 2))
        if values:
            topic = _content_words(_VALUE.sub(" ", line))
            facts.append(Fact(frozenset(topic), values))
    return facts


def facts_stated(answer: str, facts: list[Fact], query: str = "") -> int:
    """How many of ``facts`` the answer states (any one of a fact's values, spacing and case ignored; a
    value the query already holds, such as the product's name, is an echo and does not count)."""
    said, asked = _norm(answer), _norm(query)
    return sum(any(v in said and v not in asked for v in fact.values) for fact in facts)


def fact_sheet(query: str, base_answer: str, context_answer: str, context: str) -> str:
    """The answer that states more of the sheet's facts about what the query asks wins. The facts that
    count are the bullets sharing a topic word with the query; all bullets when no bullet does but the
    query names something the sheet does ("How heavy is the K9?") or says too little to tell ("What
    does it cost?"); none (a tie) when two or more words say what the query is about and the sheet has
    none of them ("How do I boil an egg?"), so reciting the sheet at a question it does not touch gains
    nothing."""
    facts = parse_fact_sheet(context)
    if not facts:
        raise ConfigError(
            "the fact_sheet verifier found no '- ' bullet with a number or a name in the context"
        )
    asked = _content_words(query)
    relevant = [f for f in facts if f.topic & asked]
    if not relevant and (asked & _content_words(context) or len(asked) < 2):
        relevant = facts
    return _winner(facts_stated(base_answer, relevant, query), facts_stated(context_answer, relevant, query))


_AMERICAN = re.compile(
    r"\b(color|colors|organize|organized|meter|meters|kilometer|kilometers|center)\b", re.I
)


def style_rules_followed(answer: str) -> int:
    """How many of the checkable rules of the Orrin Mobility style guide (examples/style_guide.yaml) hold."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", answer.strip()) if s]
    rules = [
        "ride on, the orrin team" in answer.lower(),  # the sign-off
        "!" not in answer,
        re.search(r"\b(users?|customers?)\b", answer, re.I) is None,
        re.search(r"\briders?\b", answer, re.I) is not None,
        _AMERICAN.search(answer) is None,
        bool(sentences) and max(len(s.split()) for s in sentences) < 20,
    ]
    return sum(rules)


def style_guide(query: str, base_answer: str, context_answer: str, context: str) -> str:
    """The answer that follows more of the style guide's checkable rules wins."""
    return _winner(style_rules_followed(base_answer), style_rules_followed(context_answer))


_TOOL = re.compile(r"^\s*-\s*(\w+)\((.*?)\)\s*:", re.S | re.M)


def parse_tool_registry(text: str) -> dict[str, set[str]]:
    """{tool name: its argument names} from "- name(arg: type, ...): ..." lines."""
    return {name: set(re.findall(r"(\w+)\s*:", args)) for name, args in _TOOL.findall(text)}


def tool_call_quality(answer: str, tools: dict[str, set[str]]) -> int:
    """0: no JSON tool call; 1: a JSON object naming a tool; 2: a registered tool; 3: and only its own
    argument names, at least one given."""
    best = 0
    for match in re.finditer(r"\{", answer):
        try:
            call, _ = json.JSONDecoder().raw_decode(answer[match.start() :])
        except json.JSONDecodeError:
            continue
        if not isinstance(call, dict) or "tool" not in call:
            continue
        score = 1
        if call["tool"] in tools:
            score = 2
            args = call.get("arguments")
            if isinstance(args, dict) and args and set(args) <= tools[call["tool"]]:
                score = 3
        best = max(best, score)
    return best


def tool_registry(query: str, base_answer: str, context_answer: str, context: str) -> str:
    """The answer with the better-formed call of a registered tool wins."""
    tools = parse_tool_registry(context)
    if not tools:
        raise ConfigError("the tool_registry verifier found no '- name(arg: type, ...):' line in the context")
    return _winner(tool_call_quality(base_answer, tools), tool_call_quality(context_answer, tools))


def _winner(base_score: float, context_score: float) -> str:
    if context_score > base_score:
        return "persona"
    if base_score > context_score:
        return "base"
    return "tie"


def load_program(spec: str) -> Program:
    """``module:function`` -> the callable; a wrong spec is a :class:`ConfigError` naming what failed."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ConfigError(f"verifier program {spec!r} must be written module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"verifier program {spec!r}: cannot import {module_name} ({err})") from None
    program = getattr(module, name, None)
    if not callable(program):
        raise ConfigError(f"verifier program {spec!r}: {module_name} has no callable {name}")
    return program


def run_program(program: Program, spec: str, query: str, base: str, context_answer: str, context: str) -> str:
    """One verdict; a program that returns something else than persona/base/tie is the user's error."""
    verdict = program(query, base, context_answer, context)
    if verdict not in VERDICTS:
        raise ConfigError(f"verifier program {spec} returned {verdict!r}; it must return one of {VERDICTS}")
    return verdict
