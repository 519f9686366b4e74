"""Stage 5's teacher targets: top-k logits of the persona-prompted base model over the persona answer.

For each distill row: prompt ids = ``formatter.prompt(query, persona_text, placement)`` (tokenized
without added special tokens), response ids = :func:`response_token_ids` of the persona reply
(:func:`~prism_lightning.bootstrap.answers.full_reply`: a reasoning model's thinking block, then the answer;
tokens + the chat end-of-turn token, truncated). One pass of the adapter-free base model over
prompt + response on its engine (:meth:`~prism_lightning.engines.base.Engine.prompt_topk`); the
distributions at positions ``len(prompt)-1 ... len(prompt)+n-2`` (those predicting the n response
tokens) are reduced to their top-k (hf: logits; vLLM: log-probabilities).

Row: ``{"id", "persona", "n_tokens", "prompt_tokens", "top_k", "tensor_file"}``; the tensors live in
safetensors files in the stage directory under keys ``"<id>.values"`` (float16, (n, k)),
``"<id>.indices"`` (int32, (n, k)) and ``"<id>.response_ids"`` (int32, (n,)).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from prism_lightning.bootstrap.answers import chosen_row, full_reply
from prism_lightning.bootstrap.stage import TENSORS_KEY, StageTask
from prism_lightning.contexts import Context
from prism_lightning.engines.base import Engine
from prism_lightning.engines.hf import topk_over_response
from prism_lightning.errors import PrismError
from prism_lightning.generation import END_OF_TURN_TOKENS

__all__ = [
    "TeacherTask",
    "end_of_turn_id",
    "finalize_teacher",
    "load_teacher_targets",
    "prompt_token_ids",
    "response_token_ids",
    "teacher_jobs",
    "teacher_row",
    "topk_over_response",
]


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template puts after an assistant message (e.g. <|im_end|>), else EOS."""
    marker = "PRISM-END-PROBE"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], tokenize=False
        )
        tail = text.split(marker, 1)[1]
        ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail.strip() else []
        if ids and ids[0] in set(tokenizer.all_special_ids):
            return int(ids[0])
    except Exception:  # templates without an assistant role etc.
        pass
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab:
            return int(vocab[token])
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither an end-of-turn token nor an EOS token")
    return int(tokenizer.eos_token_id)


def response_token_ids(tokenizer, text: str, max_tokens: int, eot_id: int | None = None) -> list[int]:
    """Answer tokens followed by the end-of-turn token, truncated to ``max_tokens``. Shared by the
    teacher and the student rows, so both see exactly the same response tokens."""
    eot = end_of_turn_id(tokenizer) if eot_id is None else eot_id
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [eot]
    return ids[:max_tokens]


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def teacher_jobs(
    formatter,
    distill_rows: Sequence[Mapping[str, Any]],
    answers: Mapping[str, Mapping[str, Any]],
    personas: Mapping[str, Context],
    length: str,
    placement: str,
) -> list[dict[str, Any]]:
    return [
        {
            "id": r["id"],
            "persona": r["persona"],
            "prompt": formatter.prompt(r["query"], personas[r["persona"]].text(length), placement),
            "response": full_reply(
                chosen_row(answers[r["id"]], r), "persona", getattr(formatter, "thinking", None)
            ),
        }
        for r in distill_rows
    ]


class TeacherTask(StageTask):
    """The teacher's top-k over each distill row's response, on the base model's engine (adapter off)."""

    def __init__(self, engine: Engine, top_k: int, max_response_tokens: int) -> None:
        super().__init__()
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.top_k = top_k
        self.max_response_tokens = max_response_tokens
        self.eot = end_of_turn_id(engine.tokenizer)

    def process(self, jobs):
        pairs = [
            (
                prompt_token_ids(self.tokenizer, job["prompt"]),
                response_token_ids(self.tokenizer, job["response"], self.max_response_tokens, self.eot),
            )
            for job in jobs
        ]
        tops = self.engine.prompt_topk(pairs, self.top_k)
        return [
            teacher_row(job, prompt_ids, response_ids, values, indices)
            for job, (prompt_ids, response_ids), (values, indices) in zip(jobs, pairs, tops, strict=True)
        ]


def teacher_row(
    job: Mapping[str, Any],
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    values: torch.Tensor,
    indices: torch.Tensor,
) -> dict:
    """One teacher row with its tensors, in the format training reads whichever engine made it."""
    return {
        "id": job["id"],
        "persona": job["persona"],
        "n_tokens": len(response_ids),
        "prompt_tokens": len(prompt_ids),
        "top_k": int(values.shape[-1]),
        TENSORS_KEY: {
            f"{job['id']}.values": values,
            f"{job['id']}.indices": indices,
            f"{job['id']}.response_ids": torch.tensor(response_ids, dtype=torch.int32),
        },
    }


def load_teacher_targets(
    stage_dir: str | Path, rows: Sequence[Mapping[str, Any]]
) -> dict[str, dict[str, torch.Tensor]]:
    """{id: {"values", "indices", "response_ids"}} for the given teacher rows (files opened once each)."""
    from safetensors import safe_open

    out: dict[str, dict[str, torch.Tensor]] = {}
    by_file: dict[str, list[str]] = {}
    for r in rows:
        by_file.setdefault(r["tensor_file"], []).append(r["id"])
    for name, ids in by_file.items():
        with safe_open(str(Path(stage_dir) / name), framework="pt") as fh:
            for i in ids:
                out[i] = {key: fh.get_tensor(f"{i}.{key}") for key in ("values", "indices", "response_ids")}
    for r in rows:  # the row says what its tensors must look like; a mismatch is a damaged stage
        got, want = out[r["id"]], (int(r["n_tokens"]), int(r["top_k"]))
        shapes = {k: tuple(v.shape) for k, v in got.items()}
        if shapes != {"values": want, "indices": want, "response_ids": want[:1]}:
            raise PrismError(
                f"teacher tensors of row {r['id']} in {stage_dir} have shapes {shapes}, the row says "
                f"{want[0]} tokens x top {want[1]}: delete {stage_dir} and rerun to recompute the stage."
            )
    return out


def finalize_teacher(rows):
    return rows, {"rows": len(rows), "response_tokens": sum(r["n_tokens"] for r in rows)}
