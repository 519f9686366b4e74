"""The prompt texts of the bootstrap: query writing (stage 1) and the pairwise judge (stage 3).

Bump :data:`PROMPT_VERSION` when a text changes: it is part of the stage hashes, so cached stages
that used the old text are recomputed.
"""

from __future__ import annotations

import random

from prism_lightning.contexts import Context

PROMPT_VERSION = 1

#: One hint per query index (cycled) so that N samples for one persona ask for different things.
QUERY_ANGLES: tuple[str, ...] = (
    "a practical, everyday problem",
    "a request to explain a concept clearly",
    "a task that needs careful step-by-step work",
    "a creative or open-ended request",
    "a comparison or a trade-off to weigh",
    "a tricky question where beginners often go wrong",
    "a question from a complete beginner",
    "an advanced question from a specialist",
    "a request to review or improve something",
    "a short, concrete question with a definite answer",
)


#: The angles for a reference context (a fact sheet, a tool registry, a style guide): questions that
#: its users would ask and that need its content.
REFERENCE_ANGLES: tuple[str, ...] = (
    "a question about one specific detail it gives",
    "a question about a number, a limit or a name it states",
    "a practical request that it helps with",
    "a question that compares two things it describes",
    "a question a first-time user would ask",
    "a yes-or-no question whose answer it settles",
    "a request to explain one part of it",
    "a realistic task for an assistant that must follow or use it",
)


def reference_query_prompt_text(context: Context, index: int) -> str:
    """The query-writing message for a reference context: the writer sees the whole text, so the query
    is one that a user of it would ask (a persona's description alone says nothing about a fact sheet)."""
    angle = REFERENCE_ANGLES[index % len(REFERENCE_ANGLES)]
    return (
        f"Here is {context.description}:\n\n{context.text('long')}\n\n"
        "Write one realistic question or request that a user might send to an assistant that has this "
        f"text at hand, one that needs the text to be answered well. Make it {angle}. This is question "
        f"number {index + 1} of a varied set.\n"
        "Reply with the question only, on a single line, with no numbering, quotes or explanation."
    )


def query_prompt_text(context: Context, index: int, persona_length: str | None = None) -> str:
    """The user message asking the base model for ONE query that ``context`` would excel at: from the
    persona's description, or from its text at ``persona_length`` when one is given."""
    if context.kind == "reference":
        return reference_query_prompt_text(context, index)
    angle = QUERY_ANGLES[index % len(QUERY_ANGLES)]
    if persona_length is not None:
        return (
            f"Below is the system prompt of an expert assistant:\n\n{context.text(persona_length)}\n\n"
            "Write one realistic, specific question or request that a user might send to this expert, "
            f"one it would answer exceptionally well. Make it {angle}. This is question number "
            f"{index + 1} of a varied set.\n"
            "Reply with the question only, on a single line, with no numbering, quotes or explanation."
        )
    return (
        f"Write one realistic question or request that a user might send to {context.description}, "
        f"someone skilled in {context.expertise}. It should be something this expert would answer "
        f"exceptionally well. Make it {angle}. This is question number {index + 1} of a varied set.\n"
        "Reply with the question only, on a single line, with no numbering, quotes or explanation."
    )


def examples_query_prompt(formatter, context: Context, index: int, seed: int, shown: int) -> str:
    """The query-writing prompt of ``query_prompt: examples``: the writer's reply is primed with a numbered
    list of ``shown`` of the context's ``example_queries`` (a different draw per row) and it writes the
    next item. A 135M model asked by instruction mostly writes off-topic text; continuing a list it
    stays on the kind of question the examples show."""
    ask, primer = examples_query_parts(context, index, seed, shown)
    return formatter.prompt(ask) + primer


def examples_query_parts(context: Context, index: int, seed: int, shown: int) -> tuple[str, str]:
    """(user message, reply primer) of :func:`examples_query_prompt`: a reasoning model's primer follows its
    thinking block, not the prompt."""
    rng = random.Random(f"{seed}:{context.name}:{index}")
    examples = rng.sample(list(context.example_queries), shown)
    if context.kind == "reference":
        ask = (
            f"Here is {context.description}:\n\n{context.text('long')}\n\n"
            "List questions that people send to an assistant that has this text at hand."
        )
    else:
        who = f"{context.description}, someone skilled in {context.expertise}"
        ask = f"List questions that people send to {who}."
    primed = "".join(f"{k + 1}. {q}\n" for k, q in enumerate(examples))
    return ask, primed + f"{shown + 1}."


JUDGE_TEMPLATE = (
    "Please act as an impartial judge and evaluate the quality of the answers given by two AI "
    "assistants to the user question below. Choose the assistant that answers the question better. "
    "Judge correctness, relevance, helpfulness and clarity. Do not let the length of the answers "
    "influence you, do not favour an answer because of its position, and do not favour a name.\n"
    "Reply with exactly one of: A, B, TIE.\n\n"
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)
#: Appended after the formatted judge prompt (assistant turn), so the next token is the verdict.
JUDGE_PRIMER = "Verdict:"
#: Verdict options and the surface forms whose first token is scored (log-sum-exp over variants).
VERDICT_OPTIONS: dict[str, tuple[str, ...]] = {
    "A": (" A", "A"),
    "B": (" B", "B"),
    "TIE": (" TIE", "TIE", " Tie", " tie"),
}


#: Put before the judge's question when the answers may draw on a reference document (a fact sheet, a
#: tool registry): without it the judge cannot tell a correct detail from an invented one.
JUDGE_REFERENCE = (
    "Both assistants were asked the question below; one of them could read this reference document, which "
    "is correct. Prefer the answer that agrees with it where the question depends on it.\n\n"
    "[The Start of the Reference Document]\n{reference}\n[The End of the Reference Document]\n\n"
)


def judge_prompt_text(question: str, answer_a: str, answer_b: str, reference: str | None = None) -> str:
    text = JUDGE_TEMPLATE.format(question=question, answer_a=answer_a, answer_b=answer_b)
    if reference is None:
        return text
    head, _, rest = text.partition("[User Question]")
    return head + JUDGE_REFERENCE.format(reference=reference) + "[User Question]" + rest


def judge_prompt(formatter, question: str, answer_a: str, answer_b: str, reference: str | None = None):
    """The judge prompt: the judge's chat format with no persona; with ``reference``, the document a
    reference context gave the model is shown to the judge. A local judge's formatter gives a string; an
    endpoint's gives chat messages. The reply is primed with :data:`JUDGE_PRIMER` when it is generated
    (``Engine.generate(reply_start=...)``): after the thinking block of a reasoning judge, never on an
    endpoint (see :class:`~prism_lightning.engines.endpoint.MessagesFormatter`)."""
    return formatter.prompt(judge_prompt_text(question, answer_a, answer_b, reference))
