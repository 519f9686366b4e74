"""``Engine.stream``: the deltas of one streamed reply join to the text ``Engine.generate`` returns for the
same prompt, seed and route, on a plain model and on a routed checkpoint (gated, forced, multi-turn)."""

from __future__ import annotations

import pytest

from prism_lightning.engines.hf import HFEngine
from prism_lightning.errors import ConfigError
from prism_lightning.generation import SamplingConfig
from prism_lightning.testing import untrained_checkpoint, with_large_random_weights

QUERIES = [
    "Write a short poem about the sea.",
    "What is twelve times seven?",
    "Hi",
    "Explain photosynthesis.",
]
GREEDY = SamplingConfig(max_new_tokens=8)
SAMPLED = SamplingConfig(max_new_tokens=8, temperature=0.9, top_p=0.95)


@pytest.fixture(scope="module")
def routed_engine(tiny_model_dir, tmp_path_factory):
    """A tiny checkpoint with a visible adapter and a threshold that splits QUERIES two and two."""
    from prism_lightning.model.export import load_checkpoint

    path = untrained_checkpoint(
        str(tiny_model_dir), tmp_path_factory.mktemp("ckpt") / "run", lora_std=0.5, lora_rank=4,
        gate_hidden=[16],
    )  # fmt: skip
    routed = load_checkpoint(path, device="cpu")
    probs = sorted(routed.gate_probs(QUERIES))
    routed.threshold = routed.controller.threshold = (probs[1] + probs[2]) / 2
    return HFEngine.from_routed(routed)


def _streamed(engine, prompt, sampling, **kwargs):
    deltas: list[str] = []
    heard = []
    out = engine.stream(prompt, sampling, deltas.append, on_route=heard.append, **kwargs)
    assert "".join(deltas) == out.text
    return out, deltas, heard


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_plain_model_stream_joins_to_generate(tiny_backbone, sampling):
    model = with_large_random_weights(tiny_backbone.model, seed=0)  # replies that vary token by token
    engine = HFEngine(model, tiny_backbone.tokenizer, tiny_backbone.formatter)
    for query in QUERIES[:2]:
        prompt = tiny_backbone.formatter.prompt(query)
        (want,) = engine.generate([prompt], sampling, seeds=[11])
        out, deltas, heard = _streamed(engine, prompt, sampling, seed=11)
        assert out.text == want.text and out.token_ids == want.token_ids
        assert heard == [] and out.route is None
        assert len(deltas) > 2  # streamed, not sent in one piece


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_routed_stream_joins_to_generate_gated_and_forced(routed_engine, sampling):
    engine = routed_engine
    routes, pieces = set(), 0
    for query in QUERIES:
        prompt = engine.formatter.prompt(query)
        for mode, route in [("gated", None), ("on", None), ("off", None), ("gated", True), ("gated", False)]:
            forced = None if route is None else [route]
            (want,) = engine.generate([prompt], sampling, mode=mode, seeds=[5], route=forced)
            out, deltas, heard = _streamed(engine, prompt, sampling, mode=mode, seed=5, route=route)
            assert out.text == want.text, (query, mode, route)
            assert out.token_ids == want.token_ids
            assert [h.route for h in heard] == [out.route]
            pieces = max(pieces, len(deltas))
            if mode == "gated":
                assert out.route == want.route
                assert out.gate_prob == pytest.approx(want.gate_prob, abs=1e-5)
                routes.add(out.route)
            else:
                assert out.route == (mode == "on")
    assert routes == {True, False}  # the gate took both routes
    assert pieces > 2


def test_a_conversation_streams_on_its_first_turns_route(routed_engine):
    engine = routed_engine
    fmt = engine.formatter
    for query in QUERIES:
        (first,) = engine.generate([fmt.prompt(query)], GREEDY, mode="gated")
        prompt = fmt.prompt([query, "And then?"], replies=["Sure."])
        (want,) = engine.generate([prompt], GREEDY, mode="gated", route=[first.route])
        out, _, heard = _streamed(engine, prompt, GREEDY, mode="gated", first_turn=fmt.prompt(query))
        assert out.route == first.route
        assert out.gate_prob == pytest.approx(first.gate_prob, abs=1e-5)
        assert out.text == want.text


def test_an_engine_without_streaming_says_so_in_one_line(tiny_backbone):
    from prism_lightning.engines.base import Engine

    class NoStream(Engine):
        has_adapter = False

    with pytest.raises(ConfigError, match="does not stream"):
        NoStream(None, None, None).stream("hi", GREEDY, print)
