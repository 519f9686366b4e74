"""Evaluation: loaders on the real cached benchmark files, parsing, statistics, conditions, and an
end-to-end resumable ``evaluate`` (and ``study``) on a tiny exported checkpoint."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import benchmark_assets_missing

from prism_lightning.errors import PrismError
from prism_lightning.eval import benchmarks as B
from prism_lightning.eval import scoring as S
from prism_lightning.eval.conditions import Condition, matched_persona
from prism_lightning.testing import untrained_checkpoint, write_small_mtbench

_MISSING = benchmark_assets_missing()
needs_assets = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


# ------------------------------------------------------------------------------------------------
# loaders


@needs_assets
def test_mtbench_loader_real_file():
    rows = B.load_mtbench()
    assert len(rows) == 80
    assert Counter(r["category"] for r in rows) == dict.fromkeys(B.MTBENCH_CATEGORIES, 10)
    assert all(len(r["turns"]) == 2 for r in rows)
    with_ref = {r["category"] for r in rows if r["reference"]}
    assert with_ref == {"math", "reasoning", "coding"}
    assert all(len(r["reference"]) == 2 for r in rows if r["reference"])
    assert len(B.load_mtbench(limit=3)) == 3
    assert {r["category"] for r in B.load_mtbench(categories=["math"])} == {"math"}


@needs_assets
def test_mmlu_loader_real_file_and_domains():
    rows = B.load_mmlu()
    assert len(rows) == 14042  # the two stray header rows are gone
    assert not any(r["question"] == "question" for r in rows)
    subjects = {r["subject"] for r in rows}
    assert len(subjects) == 57 and subjects == set(B.MMLU_SUBJECT_DOMAINS)
    per_domain = Counter(B.MMLU_SUBJECT_DOMAINS.values())
    assert per_domain == {"stem": 18, "humanities": 13, "social_sciences": 12, "other": 14}
    assert Counter(r["domain"] for r in rows).keys() == set(B.MMLU_DOMAINS)
    assert all(len(r["choices"]) == 4 and 0 <= r["answer"] <= 3 for r in rows)
    assert B.mmlu_subject("high school us history") == "high_school_us_history"
    assert {r["domain"] for r in B.load_mmlu(domains=["stem"], limit=5)} == {"stem"}


@needs_assets
def test_safety_loaders_real_files():
    jbb, hb, adv = B.load_jailbreakbench(), B.load_harmbench(), B.load_advbench()
    assert len(jbb) == 100 and len(hb) == 320 and len(adv) == 520
    assert Counter(r["functional_category"] for r in hb) == {
        "standard": 159,
        "contextual": 81,
        "copyright": 80,
    }
    ctx = [r for r in hb if r["functional_category"] == "contextual"]
    assert all("\n\n---\n\n" in r["prompt"] for r in ctx)  # ContextString + Behavior
    assert len({r["id"] for r in hb}) == 320
    assert jbb[0]["prompt"].startswith("Write a defamatory article") and jbb[0]["category"]
    assert adv[0]["prompt"].startswith("Write a script") and adv[0]["harm_categories"]
    assert len(B.load_safety(limit=2)) == 6
    assert len(B.load_harmbench(functional_categories=["standard"])) == 159


def test_loaders_take_local_files(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "category": "math", "turns": ["1+1?", "2+2?"]}) + "\n")
    ref = tmp_path / "ref.jsonl"
    ref.write_text(json.dumps({"question_id": 1, "choices": [{"index": 0, "turns": ["2", "4"]}]}) + "\n")
    rows = B.load_mtbench(q, references=ref)
    assert rows == [
        {"id": "1", "question_id": 1, "category": "math", "turns": ["1+1?", "2+2?"], "reference": ["2", "4"]}
    ]
    m = tmp_path / "m.jsonl"
    head = {"question": "question", "answer_a": "answer_a", "answer_b": "b", "answer_c": "c"}
    head |= {"answer_d": "d", "correct_answer": "answer", "topic": "virology"}
    real = {"question": "Q?", "answer_a": "w", "answer_b": "x", "answer_c": "y", "answer_d": "z"}
    real |= {"correct_answer": "C", "topic": "high school physics"}
    m.write_text(json.dumps(head) + "\n" + json.dumps(real) + "\n")
    (row,) = B.load_mmlu(m)
    assert row["answer"] == 2 and row["subject"] == "high_school_physics" and row["domain"] == "stem"
    h = tmp_path / "h.csv"
    h.write_text(
        "Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID\n"
        '"Do x, then y",contextual,illegal,,"Some ""context""\nwith lines",x_id\n'
    )
    (hb,) = B.load_harmbench(h)
    assert hb["prompt"] == 'Some "context"\nwith lines\n\n---\n\nDo x, then y' and hb["id"] == "x_id"
    a = tmp_path / "a.prompt"
    a.write_text("dataset_name: t\nseeds:\n- value: do harm\n  data_type: text\n  harm_categories: [X, Y]\n")
    assert B.load_advbench(a)[0]["prompt"] == "do harm"
    with pytest.raises(FileNotFoundError):
        B.load_jailbreakbench(tmp_path / "missing.csv")


# ------------------------------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("The answer is fine. Rating: [[7]]", 7.0),
        ("Rating: [[8.5]] and later [[2]]", 8.5),
        ("Rating: [6]", 6.0),
        ("[[10]]", 10.0),
        ("[[1]]", 1.0),
        ("Rating: [[0]]", None),  # out of range: missing, never 0
        ("Rating: [[11]]", None),
        ("Rating: 7/10", None),
        ("Output A:", None),
        ("[[rating]]", None),
        ("", None),
        (None, None),
        ("\x00\x01 garbage [[", None),
    ],
)
def test_parse_rating(text, want):
    assert S.parse_rating(text) == want


def test_refusal_matcher():
    assert S.is_refusal("I'm sorry, but I can't help with that.")
    assert S.is_refusal("I\u2019m sorry")  # curly apostrophe
    assert S.is_refusal("As an AI language model, I must decline.")
    assert S.is_refusal("")
    assert not S.is_refusal("Sure, here is a step-by-step guide.")
    prompt = S.refusal_judge_prompt("do harm", "no way")
    assert "do harm" in prompt and "no way" in prompt and "Yes or No" in prompt
    assert "refuse" in prompt and "do what was asked" in S.refusal_judge_prompt("x", "y", "complied")
    with pytest.raises(ValueError, match="refused, complied"):
        S.refusal_judge_prompt("x", "y", "maybe")


def test_refusal_log_odds_cancels_a_yes_leaning_judge():
    # a judge answering "Yes" to both questions gives no evidence either way
    assert S.refusal_log_odds(0.9, 0.9) == pytest.approx(0.0)
    assert S.refusal_log_odds(0.95, 0.6) > 0  # more sure it refused than that it complied
    assert S.refusal_log_odds(0.7, 0.9) < 0
    assert math.isfinite(S.refusal_log_odds(1.0, 0.0))  # clipped, not infinite


@needs_assets
def test_judge_messages_use_reference_where_needed():
    prompts = S.load_judge_prompts()
    assert {"single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"} <= set(
        prompts
    )
    rows = {r["category"]: r for r in B.load_mtbench()}
    name, system, user = S.mtbench_judge_messages(prompts, rows["writing"], ["ANS1", "ANS2"], 1)
    assert name == "single-v1" and "ANS1" in user and "[[rating]]" in user and system
    name, system, user = S.mtbench_judge_messages(prompts, rows["math"], ["ANS1", "ANS2"], 2)
    assert name == "single-math-v1-multi-turn" and "ANS2" in user and rows["math"]["reference"][1] in user
    assert "[[rating]]" in system
    assert S.MTBENCH_TEMPERATURES["writing"] == 0.7 and S.MTBENCH_TEMPERATURES["math"] == 0.0
    assert S.MTBENCH_TEMPERATURES["stem"] == 0.1


# ------------------------------------------------------------------------------------------------
# statistics


def test_bootstrap_ci():
    const = S.bootstrap_ci([1.0] * 20)
    assert const["mean"] == const["lo"] == const["hi"] == 1.0 and const["n"] == 20
    vals = [0.0, 1.0] * 100
    a, b = S.bootstrap_ci(vals, seed=3), S.bootstrap_ci(vals, seed=3)
    assert a == b  # seeded
    assert a["mean"] == 0.5 and a["lo"] < 0.5 < a["hi"]
    # SE of a mean of 200 Bernoulli(0.5) is 0.035: the 95% half-width is about 0.07
    assert 0.04 < (a["hi"] - a["lo"]) / 2 < 0.1
    # missing values are counted and excluded, lists are rows of several values
    m = S.bootstrap_ci([[8.0, None], [6.0, 4.0], None])
    assert m["mean"] == 6.0 and m["missing"] == 2 and m["n_values"] == 3 and m["n"] == 3
    empty = S.bootstrap_ci([None, None])
    assert empty["missing"] == 2 and empty["mean"] != empty["mean"]  # NaN
    d = S.bootstrap_delta_ci({"a": 1.0, "b": 1.0, "c": 0.0}, {"a": 0.0, "b": 1.0, "d": 1.0})
    assert d["n"] == 2 and d["mean"] == 0.5
    o = S.overall_ci({"x": [1.0, 1.0], "y": [0.5, 0.5], "z": [None]}, {"x": 10.0, "y": 100.0})
    assert o["mean"] == 30.0 and o["lo"] == o["hi"] == 30.0 and o["n_groups"] == 2


def test_correlate_known_inputs():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    r = S.correlate(x, [2 * v + 1 for v in x])
    assert r["pearson"] == pytest.approx(1.0) and r["spearman"] == pytest.approx(1.0) and r["n"] == 5
    r = S.correlate(x, [v**3 for v in x])
    assert r["spearman"] == pytest.approx(1.0) and r["pearson"] < 0.99
    r = S.correlate(x, [5.0, 4.0, 3.0, 2.0, 1.0])
    assert r["pearson"] == pytest.approx(-1.0) and r["spearman"] == pytest.approx(-1.0)
    r = S.correlate([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0])
    assert r["pearson"] == pytest.approx(0.8) and r["spearman"] == pytest.approx(0.8)
    r = S.correlate([1.0, None, 3.0, float("nan")], [1.0, 2.0, 3.0, 4.0])
    assert r["n"] == 2 and r["pearson"] is None  # too few pairs
    assert S.correlate([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])["pearson"] is None  # constant


def test_conditions():
    from prism_lightning.contexts import ContextLibrary

    lib = ContextLibrary.builtin()
    assert matched_persona(lib, "mtbench", "math") == "math"
    assert matched_persona(lib, "safety", "harmbench") == "safety_monitor"
    assert matched_persona(lib, "mmlu", "stem") == "stem"
    assert matched_persona(lib, "mmlu", "social_sciences") == "humanities"
    rnd = Condition("random_persona", "min", "user", seed=1)
    names = [rnd.persona(lib, "mtbench", "math", str(i)) for i in range(30)]
    assert "math" not in names and len(set(names)) > 3
    assert names == [rnd.persona(lib, "mtbench", "math", str(i)) for i in range(30)]
    assert Condition("persona", "long").context(lib, "safety", "advbench", "x")[1] == lib.get(
        "safety_monitor"
    ).text("long")
    assert Condition("base").context(lib, "mmlu", "stem", "x") == (None, None)
    assert [Condition(n).mode for n in ("base", "lora", "prism")] == ["off", "on", "gated"]
    with pytest.raises(ValueError, match="unknown condition"):
        Condition("sft")


# ------------------------------------------------------------------------------------------------
# end to end on a tiny exported checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_model_dir, tmp_path_factory):
    # a visible adapter and a gate that routes some rows and not others
    return untrained_checkpoint(
        str(tiny_model_dir), tmp_path_factory.mktemp("ckpt") / "run", lora_std=0.5,
        lora_rank=4, lora_alpha=8, gate_hidden=[16, 8],
    )  # fmt: skip


@pytest.fixture(scope="module")
def small_mtbench(tmp_path_factory):
    """Short MT-Bench-format files (2 questions per category) and short judge prompts of the real
    schema: the real ones are ~1-3k tokens for the tiny byte-level tokenizer, too slow for a test."""
    return write_small_mtbench(tmp_path_factory.mktemp("mtbench"), per_category=2)


def _tiny_args(ckpt, out, mt, *extra):
    return [
        "--checkpoint", str(ckpt), "--out", str(out), "--limit", "2", "--device", "cpu", *mt,
        "--mtbench_max_new_tokens", "3", "--safety_max_new_tokens", "3", "--judge_max_new_tokens", "3",
        "--ci_resamples", "50", "--judge_mode", "generate", *extra,
    ]  # fmt: skip


@needs_assets
def test_option_scoring_respects_routing(tiny_checkpoint):
    from prism_lightning.engines.hf import HFEngine
    from prism_lightning.model.export import load_checkpoint

    routed = load_checkpoint(tiny_checkpoint, device="cpu")
    eng = HFEngine.from_routed(routed)
    prompts = routed.prompts(["What is twelve times seven?", "Write a short poem about the sea.", "Hi"])
    opts = [["A", " A"], ["B", " B"], ["C"], ["D"]]
    off, r_off, _, _ = eng.option_logprobs(prompts, opts, mode="off", batch_size=2)
    on, r_on, _, _ = eng.option_logprobs(prompts, opts, mode="on", batch_size=2)
    gated, routes, probs, _ = eng.option_logprobs(prompts, opts, mode="gated", batch_size=2)
    assert r_off == [False] * 3 and r_on == [True] * 3
    assert not torch.allclose(off, on)
    assert all(p is not None for p in probs)
    assert probs == pytest.approx(
        routed.gate_probs(["What is twelve times seven?", "Write a short poem about the sea.", "Hi"]),
        abs=1e-5,
    )
    for i, r in enumerate(routes):  # each row equals the all-on or all-off result, as its gate decided
        assert torch.allclose(gated[i], on[i] if r else off[i], atol=1e-4)
    # one-by-one == batched (padding does not change scores)
    single = torch.cat([eng.option_logprobs([p], opts, mode="on")[0] for p in prompts])
    assert torch.allclose(single, on, atol=1e-4)
    # a forced route per row wins over the gate, whose probability is still recorded
    want = [not r for r in routes]
    forced = eng.option_logprobs(prompts, opts, mode="gated", batch_size=2, route=want)
    assert forced.routes == want and forced.probs == pytest.approx(probs, abs=1e-6)
    for i, r in enumerate(want):
        assert torch.allclose(forced.scores[i], on[i] if r else off[i], atol=1e-4)


def test_auto_judge_mode_follows_judge_size(tiny_checkpoint, monkeypatch):
    from prism_lightning.engines.hf import HFEngine
    from prism_lightning.eval import settings
    from prism_lightning.model.export import load_checkpoint

    judge = HFEngine.from_routed(load_checkpoint(tiny_checkpoint, device="cpu"))
    auto = settings.EvalSettings()
    assert auto.judge_mode == "auto"
    assert settings.resolve_judge_mode(auto, judge).judge_mode == "logprob"  # a tiny judge
    monkeypatch.setattr(settings, "GENERATE_JUDGE_MIN_PARAMS", 1)
    assert settings.resolve_judge_mode(auto, judge).judge_mode == "generate"
    fixed = settings.EvalSettings(judge_mode="logprob")
    assert settings.resolve_judge_mode(fixed, judge) is fixed
    with pytest.raises(ValueError, match="judge_mode"):
        settings.EvalSettings(judge_mode="vibes")


@needs_assets
def test_evaluate_end_to_end_and_resume(tiny_checkpoint, small_mtbench, tmp_path, capsys):
    from prism_lightning.eval import evaluate_main

    out = tmp_path / "eval"
    assert evaluate_main(_tiny_args(tiny_checkpoint, out, small_mtbench)) == 0
    table = capsys.readouterr().out
    assert "overall" in table and "prism routed %" in table
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["conditions"]) == {"base", "persona", "random_persona", "lora", "prism"}
    assert len(summary["subscores"]) == 15
    for res in summary["conditions"].values():
        assert set(res["subscores"]) == set(summary["subscores"])
        for name in summary["subscores"]:
            assert res["subscores"][name]["n"] == 2
    assert summary["conditions"]["lora"]["routing_rate"]["mmlu/stem"] == 1.0
    assert summary["conditions"]["base"]["routing_rate"]["mmlu/stem"] == 0.0
    assert "pearson" in summary["correlation"] and len(summary["correlation"]["persona_effect"]) == 15
    assert all(v["new"] > 0 for v in summary["runs"].values())
    prism = [json.loads(x) for x in (out / "items" / "mmlu__prism.jsonl").read_text().splitlines()]
    assert len(prism) == 8 and all(isinstance(r["route"], bool) and 0 <= r["gate_prob"] <= 1 for r in prism)
    mt = [json.loads(x) for x in (out / "items" / "mtbench__prism.jsonl").read_text().splitlines()]
    assert len(mt) == 16 and all(len(r["answers"]) == 2 and len(r["ratings"]) == 2 for r in mt)
    # tiny random judge: unparsable ratings are missing and counted, never a number
    missing = summary["conditions"]["base"]["subscores"]["mtbench/writing"]["missing"]
    assert missing == sum(r is None for r in _rows(out, "mtbench__base", "mtbench/writing", "ratings"))
    persona_rows = _rows(out, "safety__persona", None, "persona")
    assert set(persona_rows) == {"safety_monitor"}
    assert (out / "summary.csv").read_text().startswith("condition,score,mean")
    # the adapter changes the scores, and the gate's decisions were recorded per row
    assert _rows(out, "mmlu__lora", None, "logprobs") != _rows(out, "mmlu__base", None, "logprobs")
    assert {r for r in _rows(out, "safety__prism", None, "route")} <= {True, False}

    # interrupt: drop one row of a file and leave a half-written line, then rerun
    path = out / "items" / "safety__prism.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    assert evaluate_main(_tiny_args(tiny_checkpoint, out, small_mtbench)) == 0
    again = json.loads((out / "summary.json").read_text())
    runs = again["runs"]
    assert runs["safety/prism"] == {**runs["safety/prism"], "new": 1, "reused": len(lines) - 1}
    assert all(v["new"] == 0 for k, v in runs.items() if k != "safety/prism")
    assert again["conditions"]["base"]["subscores"] == summary["conditions"]["base"]["subscores"]
    # a changed setting does not reuse stale rows of the affected benchmark
    changed = ["--benchmarks", "mmlu", "--conditions", "persona", "--persona-length", "min"]  # old spelling
    assert evaluate_main(_tiny_args(tiny_checkpoint, out, small_mtbench, *changed)) == 0
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert runs == {"mmlu/persona": {**runs["mmlu/persona"], "new": 8, "reused": 0}}


def _standardise_on_mmlu(module) -> None:
    """Standardise the gate's input over the chat prompts of the MMLU items a ``--limit 2`` run scores, so
    an untrained 3-way gate spreads them over none and both adapters."""
    from prism_lightning.eval import scoring as S
    from prism_lightning.eval.items import select_items
    from prism_lightning.eval.settings import EvalSettings
    from prism_lightning.generation import left_pad

    tok, items = module.tokenizer, select_items("mmlu", EvalSettings(limit=2))
    rows = [
        tok(module.formatter.prompt(S.mmlu_prompt(r)), add_special_tokens=False)["input_ids"] for r in items
    ]
    ids, mask = left_pad(rows, tok.pad_token_id)
    feats = module.controller.gate_features(ids, mask).float()
    module.gate.set_feature_stats(feats.mean(0), feats.std(0))


@pytest.fixture(scope="module")
def tiny_kway_checkpoint(tiny_model_dir, tmp_path_factory):
    """A K-way export of the tiny model: two visible adapters and a 3-way gate that routes rows apart."""
    return untrained_checkpoint(
        str(tiny_model_dir), tmp_path_factory.mktemp("ckpt-k") / "run", lora_std=0.5, lora_rank=4,
        lora_alpha=8, gate_hidden=[16, 8], gate_std=3.0, prepare=_standardise_on_mmlu,
        adapters={"numbers": ["math"], "code": ["coding"]}, personas=("math", "coding"),
    )  # fmt: skip


@needs_assets
def test_prism_k_on_raw_mmlu_routes_on_the_chat_prompt(tiny_kway_checkpoint, small_mtbench, tmp_path):
    """``--mmlu_format raw`` with prism_k: the K-way gate decides on the chat-formatted question (the prompt
    it was trained on), and the raw prompt is scored with the adapter it chose, as one-adapter prism does."""
    from prism_lightning.engines.hf import HFEngine
    from prism_lightning.eval import evaluate_main
    from prism_lightning.eval import scoring as S
    from prism_lightning.eval.items import select_items
    from prism_lightning.eval.scorers import mmlu_prompts
    from prism_lightning.eval.settings import EvalSettings
    from prism_lightning.generation import left_pad
    from prism_lightning.model.export import load_checkpoint
    from prism_lightning.model.inference import prompt_gate_probs
    from prism_lightning.model.route_rule import gate_routes

    out = tmp_path / "eval"
    args = ["--conditions", "prism_k", "--benchmarks", "mmlu", "--mmlu_format", "raw", "--dtype", "float32"]
    assert evaluate_main(_tiny_args(tiny_kway_checkpoint, out, small_mtbench, *args)) == 0
    rows = [json.loads(x) for x in (out / "items" / "mmlu__prism_k.jsonl").read_text().splitlines()]
    items = {r["id"]: r for r in select_items("mmlu", EvalSettings(limit=2))}
    assert len(rows) == 8 and {r["id"] for r in rows} <= set(items)
    picked = [items[r["id"]] for r in rows]

    routed = load_checkpoint(tiny_kway_checkpoint, device="cpu")
    questions = [S.mmlu_prompt(r) for r in picked]
    on_chat = routed.choose_adapters(questions)
    assert [r["route"] for r in rows] == [a is not None for a in on_chat]
    assert [r["gate_prob"] for r in rows] == pytest.approx(routed.gate_probs(questions), abs=1e-5)
    assert [r["adapter"] for r in rows] == on_chat
    assert len(set(on_chat)) > 1  # more than one route was taken
    # the gate decides otherwise on the raw prompt for some rows (so routing there is a different run)
    ctl, tok = routed.controller, routed.tokenizer
    raw = mmlu_prompts(HFEngine.from_routed(routed), picked, [(None, None)] * len(picked), "system", "raw")
    raw_probs = prompt_gate_probs(routed.model, tok, ctl, raw)
    assert [ctl.route_name(int(r)) for r in gate_routes(raw_probs, ctl.threshold)] != on_chat
    # each raw prompt was scored with the chosen adapter (or none), in the model's own forward
    letters = [tok(" " + letter, add_special_tokens=False)["input_ids"][0] for letter in S.LETTERS]
    for row, prompt, adapter in zip(rows, raw, on_chat, strict=True):
        ids, mask = left_pad([tok(prompt, add_special_tokens=False)["input_ids"]], tok.pad_token_id)
        ctl.set_mask(0 if adapter is None else ctl.adapter_names.index(adapter) + 1)
        with torch.no_grad():
            logits = routed.model(input_ids=ids, attention_mask=mask).logits[0, -1]
        want = torch.log_softmax(logits.float(), -1)[letters]
        assert row["logprobs"] == pytest.approx(want.tolist(), abs=2e-4)
    ctl.reset()


def _rows(out: Path, name: str, group: str | None, field: str) -> list:
    rows = [json.loads(x) for x in (out / "items" / f"{name}.jsonl").read_text().splitlines()]
    vals = [r[field] for r in rows if group is None or r["group"] == group]
    return [v for x in vals for v in (x if isinstance(x, list) else [x])]


@needs_assets
def test_evaluate_without_checkpoint_and_study(tiny_model_dir, small_mtbench, tmp_path, capsys):
    from prism_lightning.eval import evaluate_main, study_main

    common = ["--model", str(tiny_model_dir), "--limit", "1", "--device", "cpu", "--ci_resamples", "20",
              "--mtbench_max_new_tokens", "2", "--safety_max_new_tokens", "2", *small_mtbench]  # fmt: skip
    out = tmp_path / "base"
    assert (
        evaluate_main([*common, "--out", str(out), "--benchmarks", "mmlu,mtbench", "--judge-mode", "logprob"])
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["conditions"]) == {"base", "persona", "random_persona"}
    rating = summary["conditions"]["base"]["subscores"]["mtbench/math"]
    assert rating["missing"] == 0 and 1.0 <= rating["mean"] <= 10.0  # logprob judging is never missing
    with pytest.raises(PrismError, match="--checkpoint"):
        evaluate_main([*common, "--out", str(out), "--conditions", "prism"])
    capsys.readouterr()

    study = tmp_path / "study"
    args = [*common, "--out", str(study), "--benchmarks", "mmlu,safety", "--lengths", "min,long"]
    assert study_main([*args, "--safety_sets", "jailbreakbench"]) == 0
    import csv

    with open(study / "study.csv") as f:
        rows = list(csv.DictReader(f))
    # 1 baseline + matched x 2 lengths x 2 placements (system, user); 4 MMLU domains + 1 safety set
    assert len(rows) == (1 + 2 * 2) * 5
    base = [r for r in rows if r["persona"] == "none"]
    assert len(base) == 5 and all(float(r["delta"]) == 0.0 for r in base)
    cell = [
        r for r in rows if r["benchmark"] == "safety" and r["length"] == "long" and r["placement"] == "user"
    ]
    assert cell[0]["persona_used"] == "safety_monitor"
    assert "delta [95% CI]" in capsys.readouterr().out
