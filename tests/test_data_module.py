"""PrismDataModule over a tiny bootstrap: batch schema, stratified split, refusals."""

from __future__ import annotations

import pytest
import torch

from prism_lightning.backbone import BackboneConfig
from prism_lightning.bootstrap import run_bootstrap
from prism_lightning.bootstrap.teacher import load_teacher_targets
from prism_lightning.data import EmptySplitError, PrismDataModule, stratified_split, three_way_split
from prism_lightning.errors import ConfigError
from prism_lightning.testing import tiny_bootstrap_config

TRAINER = {"accelerator": "cpu", "enable_progress_bar": False}


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("data") / "run"
    backbone = BackboneConfig(model=str(tiny_model_dir))
    return run_bootstrap(tiny_bootstrap_config(), backbone, run_dir, TRAINER), backbone


def make_dm(result, backbone, **kwargs) -> PrismDataModule:
    kwargs = {"batch_size": 3, "val_fraction": 0.34, **kwargs}
    return PrismDataModule(
        str(result.run_dir), bootstrap=tiny_bootstrap_config(), backbone=backbone, **kwargs
    )


def test_batches_match_the_schema(tiny_run, tiny_backbone):
    result, backbone = tiny_run
    dm = make_dm(result, backbone)
    dm.prepare_data()
    dm.setup("fit")
    verdicts = {r["query"]: r for r in result.rows("verdicts")}
    targets = load_teacher_targets(result.stage_dirs["teacher"], result.rows("teacher"))
    tok, fmt = tiny_backbone.tokenizer, tiny_backbone.formatter
    seen = 0
    assert len(dm.test_set) > 0  # the default test split
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for batch in loader:
            b, t = batch["input_ids"].shape
            r, k = batch["teacher_values"].shape[1:]
            assert k == 8 and r == int(batch["response_lengths"].max())
            assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].shape == (b, t)
            assert batch["gate_target"].dtype == torch.float32 and batch["teacher_mask"].dtype == torch.bool
            assert (
                batch["teacher_indices"].dtype == torch.long
                and batch["teacher_values"].dtype == torch.float32
            )
            total = batch["prompt_lengths"] + batch["response_lengths"]
            assert torch.equal(batch["attention_mask"].sum(1), total)
            for i in range(b):
                p = int(batch["prompt_lengths"][i])
                prompt_text = tok.decode(batch["input_ids"][i, :p])
                query = next(q for q in verdicts if prompt_text == fmt.prompt(q))  # no persona in the prompt
                row = verdicts[query]
                assert batch["gate_target"][i] == row["gate_target"]
                n_mask = int(batch["teacher_mask"][i].sum())
                if row["gate_target"]:
                    n = int(batch["response_lengths"][i])
                    assert n_mask == n
                    stored = targets[row["id"]]
                    assert torch.equal(batch["input_ids"][i, p : p + n], stored["response_ids"][:n].long())
                    assert torch.equal(batch["teacher_values"][i, :n], stored["values"][:n].float())
                else:
                    assert n_mask == 0 and batch["teacher_values"][i].abs().sum() == 0
                seen += 1
    assert seen == len(verdicts)
    counts = dm.class_counts
    labels = [r["gate_target"] for r in verdicts.values()]
    held = {k: dm.split_summary["val"][k] + dm.split_summary["test"][k] for k in ("distill", "retain")}
    assert counts["distill"] + held["distill"] == sum(labels)
    assert counts["retain"] + held["retain"] == len(labels) - sum(labels)


def test_stratified_split():
    labels = [1] * 4 + [0] * 11
    train, val = stratified_split(labels, 0.2, seed=3)
    assert sorted(train + val) == list(range(15)) and not set(train) & set(val)
    assert sum(labels[i] for i in val) == 1 and sum(1 - labels[i] for i in val) == 2
    assert (train, val) == stratified_split(labels, 0.2, seed=3)
    _, val_small = stratified_split([1, 1, 0, 0, 0], 0.1, seed=0)  # each class still shows up in val
    assert sorted(labels_of(val_small, [1, 1, 0, 0, 0])) == [0, 1]
    train_one, val_one = stratified_split([1, 0, 0], 0.5, seed=0)
    assert 0 in train_one  # a single-row class stays in train


def test_three_way_split_keeps_the_validation_rows_and_takes_test_rows_from_train():
    labels = [1] * 10 + [0] * 30
    train, val = stratified_split(labels, 0.2, seed=3)
    train3, val3, test3 = three_way_split(labels, 0.2, 0.1, seed=3)
    assert val3 == val  # the validation split (what early stopping selects on) is unchanged
    assert sorted(train3 + test3) == train and not set(test3) & set(train3)
    assert sorted(labels_of(test3, labels)) == [0, 0, 0, 1]  # stratified: 10% of each class
    assert three_way_split(labels, 0.2, 0.0, seed=3) == (train, val, [])
    # small classes: a class of >= 3 rows gives one test row; train always keeps one of each class
    small = [1, 1, 1, 0, 0]
    train_s, _, test_s = three_way_split(small, 0.2, 0.1, seed=0)
    assert labels_of(test_s, small) == [1] and sorted(set(labels_of(train_s, small))) == [0, 1]


def test_test_fraction_is_checked():
    with pytest.raises(ConfigError, match="test_fraction must be in"):
        PrismDataModule(test_fraction=1.0)
    with pytest.raises(ConfigError, match="val_fraction \\+ data.test_fraction must be < 1"):
        PrismDataModule(val_fraction=0.6, test_fraction=0.4)


def labels_of(idx, labels):
    return [labels[i] for i in idx]


def test_truncation_cuts_response_first(tiny_run):
    result, backbone = tiny_run
    dm = make_dm(result, backbone, max_length=40, val_fraction=0.0)
    dm.setup("fit")
    for batch in dm.train_dataloader():
        assert batch["attention_mask"].sum(1).max() <= 40
        assert torch.all(batch["response_lengths"] >= 1)


def test_empty_distill_set_is_refused_with_the_split(tiny_run, tmp_path):
    import shutil

    result, backbone = tiny_run
    run_dir = tmp_path / "run"
    shutil.copytree(result.run_dir, run_dir)
    strict = tiny_bootstrap_config(verdict_rule="strict")  # the tiny model's free text never parses
    run_bootstrap(strict, backbone, run_dir, TRAINER)
    dm = PrismDataModule(str(run_dir), bootstrap=strict, backbone=backbone)
    with pytest.raises(EmptySplitError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert "distill set is empty" in message and "math" in message and "verdict_rule" in message


def test_setup_refuses_an_unfinished_bootstrap(tiny_model_dir, tmp_path):
    dm = PrismDataModule(
        str(tmp_path / "nothing"),
        bootstrap=tiny_bootstrap_config(),
        backbone=BackboneConfig(str(tiny_model_dir)),
    )
    with pytest.raises(RuntimeError, match="not finished"):
        dm.setup("fit")


def test_trainer_fit_from_python_exports_through_the_callback(tiny_run, tmp_path):
    """The Python API: Trainer.fit(PrismModule, PrismDataModule) with PrismExport writes a checkpoint that
    loads and routes, like the CLI's fit."""
    import lightning as L

    from prism_lightning import PrismExport, PrismModule, load_checkpoint

    result, backbone = tiny_run
    module = PrismModule(backbone=backbone, lora_rank=4, gate_hidden=[16])
    export = PrismExport(str(tmp_path / "ckpt"))
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[export],
    )  # fmt: skip
    dm = make_dm(result, backbone)
    trainer.fit(module, dm)
    assert export.exported == tmp_path / "ckpt"
    routed = load_checkpoint(export.exported, device="cpu")
    assert routed.meta["personas"] == ["math", "writing"]
    assert routed.meta["training_config"]["exported_from"]["weights"] == "last"
    assert 0.0 <= routed.gate_probs(["What is 2+2?"])[0] <= 1.0
    # the test-split score in prism.json is the exported gate's, on the test rows' queries
    test = routed.meta["training_config"]["metrics"]["test"]
    queries = {r["id"]: r["query"] for r in result.rows("verdicts")}
    rows = list(dm.test_set)
    assert test["rows"] == len(rows) >= 1
    probs = routed.gate_probs([queries[ex["id"]] for ex in rows])
    right = [
        (p >= routed.meta["threshold"]) == bool(ex["gate_target"]) for p, ex in zip(probs, rows, strict=True)
    ]
    assert test["gate_acc"]["mean"] == pytest.approx(sum(right) / len(rows))


def test_export_from_best_needs_a_monitored_checkpoint(tiny_run, tmp_path):
    import lightning as L

    from prism_lightning import PrismError, PrismExport, PrismModule

    result, backbone = tiny_run
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        callbacks=[PrismExport(str(tmp_path / "ckpt"), export_from="best")],
    )  # fmt: skip
    with pytest.raises(PrismError, match="export_from=best needs a ModelCheckpoint"):
        trainer.fit(PrismModule(backbone=backbone, lora_rank=4, gate_hidden=[16]), make_dm(result, backbone))


def test_teacher_tensors_that_disagree_with_their_row_are_refused(tiny_run):
    from prism_lightning import PrismError

    result, _ = tiny_run
    rows = [dict(r) for r in result.rows("teacher")]
    assert rows, "the tiny bootstrap made no teacher rows"
    assert set(load_teacher_targets(result.stage_dirs["teacher"], rows)) == {r["id"] for r in rows}
    rows[0]["n_tokens"] += 1  # the row and its tensors no longer agree
    with pytest.raises(PrismError, match=f"teacher tensors of row {rows[0]['id']}"):
        load_teacher_targets(result.stage_dirs["teacher"], rows)


def test_length_grouping_keeps_every_training_row_and_pads_no_more(tiny_run):
    result, backbone = tiny_run
    free = make_dm(result, backbone, batch_size=2, val_fraction=0.2)
    grouped = make_dm(result, backbone, batch_size=2, val_fraction=0.2, length_grouping=8)
    for dm in (free, grouped):
        dm.setup("fit")

    def rows_and_pads(dm):
        rows, pads = [], 0
        for batch in dm.train_dataloader():
            rows += [
                tuple(ids[m.bool()].tolist())
                for ids, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)
            ]
            pads += int((batch["attention_mask"] == 0).sum())
        return sorted(rows), pads

    free_rows, free_pads = rows_and_pads(free)
    grouped_rows, grouped_pads = rows_and_pads(grouped)
    assert grouped_rows == free_rows and grouped_pads <= free_pads
    assert rows_and_pads(grouped) == (
        grouped_rows,
        grouped_pads,
    )  # the same order for the same seed and epoch
    with pytest.raises(ConfigError, match="length_grouping"):
        make_dm(result, backbone, length_grouping=-1)
