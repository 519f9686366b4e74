"""Training rows for joint gate + LoRA training, built from a finished bootstrap.

One example per judged query:

* distill (gate target 1): response = the persona answer, with the teacher's top-k logits;
* retain (gate target 0): response = the base answer, no teacher targets.

The student prompt is ``formatter.prompt(query)``: no persona, exactly what inference sees.

Batch schema (:func:`collate_examples`)::

    input_ids        LongTensor (B, T)     right-padded: student prompt ids + response ids
    attention_mask   LongTensor (B, T)
    prompt_lengths   LongTensor (B,)       prompt tokens; the gate reads the hidden state at prompt_lengths-1
    response_lengths LongTensor (B,)
    gate_target      FloatTensor (B,)      1.0 distill / 0.0 retain
    persona_index    LongTensor (B,)       the row's persona in ``PrismDataModule.persona_names`` (-1:
                                           unknown); K-way routing maps it to the adapter holding it
    teacher_values   FloatTensor (B, R, K) teacher top-k logits (float32); zeros where absent
    teacher_indices  LongTensor (B, R, K)
    teacher_mask     BoolTensor (B, R)     True where a teacher target exists (distill rows, real tokens)

R = the longest response in the batch, K = ``bootstrap.teacher_top_k``. Student logits at position
``prompt_lengths[b] - 1 + j`` predict response token ``j``. Sequences longer than ``max_length`` lose
response tokens first (teacher targets are cut the same way), then prompt tokens from the left.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from prism_lightning import run_paths
from prism_lightning.backbone import BackboneConfig
from prism_lightning.bootstrap.answers import full_reply
from prism_lightning.bootstrap.config import BootstrapConfig
from prism_lightning.bootstrap.runner import resolve_personas, run_bootstrap, stage_stores
from prism_lightning.bootstrap.stage import dist_ready
from prism_lightning.bootstrap.teacher import end_of_turn_id, load_teacher_targets, response_token_ids
from prism_lightning.data.length_sampler import LengthGroupedSampler
from prism_lightning.errors import ConfigError, PrismError, require
from prism_lightning.files import read_input_jsonl

log = logging.getLogger(__name__)


class EmptySplitError(PrismError, ValueError):
    """The bootstrap produced no distill rows or no retain rows: training needs both."""


class PrismExamples(Dataset):
    """Tokenized training examples (see the module docstring); items are dicts of tensors."""

    def __init__(self, examples: Sequence[Mapping[str, Any]]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Mapping[str, Any]:
        return self.examples[i]


def split_table(verdicts: Sequence[Mapping[str, Any]], key: str = "gate_target") -> str:
    per: dict[str, list[int]] = {}
    for r in verdicts:
        per.setdefault(r["persona"], [0, 0])[0 if r[key] else 1] += 1
    lines = [f"  {'persona':<18}{'distill':>8}{'retain':>8}"]
    lines += [f"  {p:<18}{d:>8}{r:>8}" for p, (d, r) in per.items()]
    lines.append(f"  {'total':<18}{sum(v[0] for v in per.values()):>8}{sum(v[1] for v in per.values()):>8}")
    return "\n".join(lines)


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, val indices), stratified by label; val gets >= 1 of a class that has >= 2 rows."""
    train, val, _ = three_way_split(labels, val_fraction, 0.0, seed)
    return train, val


def three_way_split(
    labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """(train, val, test indices), stratified by label. Val is drawn exactly as :func:`stratified_split`
    draws it (same rows for the same seed), test from the rows after it, so a test split takes rows from
    train only: >= 1 of a class that has >= 3 rows, and train keeps >= 1 of every class."""
    rng = random.Random(seed)
    train: list[int] = []
    val: list[int] = []
    test: list[int] = []
    for label in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(idx)
        n_val = round(len(idx) * val_fraction) if val_fraction > 0 else 0
        if val_fraction > 0 and len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        n_test = round(len(idx) * test_fraction) if test_fraction > 0 else 0
        if test_fraction > 0 and len(idx) >= 3:
            n_test = max(n_test, 1)
        n_test = max(0, min(n_test, len(idx) - n_val - 1))
        val += idx[:n_val]
        test += idx[n_val : n_val + n_test]
        train += idx[n_val + n_test :]
    return sorted(train), sorted(val), sorted(test)


def build_example(
    prompt_ids: list[int],
    response_ids: list[int],
    gate_target: int,
    teacher: Mapping[str, torch.Tensor] | None,
    max_length: int,
    row_id: str = "",
    persona_index: int = -1,
) -> dict[str, Any]:
    if len(prompt_ids) >= max_length:  # keep at least one response token; inference would see more
        log.warning(
            "prompt of %s has %d tokens >= max_length %d; cutting it from the left",
            row_id,
            len(prompt_ids),
            max_length,
        )
        prompt_ids = prompt_ids[-(max_length - 1) :]
    n = min(len(response_ids), max_length - len(prompt_ids))
    example = {
        "id": row_id,
        "input_ids": torch.tensor(prompt_ids + response_ids[:n], dtype=torch.long),
        "prompt_length": len(prompt_ids),
        "response_length": n,
        "gate_target": float(gate_target),
        "persona_index": int(persona_index),
        "teacher_values": None,
        "teacher_indices": None,
    }
    if teacher is not None:
        example["teacher_values"] = teacher["values"][:n].float()
        example["teacher_indices"] = teacher["indices"][:n].long()
    return example


def collate_examples(batch: Sequence[Mapping[str, Any]], pad_id: int, top_k: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into the batch schema of the module docstring."""
    b = len(batch)
    t = max(len(ex["input_ids"]) for ex in batch)
    r = max(max(ex["response_length"] for ex in batch), 1)
    k = max([top_k] + [ex["teacher_values"].shape[-1] for ex in batch if ex["teacher_values"] is not None])
    out = {
        "input_ids": torch.full((b, t), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((b, t), dtype=torch.long),
        "prompt_lengths": torch.tensor([ex["prompt_length"] for ex in batch], dtype=torch.long),
        "response_lengths": torch.tensor([ex["response_length"] for ex in batch], dtype=torch.long),
        "gate_target": torch.tensor([ex["gate_target"] for ex in batch], dtype=torch.float32),
        "persona_index": torch.tensor([ex.get("persona_index", -1) for ex in batch], dtype=torch.long),
        "teacher_values": torch.zeros((b, r, k), dtype=torch.float32),
        "teacher_indices": torch.zeros((b, r, k), dtype=torch.long),
        "teacher_mask": torch.zeros((b, r), dtype=torch.bool),
    }
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        out["input_ids"][i, :n] = ex["input_ids"]
        out["attention_mask"][i, :n] = 1
        if ex["teacher_values"] is not None:
            m, kk = ex["teacher_values"].shape
            out["teacher_values"][i, :m, :kk] = ex["teacher_values"]
            out["teacher_indices"][i, :m, :kk] = ex["teacher_indices"]
            out["teacher_mask"][i, :m] = True
    return out


def accumulation_for(global_batch_size: int, batch_size: int, world_size: int) -> int:
    """Micro-batches per optimiser step that make ``global_batch_size`` rows with ``batch_size`` rows per
    process and ``world_size`` processes; a :class:`ConfigError` naming what would divide when none does."""
    per_step = batch_size * world_size
    if global_batch_size % per_step == 0:
        return global_batch_size // per_step
    per_process = global_batch_size // world_size if global_batch_size % world_size == 0 else 0
    fits = [b for b in range(1, per_process + 1) if per_process % b == 0]
    if fits:
        hint = f"set data.batch_size to {' or '.join(map(str, fits))}, or "
    else:
        hint = f"no data.batch_size divides it over {world_size} processes; "
    raise ConfigError(
        f"data.global_batch_size={global_batch_size} is not a multiple of data.batch_size ({batch_size}) "
        f"x world size ({world_size}) = {per_step}: {hint}"
        f"set data.global_batch_size to a multiple of {per_step}."
    )


def load_tokenizer_and_formatter(backbone: BackboneConfig):
    """Tokenizer + chat formatter of a backbone without loading its weights."""
    from transformers import AutoTokenizer

    from prism_lightning.backbone import prepare_tokenizer, resolve_model_source
    from prism_lightning.chat_format import ChatFormatter

    source = resolve_model_source(backbone.model)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=backbone.trust_remote_code)
    prepare_tokenizer(tokenizer)
    return tokenizer, ChatFormatter(tokenizer, base_system_prompt=backbone.base_system_prompt)


class PrismDataModule(L.LightningDataModule):
    """Train/val rows (prompt without persona + response + teacher targets + gate target).

    ``prepare_data`` runs the bootstrap when it is not finished yet (outside a distributed run; it
    is a no-op when cached). ``setup`` reads the finished stages, tokenizes, and splits train/val
    stratified by gate target with ``seed``. Refuses (:class:`EmptySplitError`) when either class is
    empty.

    Args:
        run_dir: the run directory: bootstrap stages, summary, W&B files, Lightning checkpoints and the
            saved config all go under it, so one directory holds one run.
        bootstrap: how the training rows are made (see BootstrapConfig).
        backbone: linked from model.backbone; set it there.
        batch_size: training rows per device and micro-batch.
        global_batch_size: training rows per optimiser step over all processes; the trainer's
            accumulate_grad_batches is derived from it (global / (batch_size x world size), which must
            divide exactly), so the step count does not depend on the number of GPUs. null keeps
            batch_size x trainer.accumulate_grad_batches x world size.
        val_fraction: held-out share of the rows, stratified by gate target, in [0, 1): the validation
            split (the gate's early stopping selects on it, so its scores are not the exported gate's).
        test_fraction: share of the rows held out from training and selection alike, stratified by gate
            target, in [0, 1): the exported gate is scored there once fit ends (accuracy and AUROC with
            bootstrap CIs, in prism.json); 0 keeps no test split (``test`` then scores the validation split).
        max_length: longest prompt + response in tokens; longer rows lose response tokens first.
        num_workers: DataLoader workers.
        seed: seed of the train/validation split and of the training order.
        length_grouping: 0 shuffles the training rows freely; G > 0 puts rows of similar length into the
            same batch (sorted within windows of G batches, see ``LengthGroupedSampler``), so batches
            carry few pad tokens. Each row's loss is unchanged; which rows share a batch changes.
        predict_file: JSONL of {"query": ...} rows for ``predict``.
    """

    def __init__(
        self,
        run_dir: str = "runs/default",
        bootstrap: BootstrapConfig = BootstrapConfig(),
        backbone: BackboneConfig = BackboneConfig(),
        batch_size: int = 8,
        global_batch_size: int | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.1,
        max_length: int = 512,
        num_workers: int = 0,
        seed: int = 0,
        predict_file: str | None = None,
        length_grouping: int = 0,
    ) -> None:
        super().__init__()
        require(0.0 <= val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {val_fraction}.")
        require(0.0 <= test_fraction < 1.0, f"data.test_fraction must be in [0, 1), got {test_fraction}.")
        require(
            val_fraction + test_fraction < 1.0,
            f"data.val_fraction + data.test_fraction must be < 1 (rows must be left to train on), "
            f"got {val_fraction} + {test_fraction}.",
        )
        require(max_length >= 2, f"data.max_length must be >= 2, got {max_length}.")
        require(batch_size >= 1, f"data.batch_size must be >= 1, got {batch_size}.")
        require(num_workers >= 0, f"data.num_workers must be >= 0, got {num_workers}.")
        require(length_grouping >= 0, f"data.length_grouping must be >= 0, got {length_grouping}.")
        require(
            global_batch_size is None or global_batch_size >= 1,
            f"data.global_batch_size must be >= 1 or null, got {global_batch_size}.",
        )
        self.run_dir = run_dir
        self.bootstrap = replace(bootstrap)  # own copies: the defaults are shared objects
        self.backbone = replace(backbone)
        self.batch_size = batch_size
        self.global_batch_size = global_batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.max_length = max_length
        self.num_workers = num_workers
        self.seed = seed
        self.predict_file = predict_file
        self.length_grouping = length_grouping
        self.tokenizer = None
        self.formatter = None
        self.train_set: PrismExamples | None = None
        self.val_set: PrismExamples | None = None
        self.test_set: PrismExamples | None = None
        self.split_summary: dict[str, Any] = {}
        self.distill_per_persona: dict[str, int] = {}  # train split; K-way routing balances its classes

    def _stores(self):
        return stage_stores(self.bootstrap, self.backbone, self.run_dir)

    def ensure_bootstrap(self, trainer_kwargs: dict[str, Any] | None = None) -> None:
        """Run (or reuse) every bootstrap stage on the fit's own devices before training starts."""
        run_bootstrap(self.bootstrap, self.backbone, self.run_dir, trainer_kwargs or {"devices": 1})

    def bootstrap_rows(self, stage: str) -> list[dict[str, Any]]:
        """The finished rows of one bootstrap stage (queries, answers, verdicts, teacher)."""
        return self._stores()[stage].read_rows()

    @property
    def persona_names(self) -> list[str]:
        return [c.name for c in resolve_personas(self.bootstrap)]

    @property
    def bootstrap_summary(self) -> dict[str, Any] | None:
        path = run_paths.bootstrap_summary(self.run_dir)
        return json.loads(path.read_text()) if path.exists() else None

    def prepare_data(self) -> None:
        if self.predict_file:
            return
        stores = self._stores()
        if all(store.is_done() for store in stores.values()):
            return
        if dist_ready():
            raise RuntimeError(
                f"the bootstrap under {self.run_dir} is not finished; run `python -m prism_lightning "
                "bootstrap` with the same config before a distributed fit"
            )
        run_bootstrap(self.bootstrap, self.backbone, self.run_dir, {"devices": 1})

    def apply_global_batch(self, trainer) -> None:
        """Set ``trainer.accumulate_grad_batches`` from ``global_batch_size`` and the trainer's world size
        (nodes x devices, known before the processes start); nothing when it is null."""
        if self.global_batch_size is None:
            return
        world = int(trainer.num_nodes) * int(trainer.num_devices)
        accumulate = accumulation_for(self.global_batch_size, self.batch_size, world)
        if trainer.accumulate_grad_batches not in (1, accumulate):
            log.warning(
                "data.global_batch_size=%d sets accumulate_grad_batches=%d (the configured %d is ignored)",
                self.global_batch_size,
                accumulate,
                trainer.accumulate_grad_batches,
            )
        trainer.accumulate_grad_batches = accumulate

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit" and self.trainer is not None:
            self.apply_global_batch(self.trainer)
        if stage == "predict":
            return
        if self.train_set is not None:
            return
        stores = self._stores()
        unfinished = [name for name, store in stores.items() if not store.is_done()]
        if unfinished:
            raise RuntimeError(
                f"bootstrap stages {unfinished} under {self.run_dir} are not finished; call prepare_data() "
                "or run `python -m prism_lightning bootstrap` with the same config first"
            )
        verdicts = stores["verdicts"].read_rows()
        labels = [int(r["gate_target"]) for r in verdicts]
        n_distill, n_retain = sum(labels), len(labels) - sum(labels)
        if n_distill == 0 or n_retain == 0:
            empty = "distill" if n_distill == 0 else "retain"
            raise EmptySplitError(
                f"cannot train: the {empty} set is empty (verdict_rule={self.bootstrap.verdict_rule!r}).\n"
                f"{split_table(verdicts)}\nTo change it: raise bootstrap.queries_per_persona, use "
                "bootstrap.verdict_rule=logprob (or strict), or try another bootstrap.persona_length / "
                "bootstrap.placement."
            )
        if self.tokenizer is None:
            self.tokenizer, self.formatter = load_tokenizer_and_formatter(self.backbone)
        answers = {r["id"]: r for r in stores["answers"].read_rows()}
        teacher_rows = stores["teacher"].read_rows()
        targets = load_teacher_targets(stores["teacher"].path, teacher_rows)
        eot = end_of_turn_id(self.tokenizer)
        persona_index = {name: i for i, name in enumerate(self.persona_names)}
        examples = []
        for row in verdicts:
            prompt_ids = list(
                self.tokenizer(self.formatter.prompt(row["query"]), add_special_tokens=False)["input_ids"]
            )
            if row["gate_target"]:
                if row["id"] not in targets:
                    raise RuntimeError(
                        f"teacher targets for distill row {row['id']} are missing; rerun bootstrap"
                    )
                teacher = targets[row["id"]]
                response_ids = teacher["response_ids"].tolist()
            else:
                teacher = None
                reply = full_reply(answers[row["id"]], "base", self.formatter.thinking)
                response_ids = response_token_ids(
                    self.tokenizer, reply, self.bootstrap.max_response_tokens, eot
                )
            examples.append(
                build_example(
                    prompt_ids,
                    response_ids,
                    row["gate_target"],
                    teacher,
                    self.max_length,
                    row["id"],
                    persona_index=persona_index.get(row["persona"], -1),
                )
            )
        train_idx, val_idx, test_idx = three_way_split(
            labels, self.val_fraction, self.test_fraction, self.seed
        )
        self.train_set = PrismExamples([examples[i] for i in train_idx])
        self.val_set = PrismExamples([examples[i] for i in val_idx])
        self.test_set = PrismExamples([examples[i] for i in test_idx])
        self.split_summary = {
            name: {"distill": sum(labels[i] for i in idx), "retain": sum(1 - labels[i] for i in idx)}
            for name, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx))
        }
        self.distill_per_persona = {name: 0 for name in self.persona_names}
        for i in train_idx:
            if labels[i]:
                name = verdicts[i]["persona"]
                self.distill_per_persona[name] = self.distill_per_persona.get(name, 0) + 1

    @property
    def class_counts(self) -> dict[str, int]:
        """{"distill": n, "retain": m} on the train split (for class-balanced gate loss)."""
        if self.train_set is None:
            self.setup("fit")
        return dict(self.split_summary["train"])

    def _collate(self, batch):
        return collate_examples(batch, int(self.tokenizer.pad_token_id), self.bootstrap.teacher_top_k)

    def train_dataloader(self) -> DataLoader:
        if self.length_grouping > 0:
            lengths = [len(ex["input_ids"]) for ex in self.train_set]
            sampler = LengthGroupedSampler(lengths, self.batch_size, self.length_grouping, seed=self.seed)
            order = {"sampler": sampler}
        else:
            order = {"shuffle": True, "generator": torch.Generator().manual_seed(self.seed)}
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            collate_fn=self._collate,
            num_workers=self.num_workers,
            **order,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set,
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=self._collate,
            num_workers=self.num_workers,
        )

    def test_dataloader(self) -> DataLoader:
        """The test split (rows neither trained nor selected on); the validation split when it is empty."""
        if not self.test_set:
            return self.val_dataloader()
        return DataLoader(
            self.test_set,
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=self._collate,
            num_workers=self.num_workers,
        )

    def predict_dataloader(self) -> DataLoader:
        """Rows {"id", "query"} of ``predict_file`` (JSONL; "prompt" is accepted for "query")."""
        return DataLoader(self.predict_rows(), batch_size=self.batch_size, shuffle=False, collate_fn=list)

    def predict_rows(self) -> list[dict[str, Any]]:
        """The prompts of ``predict_file``, checked before any model loads (a bad line names its number)."""
        require(
            bool(self.predict_file),
            'predict needs --data.predict_file: a JSONL file with one {"query": ...} per line.',
        )
        rows = []
        for i, row in enumerate(read_input_jsonl(self.predict_file, what="data.predict_file")):
            query = row.get("query", row.get("prompt"))
            require(
                isinstance(query, str) and bool(query.strip()),
                f"{self.predict_file}: row {i + 1} needs a non-empty string field 'query' (or 'prompt').",
            )
            rows.append({"id": row.get("id", i), "query": query})
        require(bool(rows), f"data.predict_file {self.predict_file} has no rows.")
        return rows
