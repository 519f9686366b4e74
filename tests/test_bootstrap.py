"""Bootstrap stages on the tiny random model: cleaning, judging, store, resume, caching, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import replace

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from prism_lightning.backbone import BackboneConfig
from prism_lightning.bootstrap import BootstrapConfig, IncompatibleRunError, run_bootstrap, stage_stores
from prism_lightning.bootstrap import answers as answers_mod
from prism_lightning.bootstrap import queries as queries_mod
from prism_lightning.bootstrap import verdicts as verdicts_mod
from prism_lightning.bootstrap.queries import clean_query, filter_queries
from prism_lightning.bootstrap.stage import ShardWriter
from prism_lightning.bootstrap.teacher import load_teacher_targets, response_token_ids, topk_over_response
from prism_lightning.bootstrap.verdicts import logprob_verdict, parse_verdict, strict_verdict
from prism_lightning.contexts import ContextLibrary, UnknownContextError
from prism_lightning.files import atomic_write_text, read_written_jsonl
from prism_lightning.testing import tiny_bootstrap_config

TRAINER = {"accelerator": "cpu", "enable_progress_bar": False}


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("boot") / "run"
    backbone = BackboneConfig(model=str(tiny_model_dir))
    result = run_bootstrap(tiny_bootstrap_config(), backbone, run_dir, TRAINER)
    return result, backbone


def all_rows(result):
    return {name: result.rows(name) for name in ("queries", "answers", "verdicts", "teacher")}


# ---------------------------------------------------------------------------------------- queries
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1. How do I solve x^2 = 4?\nsecond line", "How do I solve x^2 = 4?"),
        ('\n\n  Query: "What is a prime number?"', "What is a prime number?"),
        ("- **Question:** Explain recursion simply", "Explain recursion simply"),
        ("Q3) Why is the sky blue?", "Why is the sky blue?"),
        ("(2) Write a haiku about rain", "Write a haiku about rain"),
        ("3 friends share 12 apples; how many each?", "3 friends share 12 apples; how many each?"),
        ("", ""),
    ],
)
def test_clean_query(raw, expected):
    assert clean_query(raw) == expected


def test_filter_queries_drops_and_counts():
    raws = [
        "1. How do I compute the derivative of x squared?",
        "How do I compute the derivative of x squared?!",  # exact duplicate after normalising
        "How do I compute the derivative of x-squared quickly?",  # near duplicate
        "Short?",  # too short
        "   ",  # empty
        "Write a sonnet about the autumn sea and its storms.",
        "Here is one good example:",  # a heading, not a query
    ]
    rows = [{"id": f"p-{i}", "persona": "p", "index": i, "raw": r} for i, r in enumerate(raws)]
    kept, drops, dropped = filter_queries(rows, min_chars=16)
    assert [r["id"] for r in kept] == ["p-0", "p-5"]
    expected = {"empty": 1, "too_short": 1, "not_a_query": 1, "known": 0, "duplicate": 1, "near_duplicate": 1}
    assert drops["p"] == expected
    assert {d["reason"] for d in dropped} == {reason for reason, n in expected.items() if n}
    assert kept[0]["query"] == "How do I compute the derivative of x squared?"


def test_query_prompts_vary_and_have_no_persona(tiny_backbone):
    personas = ContextLibrary.builtin().select(["math"])
    jobs = queries_mod.query_jobs(tiny_backbone.formatter, personas, 4)
    assert len({j["prompt"] for j in jobs}) == 4
    assert all(personas[0].text("short") not in j["prompt"] for j in jobs)


def test_zero_queries_is_a_clear_error(tiny_model_dir, tmp_path):
    cfg = tiny_bootstrap_config(min_query_chars=100_000)
    with pytest.raises(RuntimeError, match="no queries left after filtering"):
        run_bootstrap(cfg, BackboneConfig(model=str(tiny_model_dir)), tmp_path / "run", TRAINER)
    store = stage_stores(cfg, BackboneConfig(model=str(tiny_model_dir)), tmp_path / "run")["queries"]
    assert not store.done_path.exists() and not store.rows_path.exists()


# --------------------------------------------------------------------------------------- verdicts
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[A]]", "A"),
        ("[[B]] because it is correct", "B"),
        ("[[C]]", "TIE"),
        ("Output A:", "A"),
        (" A", "A"),
        ("B", "B"),
        ("Assistant B is better", "B"),
        ("assistant b wins", "B"),
        ("tie", "TIE"),
        ("It's a TIE.", "TIE"),
        ("Both are equally good", "TIE"),
        ("The answer is good", None),
        ("", None),
        (None, None),
        ("<|im_end|> ??? 12", None),
    ],
)
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


@pytest.mark.parametrize("bias", [-6.0, -1.0, 0.0, 2.5, 8.0])
@pytest.mark.parametrize("preference", [-0.7, 0.4])
def test_logprob_verdict_cancels_constant_position_bias(bias, preference):
    # The judge's true log-odds for the persona answer is `preference`; it adds `bias` to "A" always.
    persona_first = {"A": preference + bias, "B": 0.0, "TIE": -3.0}  # persona is A
    base_first = {"A": bias, "B": preference, "TIE": -3.0}  # persona is B
    score, label = logprob_verdict(persona_first, base_first)
    assert score == pytest.approx(2 * preference)
    assert label == int(preference > 0)


def test_strict_rule_needs_both_orders():
    assert strict_verdict("A", "B") == 1
    assert strict_verdict("A", "A") == 0  # position-biased judge
    assert strict_verdict("TIE", "B") == 0
    assert strict_verdict(None, "B") == 0


def test_option_token_ids_are_distinct(tiny_backbone):
    ids = verdicts_mod.option_token_ids(tiny_backbone.tokenizer)
    flat = [t for toks in ids.values() for t in toks]
    assert set(ids) == {"A", "B", "TIE"} and len(flat) == len(set(flat))


# ------------------------------------------------------------------------------------------ store
def test_stage_hashes_follow_settings(tiny_model_dir, tmp_path):
    bb = BackboneConfig(model=str(tiny_model_dir))
    base = stage_stores(tiny_bootstrap_config(), bb, tmp_path)
    answers_changed = stage_stores(tiny_bootstrap_config(answer_max_new_tokens=11), bb, tmp_path)
    rule_changed = stage_stores(tiny_bootstrap_config(verdict_rule="strict"), bb, tmp_path)
    batch_changed = stage_stores(tiny_bootstrap_config(batch_size=5), bb, tmp_path)
    assert base["queries"].hash == answers_changed["queries"].hash
    for stage in ("answers", "verdicts", "teacher"):
        assert base[stage].hash != answers_changed[stage].hash
    assert [base[s].hash == rule_changed[s].hash for s in ("queries", "answers", "verdicts", "teacher")] == [
        True,
        True,
        False,
        False,
    ]
    assert all(base[s].hash == batch_changed[s].hash for s in base)  # batch size changes no result


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "meta.json"
    atomic_write_text(target, "old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"


def test_read_jsonl_ignores_partial_last_line(tmp_path):
    path = tmp_path / "shard-0.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "te')
    assert [r["id"] for r in read_written_jsonl(path)] == ["a", "b"]


def test_changed_answer_setting_recomputes_only_downstream(tiny_run, tmp_path):
    result, backbone = tiny_run
    run_dir = tmp_path / "run"
    shutil.copytree(result.run_dir, run_dir)
    again = run_bootstrap(tiny_bootstrap_config(answer_max_new_tokens=6), backbone, run_dir, TRAINER)
    cached = {name: st["cached"] for name, st in again.summary["stages"].items()}
    assert cached == {"queries": True, "answers": False, "verdicts": False, "teacher": False}
    assert again.rows("queries") == result.rows("queries")


def test_second_run_is_a_noop_without_model_or_trainer(tiny_run, monkeypatch):
    result, backbone = tiny_run

    def no_load(*args, **kwargs):
        raise AssertionError("a cached bootstrap must not load a model")

    def no_trainer(*args, **kwargs):
        raise AssertionError("a cached bootstrap must not create a Trainer")

    monkeypatch.setattr(BackboneConfig, "load", no_load)
    monkeypatch.setattr("prism_lightning.bootstrap.stage.make_trainer", no_trainer)
    again = run_bootstrap(tiny_bootstrap_config(), backbone, result.run_dir, TRAINER)
    assert all(st["cached"] for st in again.summary["stages"].values())
    assert again.summary["models_loaded"] == []
    assert all_rows(again) == all_rows(result)
    assert json.loads(again.summary_path.read_text())["stages"]["answers"]["cached"] is True


def test_switching_verdict_rule_relabels_without_rejudging(tiny_run, tmp_path, monkeypatch):
    result, backbone = tiny_run
    run_dir = tmp_path / "run"
    shutil.copytree(result.run_dir, run_dir)

    def no_judge(*args, **kwargs):
        raise AssertionError("judgments should be reused across rules")

    monkeypatch.setattr(verdicts_mod.VerdictTask, "process", no_judge)
    strict = run_bootstrap(tiny_bootstrap_config(verdict_rule="strict"), backbone, run_dir, TRAINER)
    rows = strict.rows("verdicts")
    assert [r["gate_target"] for r in rows] == [r["strict_label"] for r in rows]
    old = result.rows("verdicts")
    assert [r["logprob_score"] for r in rows] == [r["logprob_score"] for r in old]


class SimulatedKill(RuntimeError):
    pass


class KillDuringStage(Callback):
    """Stops a stage's predict run after its first batch was written, as a kill would."""

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        writer = next(c for c in trainer.callbacks if isinstance(c, ShardWriter))
        if writer.store.stage == self.stage and writer.batches >= 1:
            raise SimulatedKill(f"killed during {self.stage}")


def test_resume_after_interrupted_stage_loses_and_duplicates_nothing(tiny_run, tmp_path):
    result, backbone = tiny_run
    run_dir = tmp_path / "run"
    with pytest.raises(SimulatedKill):
        kill = {**TRAINER, "callbacks": [KillDuringStage("answers")]}
        run_bootstrap(tiny_bootstrap_config(), backbone, run_dir, kill)
    store = stage_stores(tiny_bootstrap_config(), backbone, run_dir)["answers"]
    assert not store.done_path.exists()
    partial = read_written_jsonl(store.shard_path(0))
    assert 0 < len(partial) < len(result.rows("answers"))
    with open(store.shard_path(0), "a") as fh:  # a kill in the middle of a line
        fh.write('{"id": "math-9", "persona": "ma')
    resumed = run_bootstrap(tiny_bootstrap_config(), backbone, run_dir, TRAINER)
    assert resumed.summary["stages"]["answers"]["resumed_rows"] == len(partial)
    assert all_rows(resumed) == all_rows(result) or _same_but_tensor_files(resumed, result)
    ids = [r["id"] for r in read_written_jsonl(store.shard_path(0))]
    assert len(ids) == len(set(ids)) == len(result.rows("answers"))


class SigtermDuringStage(Callback):
    """Sends this process SIGTERM at the end of a stage's first batch, as `kill PID` would."""

    def __init__(self, stage: str) -> None:
        self.stage, self.sent = stage, False

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        writer = next(c for c in trainer.callbacks if isinstance(c, ShardWriter))
        if writer.store.stage == self.stage and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_stops_a_stage_after_its_batch_and_a_rerun_resumes(tiny_run, tmp_path, capsys):
    result, backbone = tiny_run
    run_dir = tmp_path / "run"
    term = {**TRAINER, "callbacks": [SigtermDuringStage("answers")]}
    with pytest.raises(SystemExit) as stopped:
        run_bootstrap(tiny_bootstrap_config(), backbone, run_dir, term)
    assert stopped.value.code == 143
    assert "stopped by SIGTERM during the answers stage" in capsys.readouterr().err
    store = stage_stores(tiny_bootstrap_config(), backbone, run_dir)["answers"]
    partial = read_written_jsonl(store.shard_path(0))
    assert 0 < len(partial) < len(result.rows("answers"))  # the signalled batch was written, no more
    resumed = run_bootstrap(tiny_bootstrap_config(), backbone, run_dir, TRAINER)
    assert resumed.summary["stages"]["answers"]["resumed_rows"] == len(partial)
    assert all_rows(resumed) == all_rows(result) or _same_but_tensor_files(resumed, result)


def _same_but_tensor_files(a, b) -> bool:
    ra, rb = all_rows(a), all_rows(b)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tensor_file"} for r in rows]  # noqa: E731
    return all(strip(ra[s]) == strip(rb[s]) for s in ra)


def test_incompatible_run_dir_is_a_clear_error(tiny_run, tmp_path):
    result, backbone = tiny_run
    run_dir = tmp_path / "run"
    shutil.copytree(result.run_dir, run_dir)
    meta_path = stage_stores(tiny_bootstrap_config(), backbone, run_dir)["answers"].meta_path
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 0
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(IncompatibleRunError, match="Delete that directory"):
        run_bootstrap(tiny_bootstrap_config(), backbone, run_dir, TRAINER)


# ----------------------------------------------------------------------------------------- errors
def test_unknown_or_empty_personas_fail_before_writing(tiny_model_dir, tmp_path):
    bb = BackboneConfig(model=str(tiny_model_dir))
    with pytest.raises(UnknownContextError, match="mathh"):
        run_bootstrap(tiny_bootstrap_config(personas=["mathh"]), bb, tmp_path / "a", TRAINER)
    with pytest.raises(ValueError, match="empty"):
        run_bootstrap(tiny_bootstrap_config(personas=[]), bb, tmp_path / "b", TRAINER)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("field", "value"), [("verdict_rule", "vote"), ("placement", "sidebar"), ("persona_length", "huge")]
)
def test_config_rejects_unknown_choices(field, value):
    with pytest.raises(ValueError, match="choose one of"):
        BootstrapConfig(**{field: value})


def test_model_that_ends_every_answer_at_once_is_an_error():
    row = {"base_answer": "", "persona_answer": "", "base_finish": "stop", "persona_finish": "stop"}
    with pytest.raises(answers_mod.DegenerateAnswersError, match="ended every answer at once"):
        answers_mod.finalize_answers([dict(row, id=str(i)) for i in range(3)])
    rows = [dict(row, id="0"), dict(row, id="1", base_answer="ok", persona_answer="fine")]
    _, stats = answers_mod.finalize_answers(rows)
    assert stats["warnings"] and "ended at once" in stats["warnings"][0]


# ---------------------------------------------------------------------------------------- teacher
def test_teacher_saw_the_persona(tiny_run, tiny_backbone):
    result, _ = tiny_run
    rows = result.rows("teacher")
    assert rows, "the tiny config should send at least one row to distill"
    targets = load_teacher_targets(result.stage_dirs["teacher"], rows)
    verdicts = {r["id"]: r for r in result.rows("verdicts")}
    persona_text = {c.name: c.text("short") for c in result.personas}
    tok, fmt = tiny_backbone.tokenizer, tiny_backbone.formatter
    for row in rows:
        t = targets[row["id"]]
        assert t["values"].dtype == torch.float16 and t["indices"].dtype == torch.int32
        assert t["values"].shape == (row["n_tokens"], 8) == t["indices"].shape
        response = t["response_ids"].tolist()
        query = verdicts[row["id"]]["query"]
        with_persona = tok(
            fmt.prompt(query, persona_text[row["persona"]], "system"), add_special_tokens=False
        )
        without = tok(fmt.prompt(query), add_special_tokens=False)
        pv, pi = topk_over_response(tiny_backbone.model, with_persona["input_ids"], response, 8)
        nv, ni = topk_over_response(tiny_backbone.model, without["input_ids"], response, 8)
        assert torch.allclose(t["values"].float(), pv.float(), atol=1e-2)  # stored = persona teacher
        assert not torch.allclose(t["values"].float(), nv.float(), atol=1e-3)  # != unprompted model


def test_response_ids_end_with_end_of_turn(tiny_backbone):
    tok = tiny_backbone.tokenizer
    ids = response_token_ids(tok, "The answer is four.", 100)
    assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert len(response_token_ids(tok, "The answer is four.", 3)) == 3


# -------------------------------------------------------------------------------------------- cli
def test_bootstrap_main_reads_fit_yaml_and_prints_summary(tiny_run, tmp_path, capsys):
    import yaml

    from prism_lightning.lightning_cli import bootstrap_main

    result, backbone = tiny_run
    run_dir = tmp_path / "run"
    shutil.copytree(result.run_dir, run_dir)
    cfg = replace(tiny_bootstrap_config())
    config = {
        "data": {
            "run_dir": str(run_dir),
            "bootstrap": {k: getattr(cfg, k) for k in ("personas", "min_query_chars")},
        },
        "model": {"backbone": {"model": backbone.model}},
        "trainer": {"accelerator": "cpu"},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = ["--config", str(path)]
    for key in ("queries_per_persona", "query_max_new_tokens", "answer_max_new_tokens", "teacher_top_k"):
        argv += [f"--data.bootstrap.{key}", str(getattr(cfg, key))]
    assert bootstrap_main(argv) == 0
    out = capsys.readouterr().out
    assert "bootstrap summary" in out and "cached" in out and "summary.json" in out
    assert (run_dir / "bootstrap" / "summary.json").exists()
