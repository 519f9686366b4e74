"""The shipped example contexts (fact sheet, tool registry, style guide), the query prompt for reference
contexts, the recall scorer, and the examples end to end on a tiny model: bootstrap, a short fit, export,
then the recall check through benchmarks/context_recall.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from prism_lightning.backbone import BackboneConfig
from prism_lightning.bootstrap.config import BootstrapConfig
from prism_lightning.bootstrap.prompts import REFERENCE_ANGLES, query_prompt_text
from prism_lightning.bootstrap.runner import stage_settings
from prism_lightning.contexts import (
    EXAMPLES,
    Context,
    ContextFileError,
    ContextLibrary,
    example_path,
    load_context_file,
)
from prism_lightning.errors import ConfigError
from prism_lightning.eval.recall import (
    answer_tokens,
    load_recall_set,
    recalled,
    summarize_recall,
)

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- the examples and their configs


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_loads_as_a_reference_context(name, tmp_path, monkeypatch):
    context = load_context_file(example_path(name))[name]
    assert context.kind == "reference"
    assert len(context.text("long").split()) > 60
    # a config names it relative to the package, so it works from any directory
    monkeypatch.chdir(tmp_path)
    library = ContextLibrary.from_config([f"examples/{name}.yaml"])
    assert library.get(name).text("short") == context.text("short")
    BootstrapConfig(personas=[name], context_files=[f"examples/{name}.yaml"])


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_config_selects_its_context(name):
    config = yaml.safe_load((ROOT / "configs" / "contexts" / f"{name}.yaml").read_text())
    bootstrap = config["data"]["bootstrap"]
    assert bootstrap["personas"] == [name]
    assert config["data"]["run_dir"] == f"runs/{name}"
    BootstrapConfig(**bootstrap)  # validates names, files and ranges


def test_fact_sheet_questions_are_answered_by_the_sheet():
    recall_set = load_recall_set(example_path("fact_sheet_questions"))
    assert recall_set.context.name == "fact_sheet" and len(recall_set.questions) >= 12
    sheet = recall_set.context.text("long")
    for q in recall_set.questions:  # the first answer string of each question is in the sheet itself
        assert recalled(sheet, q.answers[:1]), q.question


def test_reference_query_prompt_shows_the_context_and_persona_prompt_is_unchanged():
    sheet = load_context_file(example_path("fact_sheet"))["fact_sheet"]
    prompts = [query_prompt_text(sheet, i) for i in range(len(REFERENCE_ANGLES))]
    assert all(sheet.text("long") in p and sheet.description in p for p in prompts)
    assert {a for a in REFERENCE_ANGLES if any(a in p for p in prompts)} == set(REFERENCE_ANGLES)
    math = ContextLibrary.builtin().get("math")
    persona_prompt = query_prompt_text(math, 0)
    assert math.text("long") not in persona_prompt and math.description in persona_prompt


def test_queries_hash_follows_a_reference_text_but_not_a_persona_text():
    def queries_settings(context):
        return stage_settings(BootstrapConfig(personas="math"), BackboneConfig(), [context])["queries"]

    texts = {"min": "a", "short": "b", "long": "c"}
    ref = Context("doc", texts, "a document", "a document", kind="reference")
    ref2 = Context("doc", {**texts, "long": "changed"}, "a document", "a document", kind="reference")
    assert queries_settings(ref) != queries_settings(ref2)
    persona = Context("p", texts, "a poet", "poems")
    assert queries_settings(persona)["personas"] == [["p", "a poet", "poems"]]  # old cache keys stay valid


def test_judge_sees_a_reference_document_but_not_a_persona_text(tiny_backbone):
    from prism_lightning.bootstrap.runner import judge_references
    from prism_lightning.bootstrap.verdicts import verdict_jobs

    texts = {"min": "the sheet", "short": "the sheet", "long": "OPENS AT 8:15"}
    ref = Context("doc", texts, "a document", "a document", kind="reference")
    math = ContextLibrary.builtin().get("math")
    config = BootstrapConfig(personas="math", persona_length="long")
    answers = [
        {"id": f"{c.name}-0", "persona": c.name, "query": "When?", "persona_answer": "x", "base_answer": "y"}
        for c in (ref, math)
    ]
    jobs = verdict_jobs(tiny_backbone.formatter, answers, judge_references(config, [ref, math]))
    assert all("OPENS AT 8:15" in jobs[0][o] for o in ("order_persona_first", "order_base_first"))
    assert not any(math.text("long") in jobs[1][o] or "Reference Document" in jobs[1][o] for o in jobs[1])
    off = BootstrapConfig(personas="math", persona_length="long", judge_sees_reference=False)
    assert judge_references(off, [ref, math]) == {}

    def verdict_settings(cfg, contexts):
        return stage_settings(cfg, BackboneConfig(), contexts)["verdicts"]

    assert verdict_settings(config, [ref]) != verdict_settings(off, [ref])  # a reference run re-judges
    assert verdict_settings(config, [math]) == verdict_settings(off, [math])  # persona runs keep their hash


def test_plain_text_file_is_a_reference_and_bad_kind_is_an_error(tmp_path):
    txt = tmp_path / "retrieved.txt"
    txt.write_text("The office opens at 8:15.\n")
    assert load_context_file(txt)["retrieved"].kind == "reference"
    bad = tmp_path / "bad.yaml"
    bad.write_text("doc:\n  kind: manual\n  text: hi\n")
    with pytest.raises(ContextFileError, match="kind must be one of persona, reference"):
        load_context_file(bad)


# ---------------------------------------------------------------- the recall scorer


def test_recall_matches_whole_words_and_numbers():
    assert answer_tokens("It weighs 17.8kg, costs €2,340!") == ["it", "weighs", "17.8", "kg", "costs", "2340"]
    assert recalled("It weighs 17.8 KG.", ["17.8 kg"])
    assert recalled("about 17.8kg folded", ["17.8 kg"])
    assert not recalled("It weighs 117.8 kg.", ["17.8 kg"])
    assert not recalled("It weighs 17.85 kg.", ["17.8 kg"])
    assert recalled("The price is 2340 euros.", ["2,340 euros"])
    assert recalled("Rated IPX-5.", ["IPX5"])
    assert not recalled("Made by Orrin.", ["Orrin Mobility"])
    assert recalled("made by orrin mobility", ["Orrin Mobility"])
    assert not recalled("", ["17.8 kg"])


def test_recall_summary_shares():
    rows = []
    for condition, hits in (("base", [0, 0, 0, 0]), ("context", [1, 1, 1, 0]), ("adapter", [1, 1, 0, 0])):
        rows += [
            {"condition": condition, "recalled": bool(h), "route": condition == "adapter", "prompt_tokens": 9}
            for h in hits
        ]
    summary = summarize_recall(rows)
    assert summary["conditions"]["context"]["recall"] == 0.75
    assert summary["recovered_share"] == pytest.approx(2 / 3)
    assert summary["recovered_share_above_base"] == pytest.approx(2 / 3)
    assert summary["conditions"]["adapter"]["routed_on"] == 4


def test_bad_recall_file_is_a_config_error(tmp_path):
    path = tmp_path / "q.yaml"
    sheet = example_path("fact_sheet")
    bad = {"context": "fact_sheet", "context_file": str(sheet), "questions": [{"question": "W?"}]}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"questions\[0\] needs 'answers'"):
        load_recall_set(path)
    path.write_text("context: nope\nquestions: [{question: a, answers: [b]}]\n")
    with pytest.raises(Exception, match="unknown context 'nope'"):
        load_recall_set(path)
    with pytest.raises(ConfigError, match="not found"):
        load_recall_set(tmp_path / "missing.yaml")


def test_context_of_tokens_has_the_asked_size(tiny_backbone, load_benchmark):
    savings = load_benchmark("context_savings")
    tokenizer = tiny_backbone.tokenizer
    for n in (20, 300):
        text = savings.context_of_tokens(tokenizer, n)
        assert abs(len(tokenizer(text, add_special_tokens=False)["input_ids"]) - n) <= 3


# ---------------------------------------------------------------- end to end on a tiny model


@pytest.fixture(scope="module")
def context_checkpoint(tiny_model_dir, tmp_path_factory):
    """All three examples bootstrapped, trained for two epochs and exported, on the tiny model."""
    import lightning as L

    from prism_lightning import PrismDataModule, PrismExport, PrismModule

    work = tmp_path_factory.mktemp("contexts")
    backbone = BackboneConfig(model=str(tiny_model_dir))
    bootstrap = BootstrapConfig(
        personas=list(EXAMPLES),
        context_files=[f"examples/{name}.yaml" for name in EXAMPLES],
        queries_per_persona=4,
        min_query_chars=1,
        query_max_new_tokens=12,
        answer_max_new_tokens=8,
        teacher_top_k=8,
        batch_size=6,
    )
    data = PrismDataModule(run_dir=str(work / "run"), bootstrap=bootstrap, backbone=backbone, batch_size=4)
    module = PrismModule(backbone=backbone, gate_hidden=[16], lora_rank=4, lora_lr=1e-3)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PrismExport(str(work / "export"))],
    )
    trainer.fit(module, data)
    return work


@pytest.mark.slow
def test_examples_bootstrap_train_and_export(context_checkpoint):
    meta = json.loads((context_checkpoint / "export" / "prism.json").read_text())
    assert meta["personas"] == list(EXAMPLES)
    run = context_checkpoint / "run" / "bootstrap"
    queries = [json.loads(line) for line in next(run.glob("queries-*")).joinpath("rows.jsonl").open()]
    assert {q["persona"] for q in queries} <= set(EXAMPLES) and queries


@pytest.mark.slow
def test_recall_script_on_the_tiny_checkpoint(context_checkpoint, tmp_path, capsys, load_benchmark):
    recall_script = load_benchmark("context_recall")
    out = tmp_path / "recall.json"
    recall_script.main(
        ["--checkpoint", str(context_checkpoint / "export"), "--limit", "2", "--max_new_tokens", "4",
         "--json", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "recovered_share" in printed
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["condition"] for r in rows] == ["base"] * 2 + ["context"] * 2 + ["adapter"] * 2 + ["gated"] * 2
    by = {c: [r for r in rows if r["condition"] == c] for c in ("base", "context", "adapter")}
    assert all(r["route"] for r in by["adapter"]) and not any(r["route"] for r in by["base"] + by["context"])
    sheet = load_context_file(example_path("fact_sheet"))["fact_sheet"].text("long")
    sheet_tokens = len(answer_tokens(sheet))
    for base_row, ctx_row in zip(by["base"], by["context"], strict=True):  # the context is in the prompt
        assert ctx_row["prompt_tokens"] - base_row["prompt_tokens"] > sheet_tokens / 2
    assert set(result["summary"]["conditions"]) == {"base", "context", "adapter", "gated"}


def test_prefix_cache_gives_the_prompts_own_logits(tiny_backbone, load_benchmark):
    """Serving the context from a prefix KV cache (benchmarks/context_savings.py) changes no next-token
    logit: the shared prefix is prefilled once, each query's suffix against it, pads between the two."""
    import torch

    savings = load_benchmark("context_savings")
    model, tokenizer, formatter = tiny_backbone.model.eval(), tiny_backbone.tokenizer, tiny_backbone.formatter
    context = savings.context_of_tokens(tokenizer, 60)
    queries = ["What is the frame made of?", "Who?", "How long does the battery last on a cold day?"]
    split = savings.split_prefix(tokenizer, formatter, context, queries)
    full = [formatter.prompt(q, context, "system") for q in queries]
    rows = [list(r) for r in tokenizer(full, add_special_tokens=False)["input_ids"]]
    assert all(row == split.prefix + suffix for row, suffix in zip(rows, split.suffixes, strict=True))
    assert len({len(s) for s in split.suffixes}) > 1  # the suffixes need padding
    assert not any(tokenizer.decode(split.prefix).endswith(q[:1]) for q in queries)

    cache = savings.prefix_cache(model, split.prefix, "cpu")
    config = model.config
    assert savings._cache_bytes(cache) == savings.kv_bytes_per_token(config, torch.float32) * len(
        split.prefix
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    got = savings.suffix_forward(model, cache, len(split.prefix), split.suffixes, pad, "cpu")
    with torch.no_grad():
        want = torch.cat([model(input_ids=torch.tensor([row])).logits[:, -1] for row in rows])
    torch.testing.assert_close(got, want, atol=savings.LOGIT_ATOL, rtol=0)
    # The shared cache is read, never written: a second batch sees the same prefix.
    assert cache.get_seq_length() == len(split.prefix)
    again = savings.suffix_forward(model, cache, len(split.prefix), split.suffixes[:1], pad, "cpu")
    torch.testing.assert_close(again, want[:1], atol=savings.LOGIT_ATOL, rtol=0)


def test_context_savings_rejects_bad_sizes(capsys, load_benchmark):
    savings = load_benchmark("context_savings")
    with pytest.raises(SystemExit) as exit_:
        savings.main(["--sizes", "0,x"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: --sizes")
