"""An external check of the MMLU scorer: lm-evaluation-harness, given the same items in the same raw prompt as
a local task (a JSONL file, no hub), scores the embedded model's base condition exactly as ``evaluate
--mmlu_format raw`` does: the same accuracy, the same pick and the same option log-likelihoods per item."""

from __future__ import annotations

import json

import pytest
import torch
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
