"""Reasoning models (DeepSeek-R1-Distill): the rule that splits a reply at its thinking block, the detection
of a thinking model from its chat template, the engine's thinking budget, the stage hashes (unchanged for
models that do not think), and a tiny thinking model through ``bootstrap`` and ``evaluate``."""

import json
from pathlib import Path

import pytest
import yaml

from prism_lightning.backbone import BackboneConfig, load_backbone
from prism_lightning.bootstrap import BootstrapConfig, stage_stores
from prism_lightning.bootstrap.verdicts import ORDERS, parse_verdict
from prism_lightning.chat_format import (
    THINK_CLOSE,
    THINK_OPEN,
    ChatFormatter,
    ThinkingFormat,
    split_reply,
    thinking_format,
)
from prism_lightning.engines.hf import HFEngine
from prism_lightning.generation import SamplingConfig
from prism_lightning.testing import (
    THINKING_CHAT_TEMPLATE,
    build_tiny_tokenizer,
    save_tiny_model,
    tiny_bootstrap_config,
    write_small_mtbench,
)

# DeepSeek-R1-Distill-Qwen-7B's chat template (tokenizer_config.json), verbatim.
DEEPSEEK_R1_DISTILL_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + "
    "tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + "
    "tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)
# Qwen3's shape: the template knows the tags but the model opens the block itself.
SELF_OPENING_TEMPLATE = (
    "{% for message in messages %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# ------------------------------------------------------------------------------------- the split rule
def test_a_closed_block_leaves_the_answer_after_it():
    reply = "Assistant A rambles; B is exact.\n</think>\n\nB"
    split = split_reply(reply, opened=True)
    assert (split.thinking, split.answer, split.closed) == ("Assistant A rambles; B is exact.", "B", True)
    # read as a whole, the reply names the wrong verdict: its reasoning mentions "A" first
    assert parse_verdict(reply) == "A" and parse_verdict(split.answer) == "B"
    assert split_reply(f"{THINK_OPEN}\nhmm\n{THINK_CLOSE}\n\nHi there.").answer == "Hi there."


def test_an_unterminated_block_has_no_answer():
    split = split_reply("Let me compare Assistant A and Assistant B carefully", opened=True)
    assert (split.answer, split.closed) == ("", False)
    assert split.thinking == "Let me compare Assistant A and Assistant B carefully"
    assert split_reply(f"{THINK_OPEN} still thinking").closed is False  # the reply opened it itself


def test_a_reply_without_a_block_is_all_answer():
    assert split_reply("B") == split_reply("B", opened=False)
    split = split_reply("Paris is the capital of France.")
    assert (split.thinking, split.answer, split.closed) == (None, "Paris is the capital of France.", True)


def test_a_thinking_format_closes_the_block_the_way_the_model_does():
    fmt = ThinkingFormat(opener="")
    assert fmt.closing("why") == f"why\n{THINK_CLOSE}\n\n"
    assert fmt.full_reply("why", "because") == f"why\n{THINK_CLOSE}\n\nbecause"
    assert (
        ThinkingFormat(opener=f"{THINK_OPEN}\n").full_reply("w", "a")
        == f"{THINK_OPEN}\nw\n{THINK_CLOSE}\n\na"
    )


# --------------------------------------------------------------------------------------- detection
def test_thinking_models_are_told_by_their_chat_template():
    assert thinking_format(build_tiny_tokenizer()) is None
    assert thinking_format(
        build_tiny_tokenizer(chat_template=DEEPSEEK_R1_DISTILL_TEMPLATE)
    ) == ThinkingFormat("")
    assert thinking_format(build_tiny_tokenizer(chat_template=THINKING_CHAT_TEMPLATE)) == ThinkingFormat("")
    opener = ThinkingFormat(f"{THINK_OPEN}\n")
    assert thinking_format(build_tiny_tokenizer(chat_template=SELF_OPENING_TEMPLATE)) == opener
    formatter = ChatFormatter(build_tiny_tokenizer(chat_template=DEEPSEEK_R1_DISTILL_TEMPLATE, thinking=True))
    assert formatter.thinking == ThinkingFormat("") and formatter.prompt("Q").endswith("<think>\n")
    assert ChatFormatter(build_tiny_tokenizer()).thinking is None


# ---------------------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def thinking_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-thinker"), thinking=True)


@pytest.fixture(scope="module")
def thinker(thinking_model_dir):
    return HFEngine.from_backbone(load_backbone(str(thinking_model_dir), device="cpu"))


def test_the_engine_thinks_within_its_budget_then_answers(thinker):
    prompts = [thinker.formatter.prompt(f"What is {i} times seven?") for i in range(24)]
    sampling = SamplingConfig(max_new_tokens=5, temperature=1.0)
    outs = thinker.generate(prompts, sampling, seeds=list(range(24)), think_tokens=40, batch_size=24)
    closed = [o for o in outs if o.thinking_closed]
    cut = [o for o in outs if not o.thinking_closed]
    assert closed and cut  # both ways a block ends occur in 24 sampled rows
    for o in outs:
        assert o.thinking_tokens <= 40 and len(o.token_ids) <= 5 and THINK_CLOSE not in o.thinking
        assert not o.thinking or o.thinking not in o.text  # the text is the answer after the block
    # a judge primed after the block: the verdict options are scored there, the prompt is continued greedily
    greedy = SamplingConfig(max_new_tokens=2, temperature=0.0)
    judged = thinker.generate(
        prompts[:2], greedy, think_tokens=6, reply_start="Verdict:", score_options={"A": ("A",), "B": ("B",)}
    )
    primed, thoughts = thinker.think(prompts[:2], 6, reply_start="Verdict:")
    assert [t.thinking for t in thoughts] == [j.thinking for j in judged]
    for p, t in zip(primed, thoughts, strict=True):
        assert p.endswith(f"{t.thinking}\n{THINK_CLOSE}\n\nVerdict:")
    assert all(j.option_scores is not None for j in judged)


def test_a_model_that_does_not_think_ignores_the_budget(tiny_backbone):
    eng = HFEngine.from_backbone(tiny_backbone)
    prompts = [eng.formatter.prompt("Hi"), eng.formatter.prompt("What is twelve times seven?")]
    sampling = SamplingConfig(max_new_tokens=4, temperature=0.7)
    plain = eng.generate(prompts, sampling, seeds=[1, 2])
    budgeted = eng.generate(prompts, sampling, seeds=[1, 2], think_tokens=3)
    assert [(o.text, o.token_ids, o.thinking) for o in plain] == [
        (o.text, o.token_ids, None) for o in budgeted
    ]
    assert eng.think(prompts, 3, reply_start="Verdict:") == ([p + "Verdict:" for p in prompts], None)


# ------------------------------------------------------------------------------------------- hashes
#: Stage hashes of the default config and the paper presets before thinking was handled (their models do
#: not think, or, for the R1 presets, are not available offline, so nothing could be detected).
PRESET_HASHES = {
    "default": ["b539fa2804e8", "02a4531f0692", "fa01c44a9d31", "9d712b393210"],
    "qwen2.5-7b": ["9febb8590811", "ed4ae5d26531", "91c354a3a2b4", "be6067725793"],
    "llama3.1-8b": ["7d9867ba9eed", "68b3a75d3d0d", "d8556498a191", "da294c61d470"],
    "mistral-7b": ["6407334236d4", "7740f28b3401", "cbd81fa788a4", "460facda79c3"],
}


def _preset_stores(name: str, tmp_path, **bootstrap):
    from prism_lightning.config_files import package_configs_dir

    cfg = yaml.safe_load((package_configs_dir() / f"{name}.yaml").read_text())
    boot = BootstrapConfig(**{**(cfg.get("data", {}).get("bootstrap") or {}), **bootstrap})
    return stage_stores(boot, BackboneConfig(**cfg["model"]["backbone"]), tmp_path)


@pytest.mark.parametrize("name", sorted(PRESET_HASHES))
def test_models_that_do_not_think_keep_their_stage_hashes(name, tmp_path):
    stores = _preset_stores(name, tmp_path)
    assert [stores[s].hash[:12] for s in ("queries", "answers", "verdicts", "teacher")] == PRESET_HASHES[name]
    budget = _preset_stores(name, tmp_path, thinking_max_new_tokens=7)  # no effect on these models
    assert all(stores[s].hash == budget[s].hash for s in stores)


def test_a_thinking_model_hashes_its_budget(thinking_model_dir, tiny_model_dir, tmp_path):
    thinker = BackboneConfig(model=str(thinking_model_dir))
    base = stage_stores(tiny_bootstrap_config(), thinker, tmp_path)
    other = stage_stores(tiny_bootstrap_config(thinking_max_new_tokens=7), thinker, tmp_path)
    assert all(base[s].hash != other[s].hash for s in base)
    assert base["answers"].settings["thinking"] == {"max_new_tokens": 1024, **ThinkingFormat("").identity()}
    plain = BackboneConfig(model=str(tiny_model_dir))
    before = stage_stores(tiny_bootstrap_config(), plain, tmp_path)
    after = stage_stores(tiny_bootstrap_config(thinking_max_new_tokens=7), plain, tmp_path)
    assert all(before[s].hash == after[s].hash for s in before)
    assert not any("thinking" in before[s].settings for s in before)
    # a judge that thinks: only the verdicts (and what follows) move
    judged = stage_stores(tiny_bootstrap_config(judge={"model": str(thinking_model_dir)}), plain, tmp_path)
    by_plain = stage_stores(tiny_bootstrap_config(judge={"model": str(tiny_model_dir)}), plain, tmp_path)
    assert "thinking" in judged["verdicts"].settings and "thinking" not in by_plain["verdicts"].settings


# ------------------------------------------------------------------------------ bootstrap + evaluate
def _rows(stage_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(stage_dir) / "rows.jsonl").read_text().splitlines()]


def test_a_tiny_thinking_model_runs_through_bootstrap_verdicts_and_evaluate(
    thinking_model_dir, tmp_path, capsys
):
    from prism_lightning.bootstrap.teacher import load_teacher_targets
    from prism_lightning.eval import evaluate_main
    from prism_lightning.lightning_cli import bootstrap_main

    run_dir = tmp_path / "run"
    settings = {
        k: v for k, v in vars(tiny_bootstrap_config()).items() if k in ("personas", "min_query_chars")
    }
    config = {
        "data": {"run_dir": str(run_dir), "bootstrap": settings},
        "model": {"backbone": {"model": str(thinking_model_dir)}},
        "trainer": {"accelerator": "cpu"},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = ["--config", str(path), "--data.bootstrap.thinking_max_new_tokens", "6"]
    for key in ("queries_per_persona", "query_max_new_tokens", "answer_max_new_tokens", "teacher_top_k"):
        argv += [f"--data.bootstrap.{key}", str(getattr(tiny_bootstrap_config(), key))]
    assert bootstrap_main(argv) == 0
    assert "thinking (answers):" in capsys.readouterr().out
    summary = json.loads((run_dir / "bootstrap" / "summary.json").read_text())
    stages = {name: st["dir"] for name, st in summary["stages"].items()}

    answers = _rows(stages["answers"])
    for row in answers:
        for side in ("base", "persona"):
            thinking, answer = row[f"{side}_thinking"], row[f"{side}_answer"]
            assert isinstance(row[f"{side}_thinking_closed"], bool) and row[f"{side}_thinking_tokens"] <= 6
            assert not thinking or thinking not in answer  # what is judged and distilled follows the block
    unterminated = sum(not r[f"{s}_thinking_closed"] for r in answers for s in ("base", "persona"))
    assert summary["thinking"]["answers"] == {
        "blocks": 2 * len(answers),
        "unterminated": unterminated,
        "tokens": sum(r[f"{s}_thinking_tokens"] for r in answers for s in ("base", "persona")),
    }
    if unterminated:
        assert any("thinking blocks of the answers stage ran out" in w for w in summary["warnings"])

    verdicts = _rows(stages["verdicts"])
    for row in verdicts:
        for order in ORDERS:
            judged = row[order]
            assert "thinking" in judged and isinstance(judged["thinking_closed"], bool)
            assert not judged["thinking"] or judged["thinking"] not in judged["raw"]
            assert set(judged["logprobs"]) == {"A", "B", "TIE"}
        assert row["judge_tokens"] == sum(row[o]["tokens"] + row[o]["thinking_tokens"] for o in ORDERS)
    assert summary["thinking"]["verdicts"]["blocks"] == 2 * len(verdicts)

    # the teacher's response keeps the block: the prompt ends inside it (see answers.full_reply)
    teacher = _rows(stages["teacher"])
    tokenizer = load_backbone(str(thinking_model_dir), device="cpu", weights=False).tokenizer
    by_id = {r["id"]: r for r in answers}
    for row_id, target in load_teacher_targets(stages["teacher"], teacher).items():
        text = tokenizer.decode(target["response_ids"].tolist(), skip_special_tokens=True)
        assert text.startswith(by_id[row_id]["persona_thinking"]) and THINK_CLOSE in text

    out = tmp_path / "eval"
    mt = write_small_mtbench(tmp_path, per_category=1)
    args = [
        "--model", str(thinking_model_dir), "--out", str(out), "--limit", "1", "--device", "cpu", *mt,
        "--benchmarks", "mtbench,safety", "--conditions", "base", "--safety_sets", "jailbreakbench",
        "--mtbench_max_new_tokens", "3", "--safety_max_new_tokens", "3", "--judge_max_new_tokens", "3",
        "--ci_resamples", "20", "--judge_mode", "logprob", "--thinking_max_new_tokens", "4",
    ]  # fmt: skip
    assert evaluate_main(args) == 0
    items = out / "items"
    for row in map(json.loads, (items / "mtbench__base.jsonl").read_text().splitlines()):
        assert len(row["thinking"]) == len(row["answers"]) == len(row["judge_thinking_closed"])
        assert all(not t or t not in a for t, a in zip(row["thinking"], row["answers"], strict=True))
    for row in map(json.loads, (items / "safety__base.jsonl").read_text().splitlines()):
        assert len(row["judge_thinking_closed"]) == 2  # both yes/no questions, each after the judge's block
        assert not row["thinking"][0] or row["thinking"][0] not in row["answer"]
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert runs["safety/base"]["thinking_blocks"] == 3  # the answer and the judge's two questions
