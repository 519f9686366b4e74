"""The static-cache compiled decode (``decode_compile``): the same token ids as the eager loop (greedy,
sampled with per-row seeds, rows ending at different steps), on a plain model and through a routed
checkpoint with mixed per-row routes; the setting's checks."""

from __future__ import annotations

import pytest

from prism_lightning.engines import GenerationConfig
from prism_lightning.errors import ConfigError
from prism_lightning.generation import SamplingConfig, generate, generate_batch, row_seed
from prism_lightning.static_decode import batch_bucket, length_bucket, use_static_decode
from prism_lightning.testing import GENERATION_QUERIES, untrained_checkpoint, with_large_random_weights

QUERIES = list(GENERATION_QUERIES)
N_NEW = 12


@pytest.fixture(scope="module")
def parts(tiny_backbone):
    """Large random weights, so greedy rows differ (see test_generation); five rows pad to a bucket of 8."""
    model = with_large_random_weights(tiny_backbone.model, seed=0)
    prompts = [tiny_backbone.formatter.prompt(q) for q in QUERIES]
    return model, tiny_backbone.tokenizer, prompts


def both(model, tokenizer, prompts, sampling, **kwargs):
    eager = generate_batch(model, tokenizer, prompts, sampling, decode_compile="off", **kwargs)
    static = generate_batch(model, tokenizer, prompts, sampling, decode_compile="on", **kwargs)
    return eager, static


@pytest.mark.second_tier
@pytest.mark.slow  # compiles the tiny model's decode step (about 30 s on 2 cores)
def test_greedy_and_seeded_sampling_match_the_eager_loop(parts):
    model, tokenizer, prompts = parts
    seeds = [row_seed(5, f"row-{i}") for i in range(len(prompts))]
    greedy = SamplingConfig(max_new_tokens=N_NEW)
    eager, static = both(model, tokenizer, prompts, greedy)
    assert len({tuple(o.token_ids) for o in eager}) == len(prompts)  # the prompts matter
    assert static == eager
    sampled = SamplingConfig(max_new_tokens=N_NEW, temperature=1.0, top_p=0.9, repetition_penalty=1.3)
    eager_s, static_s = both(model, tokenizer, prompts, sampled, seeds=seeds)
    assert [o.token_ids for o in eager_s] != [o.token_ids for o in eager]  # sampling is not greedy here
    assert static_s == eager_s
    # per-row configs and budgets in one batch, through generate's batching
    rows = [greedy, sampled, SamplingConfig(max_new_tokens=3, temperature=0.7), greedy, sampled]
    off = generate(model, tokenizer, prompts, rows, seeds=seeds, batch_size=8)
    assert generate(model, tokenizer, prompts, rows, seeds=seeds, batch_size=8, decode_compile="on") == off


@pytest.mark.second_tier
@pytest.mark.slow  # compiles the tiny model's decode step (about 30 s on 2 cores)
def test_rows_that_stop_early_match_and_stream_the_same(parts):
    """A stop token taken from the rows' own answers ends them at different steps: the static path keeps
    their slots and reads only the running rows; on_step sees the same tokens and finishes."""
    model, tokenizer, prompts = parts
    free = generate_batch(model, tokenizer, prompts, SamplingConfig(max_new_tokens=N_NEW), stop_ids=[])
    stop = free[0].token_ids[4]
    steps: dict[str, list] = {"off": [], "on": []}
    outs = {}
    for setting in steps:
        outs[setting] = generate_batch(
            model, tokenizer, prompts, SamplingConfig(max_new_tokens=N_NEW), stop_ids=[stop],
            decode_compile=setting, on_step=lambda tokens, done, s=setting: steps[s].append((tokens, done)),
        )  # fmt: skip
    assert {o.finish_reason for o in outs["off"]} == {"stop", "length"}
    assert outs["on"] == outs["off"]
    assert steps["on"] == steps["off"]


@pytest.mark.second_tier
@pytest.mark.slow  # compiles the tiny model's decode step (about 30 s on 2 cores)
def test_routed_checkpoint_matches_the_eager_loop(tiny_model_dir, tmp_path):
    """Mixed forced routes and the gate's own routes in one batch: the controller's mask follows the padded
    static batch, and every row equals its eager row (which equals the plain adapter on/off row)."""
    from prism_lightning.engines import open_engine
    from prism_lightning.model.export import load_checkpoint
    from prism_lightning.model.inference import routed_generate

    path = untrained_checkpoint(
        str(tiny_model_dir), tmp_path / "ckpt", lora_std=0.5, lora_rank=4, gate_hidden=[16], gate_std=3.0
    )
    routed = load_checkpoint(path, device="cpu")
    prompts = routed.prompts(QUERIES)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0)
    seeds = [row_seed(1, str(i)) for i in range(len(prompts))]
    routes = [True, False, True, False, False]

    def run(setting: str, **kwargs):
        return routed_generate(
            routed.model, routed.tokenizer, routed.controller, prompts, sampling=sampling, seeds=seeds,
            batch_size=8, decode_compile=setting, **kwargs,
        )  # fmt: skip

    forced = run("off", route=routes)
    assert run("on", route=routes) == forced
    with routed.model.disable_adapter():
        base = generate_batch(routed.model, routed.tokenizer, prompts, sampling, seeds=seeds)
    assert [o.token_ids for o, r in zip(forced, routes, strict=True) if not r] == [
        o.token_ids for o, r in zip(base, routes, strict=True) if not r
    ]
    probs = sorted(routed.gate_probs(QUERIES))
    split = (probs[1] + probs[2]) / 2  # a threshold at which the gate splits this batch
    gated = run("off", threshold=split)
    assert sorted(o.route for o in gated) == [False, False, True, True, True]
    assert run("on", threshold=split) == gated
    # the engine setting reaches the routed batch
    routed.threshold = routed.controller.threshold = split
    engine = open_engine(routed, GenerationConfig(decode_compile="on"))
    assert engine.decode_compile == "on"
    rows = engine.generate(prompts, sampling, mode="gated", seeds=seeds, batch_size=8)
    assert [r.token_ids for r in rows] == [o.token_ids for o in gated]


def test_setting_checks(tiny_backbone):
    assert GenerationConfig().decode_compile == "auto"
    with pytest.raises(ConfigError, match="decode_compile must be one of auto, on, off"):
        GenerationConfig(decode_compile="yes")
    with pytest.raises(ConfigError, match="vllm backend compiles its own"):
        GenerationConfig(backend="vllm", decode_compile="on")
    assert GenerationConfig(backend="vllm").decode_compile == "auto"
    assert use_static_decode("auto", tiny_backbone.model) is False  # a CPU model
    assert use_static_decode("on", tiny_backbone.model) is True
    with pytest.raises(ValueError, match="decode_compile must be one of"):
        generate_batch(
            tiny_backbone.model, tiny_backbone.tokenizer, ["Hi"], SamplingConfig(), decode_compile="1"
        )


def test_sliding_window_models_are_refused():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8,
    )  # fmt: skip
    model = MistralForCausalLM(config)
    with pytest.raises(ValueError, match="sliding-window"):
        use_static_decode("on", model)
    assert use_static_decode("auto", model) is False


def test_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert [length_bucket(n) for n in (1, 64, 65, 300)] == [64, 64, 128, 512]


def test_many_bucket_pairs_stay_compiled(parts):
    """A long-running process meets more batch x length buckets than dynamo's default recompile limit (8);
    each must still get its compiled step rather than a silent fall-back to eager (dynamo's own eager
    backend here, so the test traces without paying inductor's compile)."""
    import torch

    from prism_lightning.static_decode import StaticDecoder, _decoders

    model, tokenizer, prompts = parts
    torch._dynamo.reset()  # no compilations of the step left from other tests count against the limit
    _decoders[model] = StaticDecoder(model, backend="eager")
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            for rows in (1, 2, 3, 5, 9):  # batch buckets 1, 2, 4, 8, 16
                batch = (prompts * 2)[:rows]
                for new in (2, 70):  # cache buckets 64 and 128
                    sampling = SamplingConfig(max_new_tokens=new)
                    out = generate_batch(model, tokenizer, batch, sampling, stop_ids=[], decode_compile="on")
                    assert [len(o.token_ids) for o in out] == [new] * rows
    finally:
        del _decoders[model]
        torch._dynamo.reset()
