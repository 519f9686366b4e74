"""The bootstrap's sampling filters (top_p/top_k/repetition_penalty, the reference's generation-config
values) and its query prompt that shows the persona's text: checked, hashed, and reaching the sampler."""

from __future__ import annotations

import pytest

from prism_lightning.backbone import BackboneConfig
from prism_lightning.bootstrap import stage_stores
from prism_lightning.bootstrap.queries import query_jobs
from prism_lightning.bootstrap.tasks import StageTasks
from prism_lightning.contexts import ContextLibrary
from prism_lightning.errors import ConfigError
from prism_lightning.testing import tiny_bootstrap_config

STAGES = ("queries", "answers", "verdicts", "teacher")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("query_prompt", "show", "Unknown query_prompt"),
        ("top_p", 0.0, "top_p must be in"),
        ("top_k", -1, "top_k must be >= 0"),
        ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
    ],
)
def test_bad_sampling_settings_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        tiny_bootstrap_config(**{field: value})


def test_hashes_move_only_with_what_changes_a_stage(tiny_model_dir, tmp_path):
    bb = BackboneConfig(model=str(tiny_model_dir))
    base = stage_stores(tiny_bootstrap_config(), bb, tmp_path)
    # the keys at their "off" values are the runs made before the keys existed: same hashes
    explicit = stage_stores(tiny_bootstrap_config(top_p=1.0, top_k=0, repetition_penalty=1.0), bb, tmp_path)
    assert all(base[s].hash == explicit[s].hash for s in STAGES)
    filtered = stage_stores(tiny_bootstrap_config(top_k=20, repetition_penalty=1.05), bb, tmp_path)
    assert all(base[s].hash != filtered[s].hash for s in STAGES)  # queries change, the rest follow
    shown = stage_stores(tiny_bootstrap_config(query_prompt="persona_text"), bb, tmp_path)
    assert base["queries"].hash != shown["queries"].hash


def test_persona_text_query_prompt_shows_the_distilled_text(tiny_backbone):
    math = ContextLibrary.builtin().select(["math"])
    shown = query_jobs(tiny_backbone.formatter, math, 2, "long")
    described = query_jobs(tiny_backbone.formatter, math, 2)
    long_text = math[0].text("long")
    assert all(long_text in job["prompt"] for job in shown)
    assert not any(long_text in job["prompt"] for job in described)
    assert shown[0]["prompt"] != shown[1]["prompt"]  # the angles still vary the requests


def test_top_k_one_samples_what_greedy_picks(tiny_model_dir, tiny_backbone):
    """The filters reach the hf sampler of stages 1 and 2: with one candidate, any temperature is greedy."""
    bb = BackboneConfig(model=str(tiny_model_dir))
    jobs = query_jobs(tiny_backbone.formatter, ContextLibrary.builtin().select(["math", "coding"]), 3)

    def raw_queries(config):
        tasks = StageTasks(config, bb, device="cpu")
        assert tasks.answers().sampling == config.answer_sampling()
        return [row["raw"] for row in tasks.queries().process(jobs)]

    no_stop = {"query_stop_at_newline": False, "query_max_new_tokens": 12}
    greedy = raw_queries(tiny_bootstrap_config(query_temperature=0.0, **no_stop))
    top1 = raw_queries(tiny_bootstrap_config(query_temperature=1.5, top_k=1, **no_stop))
    sampled = raw_queries(tiny_bootstrap_config(query_temperature=1.5, **no_stop))
    assert top1 == greedy
    assert sampled != greedy


def test_a_whole_bootstrap_with_the_reference_settings(tiny_model_dir, tmp_path):
    """The 7B presets' settings (persona text in the query prompt, Qwen's filters) run through every stage
    and are recorded in the stages' meta.json."""
    import json

    from prism_lightning.bootstrap import run_bootstrap

    bb = BackboneConfig(model=str(tiny_model_dir))
    config = tiny_bootstrap_config(query_prompt="persona_text", top_p=0.8, top_k=20, repetition_penalty=1.05)
    trainer = {"accelerator": "cpu", "enable_progress_bar": False}
    result = run_bootstrap(config, bb, tmp_path / "run", trainer)
    assert result.rows("teacher") or result.rows("verdicts")
    queries = json.loads(result.stages["queries"].meta_path.read_text())["settings"]
    assert queries["query_prompt"] == "persona_text" and queries["top_k"] == 20
    answers = json.loads(result.stages["answers"].meta_path.read_text())["settings"]
    assert answers["repetition_penalty"] == 1.05
