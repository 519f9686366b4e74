"""Stage 1 stops a query at its first line break without losing the text before it, also when the
tokenizer merges punctuation and the break into one token ("?\\n", ":\\n", ".\\n": Qwen2.5, Llama 3)."""

from __future__ import annotations

import pytest
import torch

from prism_lightning.bootstrap.queries import QueryTask, finalize_queries, first_line, line_break_token_ids
from prism_lightning.engines.hf import HFEngine
from prism_lightning.generation import SamplingConfig
from prism_lightning.testing import build_tiny_model, build_tiny_tokenizer

# What the "model" writes for each job: a first line ending in a merged token, then more lines.
SCRIPTS = [
    "What is twelve times seven?\nWrite a short poem about the sea.",
    "Here, my question:\nB",
    "Explain how plants work.\n\nOutput",
]
EXPECTED = ["What is twelve times seven?", "Here, my question:", "Explain how plants work."]


@pytest.fixture(scope="module")
def merged_tokenizer():
    return build_tiny_tokenizer(merged_newlines=True)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tokenizer_has_merged_line_break_tokens(merged_tokenizer):
    text = SCRIPTS[0] + "\nHere is a question:\n"
    tokens = [merged_tokenizer.decode([i]) for i in _ids(merged_tokenizer, text)]
    assert "?\n" in tokens and ":\n" in tokens
    assert ".\n" in [merged_tokenizer.decode([i]) for i in _ids(merged_tokenizer, SCRIPTS[2])]
    leading, merged = line_break_token_ids(merged_tokenizer)
    by_text = {merged_tokenizer.decode([i]): i for i in leading + merged}
    assert {by_text["?\n"], by_text[":\n"], by_text[".\n"]} <= set(merged)
    assert by_text["\n"] in leading and not set(leading) & set(merged)


@pytest.mark.parametrize("script, expected", list(zip(SCRIPTS, EXPECTED, strict=True)))
def test_first_line_keeps_the_text_of_the_token_that_holds_the_break(merged_tokenizer, script, expected):
    assert first_line(merged_tokenizer, _ids(merged_tokenizer, script)) == expected


class _Script:
    """A forward hook that makes a random model write SCRIPTS[row]: the prefill picks each row's first
    token; after that each token's successor comes from a table, so rows that finish and leave the
    running batch do not disturb the others (the scripts share no token)."""

    def __init__(self, tokenizer, end_id: int) -> None:
        self.scripts = [_ids(tokenizer, s) for s in SCRIPTS]
        flat = [t for s in self.scripts for t in s]
        assert len(flat) == len(set(flat)), "scripts must not share tokens"
        self.next = {a: b for s in self.scripts for a, b in zip(s, s[1:], strict=False)}
        self.next.update({s[-1]: end_id for s in self.scripts})
        self.calls = 0

    def __call__(self, module, args, kwargs, output):
        self.calls += 1
        last = kwargs["input_ids"][:, -1].tolist()
        picks = [s[0] for s in self.scripts] if self.calls == 1 else [self.next[t] for t in last]
        output.logits[:, -1] = -1e4
        output.logits[torch.arange(len(picks)), -1, torch.tensor(picks)] = 1e4
        return output


def _run_stage(tokenizer, **task_kwargs) -> list[dict]:
    """QueryTask.process on a tiny random model made to write SCRIPTS (one job per script)."""
    model = build_tiny_model(len(tokenizer), layers=2).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    handle = model.register_forward_hook(_Script(tokenizer, tokenizer.eos_token_id), with_kwargs=True)
    try:
        engine = HFEngine(model, tokenizer, None)
        task = QueryTask(engine, SamplingConfig(max_new_tokens=40), seed=0, **task_kwargs)
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Write one question."}], tokenize=False, add_generation_prompt=True
        )
        jobs = [{"id": f"math-{i}", "persona": "math", "index": i, "prompt": prompt} for i in range(3)]
        return task.process(jobs)
    finally:
        handle.remove()


def test_query_stage_keeps_punctuation_and_drops_headings(merged_tokenizer):
    rows = _run_stage(merged_tokenizer)
    assert [r["raw"] for r in rows] == EXPECTED
    assert [r["finish"] for r in rows] == ["stop"] * 3
    # each row ended right after its first line: the merged token is its last generated token
    first_lines = [_ids(merged_tokenizer, s.split("\n")[0] + "\n") for s in SCRIPTS]
    assert [r["tokens"] for r in rows] == [len(ids) for ids in first_lines]
    kept, stats = finalize_queries(rows, min_chars=5, persona_names=["math"])
    assert [r["query"] for r in kept] == [EXPECTED[0], EXPECTED[2]]
    assert stats["dropped_by_reason"]["math"]["not_a_query"] == 1


def test_without_stop_at_newline_the_whole_text_is_kept(merged_tokenizer):
    rows = _run_stage(merged_tokenizer, stop_at_newline=False)
    assert [r["raw"] for r in rows] == [s.strip() for s in SCRIPTS]
