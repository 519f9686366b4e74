"""External checks of the MMLU scorer and prompt against lm-evaluation-harness, on the embedded model, with
the items as local tasks (a JSONL file, no hub):

- given our raw prompt, lm-eval scores the base condition exactly as ``evaluate --mmlu_format raw`` does (the
  scoring arithmetic);
- lm-eval builds the prompt itself from its own ``mmlu`` template (the installed package's
  ``_default_template_yaml``): our raw prompt is that prompt, with one documented difference, the paper's
  first sentence ("The following is a multiple choice question about ...") for lm-eval's ("The following are
  multiple choice questions (with answers) about ..."); with the paper's sentence as its description
  lm-eval's prompt equals ours string for string and scores the same pick and log-likelihoods;
- the persona condition: lm-eval renders a system instruction through the model's chat template
  (``apply_chat_template``, ``system_instruction``) as our raw format renders the persona before its prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import benchmark_assets_missing

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the dev extra")

_MISSING = benchmark_assets_missing()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.second_tier,
    pytest.mark.skipif(_MISSING is not None, reason=_MISSING or ""),
]

TASK = """
task: prism_mmlu_raw
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def embedded():
    from prism_lightning.backbone import load_backbone

    torch.manual_seed(0)
    return load_backbone("smollm2-135m-instruct", device="cpu", dtype="float32")


def test_lm_eval_scores_our_mmlu_items_as_we_do(embedded, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from prism_lightning.contexts import ContextLibrary
    from prism_lightning.engines.hf import HFEngine
    from prism_lightning.eval.conditions import Condition
    from prism_lightning.eval.items import select_items
    from prism_lightning.eval.scorers import ScoringContext, mmlu_prompts, mmlu_rows
    from prism_lightning.eval.settings import EvalSettings

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    settings = EvalSettings(limit=6, mmlu_format="raw", mmlu_batch_size=8)
    items = select_items("mmlu", settings)  # 6 per domain, the same seeded sample evaluate takes
    engine = HFEngine.from_backbone(embedded)
    ctx = ScoringContext(engine, engine, ContextLibrary.builtin(), settings, "crosscheck")
    ours = mmlu_rows(ctx, Condition("base"), items)

    # the same prompts, written out as a local lm-eval task
    prompts = mmlu_prompts(engine, items, [(None, None)] * len(items), "system", "raw")
    data = tmp_path / "items.jsonl"
    lines = [json.dumps({"prompt": p, "answer": r["answer"]}) for p, r in zip(prompts, items, strict=True)]
    data.write_text("\n".join(lines) + "\n")
    (tmp_path / "task.yaml").write_text(TASK.format(data=data))
    lm = HFLM(pretrained=embedded.model, tokenizer=embedded.tokenizer, batch_size=8, device="cpu")
    out = simple_evaluate(
        model=lm, tasks=["prism_mmlu_raw"], task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )  # fmt: skip
    theirs = sorted(out["samples"]["prism_mmlu_raw"], key=lambda s: s["doc_id"])

    assert len(theirs) == len(ours) == 24
    acc_ours = sum(r["correct"] for r in ours) / len(ours)
    assert out["results"]["prism_mmlu_raw"]["acc,none"] == pytest.approx(acc_ours, abs=1e-9)
    for row, sample in zip(ours, theirs, strict=True):
        loglik = [float(resp[0]) for resp in sample["filtered_resps"]]
        assert max(range(4), key=loglik.__getitem__) == row["pred"]
        assert loglik == pytest.approx(row["logprobs"], abs=2e-3)  # ours are stored to 4 decimals


# -- lm-eval's own MMLU template ----------------------------------------------------------------------------

LM_EVAL_MMLU = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
OURS_FIRST = "The following is a multiple choice question about {}.\n\n"  # the paper's reference prompt
LM_EVAL_FIRST = "The following are multiple choice questions (with answers) about {}.\n\n"  # lm-eval's

TEMPLATE_TASK = """
task: {name}
include: {template}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
fewshot_split: null
fewshot_config: null
description: {description}
"""


def _lm_eval_items(items: list[dict]) -> list[dict]:
    """The items in the fields of lm-eval's ``mmlu`` task (question, choices, answer, subject), with the
    description of its per-subject task (read from the installed package) and the paper's first sentence."""
    rows = []
    for r in items:
        subject_yaml = LM_EVAL_MMLU / f"mmlu_{r['subject']}.yaml"
        stock = yaml.safe_load(subject_yaml.read_text())["description"]
        subject = r["subject"].replace("_", " ")
        rows.append({"question": r["question"], "choices": r["choices"], "answer": r["answer"],
                     "subject": r["subject"], "lm_eval_description": stock,
                     "paper_description": OURS_FIRST.format(subject)})  # fmt: skip
    return rows


def _write_tasks(tmp_path: Path, rows: list[dict], tasks: dict[str, str]) -> None:
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = LM_EVAL_MMLU / "_default_template_yaml"
    for name, description in tasks.items():
        text = TEMPLATE_TASK.format(name=name, template=template, data=data, description=description)
        (tmp_path / f"{name}.yaml").write_text(text)


def _samples(out: dict, task: str) -> list[dict]:
    return sorted(out["samples"][task], key=lambda s: s["doc_id"])


@pytest.fixture(scope="module")
def scored(embedded):
    """The 24 items ``evaluate --limit 6`` scores and our HF engine on the embedded model."""
    from prism_lightning.engines.hf import HFEngine
    from prism_lightning.eval.items import select_items
    from prism_lightning.eval.settings import EvalSettings

    settings = EvalSettings(limit=6, mmlu_format="raw", mmlu_batch_size=8)
    return settings, select_items("mmlu", settings), HFEngine.from_backbone(embedded)


def test_lm_eval_builds_our_raw_mmlu_prompt_from_its_own_template(embedded, scored, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from prism_lightning.contexts import ContextLibrary
    from prism_lightning.eval.conditions import Condition
    from prism_lightning.eval.scorers import ScoringContext, mmlu_prompts, mmlu_rows

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    settings, items, engine = scored
    ours = mmlu_rows(
        ScoringContext(engine, engine, ContextLibrary.builtin(), settings, "x"), Condition("base"), items
    )
    prompts = mmlu_prompts(engine, items, [(None, None)] * len(items), "system", "raw")
    _write_tasks(
        tmp_path,
        _lm_eval_items(items),
        {"mmlu_stock": "lm_eval_description", "mmlu_paper": "paper_description"},
    )
    lm = HFLM(pretrained=embedded.model, tokenizer=embedded.tokenizer, batch_size=8, device="cpu")
    out = simple_evaluate(
        model=lm, tasks=["mmlu_stock", "mmlu_paper"], task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )  # fmt: skip
    stock, paper = _samples(out, "mmlu_stock"), _samples(out, "mmlu_paper")
    assert len(stock) == len(paper) == len(ours) == 24

    for r, prompt, row, s_stock, s_paper in zip(items, prompts, ours, stock, paper, strict=True):
        subject = r["subject"].replace("_", " ")
        ctx_stock, ctx_paper = s_stock["arguments"][0][0], s_paper["arguments"][0][0]
        # lm-eval's own prompt: its description, then its template; ours differs in the first sentence only
        assert ctx_stock.startswith(LM_EVAL_FIRST.format(subject))
        assert prompt == OURS_FIRST.format(subject) + ctx_stock.removeprefix(LM_EVAL_FIRST.format(subject))
        # with the paper's first sentence lm-eval's prompt is ours, string for string, and scores as ours
        assert prompt == ctx_paper
        assert [c for _, c in s_paper["arguments"]] == [" A", " B", " C", " D"]  # scored as ours
        loglik = [float(resp[0]) for resp in s_paper["filtered_resps"]]
        assert max(range(4), key=loglik.__getitem__) == row["pred"]
        assert loglik == pytest.approx(row["logprobs"], abs=2e-3)  # ours are stored to 4 decimals
    acc = sum(r["correct"] for r in ours) / len(ours)
    assert out["results"]["mmlu_paper"]["acc,none"] == pytest.approx(acc, abs=1e-9)


def test_lm_eval_renders_the_persona_system_prompt_as_our_raw_format(embedded, scored, tmp_path, monkeypatch):
    """The persona condition's raw prompt is the chat template's system turn of the persona, then the raw
    prompt in the user turn: lm-eval's ``system_instruction`` through the same chat template gives that
    system turn and user turn, character for character. (lm-eval then closes the user turn and opens the
    assistant's, scoring "A".."D" there; the reference, and ours, score " A".." D" after "Answer:" inside the
    user turn, so the two score different strings: only the rendering is compared.)"""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from prism_lightning.contexts import ContextLibrary
    from prism_lightning.eval.conditions import Condition
    from prism_lightning.eval.scorers import mmlu_prompts

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    settings, items, engine = scored
    cond, library = Condition("persona"), ContextLibrary.builtin()
    personas = [cond.context(library, "mmlu", r["domain"], r["id"]) for r in items]
    prompts = mmlu_prompts(engine, items, personas, "system", "raw")
    lm = HFLM(pretrained=embedded.model, tokenizer=embedded.tokenizer, batch_size=8, device="cpu")
    tails = set()
    for name, text in sorted({p for p in personas}):  # one lm-eval run per persona (one system instruction)
        picked = [i for i, p in enumerate(personas) if p[0] == name]
        task_dir = tmp_path / name
        task_dir.mkdir()
        _write_tasks(task_dir, _lm_eval_items([items[i] for i in picked]), {f"mmlu_{name}": '""'})
        out = simple_evaluate(
            model=lm, tasks=[f"mmlu_{name}"], task_manager=TaskManager(include_path=str(task_dir)),
            system_instruction=text, apply_chat_template=True, log_samples=True, random_seed=0,
            numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
        )  # fmt: skip
        for i, sample in zip(picked, _samples(out, f"mmlu_{name}"), strict=True):
            theirs = sample["arguments"][0][0]
            subject = items[i]["subject"].replace("_", " ")
            system_turn, _, body = prompts[i].partition(OURS_FIRST.format(subject))
            assert text in system_turn and body.endswith("\nAnswer:")
            assert theirs.startswith(system_turn + body)  # the persona's system turn, then the user's text
            tails.add(theirs.removeprefix(system_turn + body))
    # what lm-eval adds after the user's text is the template's end of turn + assistant header, on every item
    assert len(tails) == 1
    tail = tails.pop()
    assert tail and "assistant" in tail and "Answer" not in tail
