"""The streaming path shared by `serve` and `chat`, on the tiny random model: the per-step hook of the
generation engine, incremental detokenisation with stop strings, and routed batches that settle gated,
forced and multi-turn routes in one prefill."""

from __future__ import annotations

import pytest

from prism_lightning.engines.text_stream import TextStream
from prism_lightning.generation import SamplingConfig, generate_batch
from prism_lightning.serve.protocol import APIError, parse_chat_request
from prism_lightning.testing import untrained_checkpoint, with_large_random_weights

QUERIES = [
    "Write a short poem about the sea.",
    "What is twelve times seven?",
    "Hi",
    "Explain photosynthesis.",
]


@pytest.fixture(scope="module")
def parts(tiny_backbone):
    """Larger random weights, so greedy answers vary from token to token (as in test_generation)."""
    model = with_large_random_weights(tiny_backbone.model, seed=0)
    prompts = [tiny_backbone.formatter.prompt(q) for q in QUERIES]
    return model, tiny_backbone.tokenizer, prompts


def _stream(model, tokenizer, prompts, sampling, *, stop=(), end=None):
    streams = [TextStream(tokenizer, stop) for _ in prompts]
    deltas: list[list[str]] = [[] for _ in prompts]
    seen: dict[int, str] = {}

    def on_step(new_tokens, finished):
        ended = []
        for row, token in new_tokens.items():
            deltas[row].append(streams[row].add(token))
            if streams[row].stopped or (end is not None and end(row, streams[row])):
                ended.append(row)
        seen.update(finished)
        return ended

    outs = generate_batch(model, tokenizer, prompts, sampling, seeds=[7] * len(prompts), on_step=on_step)
    for row, stream in enumerate(streams):
        deltas[row].append(stream.finish())
    return outs, streams, deltas, seen


def test_streamed_deltas_add_up_to_the_answer_and_the_hook_changes_nothing(parts):
    model, tokenizer, prompts = parts
    for sampling in (SamplingConfig(max_new_tokens=10), SamplingConfig(10, temperature=0.9, top_p=0.8)):
        plain = generate_batch(model, tokenizer, prompts, sampling, seeds=[7] * len(prompts))
        outs, streams, deltas, finished = _stream(model, tokenizer, prompts, sampling)
        assert [o.token_ids for o in outs] == [p.token_ids for p in plain]
        for out, stream, parts_ in zip(outs, streams, deltas, strict=True):
            assert "".join(parts_) == out.text == stream.text
            assert stream.token_ids == out.token_ids
            assert sum(bool(d) for d in parts_) > 1  # really token by token
        assert finished == {i: o.finish_reason for i, o in enumerate(outs)}


def test_a_row_ended_by_the_hook_leaves_the_batch_and_the_others_are_unchanged(parts):
    model, tokenizer, prompts = parts
    sampling = SamplingConfig(max_new_tokens=10)
    plain = generate_batch(model, tokenizer, prompts, sampling)
    outs, *_ = _stream(
        model, tokenizer, prompts, sampling, end=lambda row, s: row == 1 and len(s.token_ids) == 3
    )
    assert outs[1].finish_reason == "cancelled" and outs[1].token_ids == plain[1].token_ids[:3]
    for i in (0, 2, 3):
        assert outs[i].token_ids == plain[i].token_ids and outs[i].finish_reason == plain[i].finish_reason


def test_stop_strings_cut_the_answer_and_end_the_row(parts):
    model, tokenizer, prompts = parts
    sampling = SamplingConfig(max_new_tokens=10)
    plain = generate_batch(model, tokenizer, prompts[:1], sampling)[0]
    words = plain.text.split()
    assert len(words) > 2, plain.text
    stop = " " + words[2]
    outs, streams, deltas, _ = _stream(model, tokenizer, prompts[:1], sampling, stop=[stop, "never-said"])
    cut = plain.text[: plain.text.index(stop)].strip()
    assert streams[0].stopped and "".join(deltas[0]) == streams[0].text == cut
    assert len(outs[0].token_ids) < len(plain.token_ids)  # ended early, not decoded to the limit


def test_text_stream_holds_back_a_possible_stop_string_and_trailing_space(tiny_backbone):
    tokenizer = tiny_backbone.tokenizer
    ids = tokenizer("The answer is eighty four. ", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, stop=["four. Done"])
    sent = "".join(stream.add(t) for t in ids)
    assert sent == "The answer is eighty"  # " four." could still become the stop string
    assert sent + stream.finish() == "The answer is eighty four."


def _body(**overrides):
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **overrides}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "messages"),
        (_body(messages=[]), "messages"),
        (_body(messages="hi"), "messages"),
        (_body(messages=[{"role": "user", "content": 3}]), "messages"),
        (_body(messages=[{"role": "wizard", "content": "x"}]), "messages"),
        (
            _body(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
            "messages",
        ),  # fmt: skip
        (_body(messages=[{"role": "user", "content": "  "}]), "messages"),
        (_body(model="other"), "model"),
        (_body(max_tokens=0), "max_tokens"),
        (_body(max_tokens=2.5), "max_tokens"),
        (_body(temperature="hot"), "temperature"),
        (_body(temperature=3), "temperature"),
        (_body(top_p=0), "top_p"),
        (_body(seed="x"), "seed"),
        (_body(stop=["a", "b", "c", "d", "e"]), "stop"),
        (_body(stop=[""]), "stop"),
        (_body(n=2), "n"),
        (_body(logprobs=True), "logprobs"),
        (_body(stream="yes"), "stream"),
    ],
)
def test_bad_fields_name_their_parameter(body, param):
    with pytest.raises(APIError) as info:
        parse_chat_request(body, "m")
    assert info.value.param == param and 400 <= info.value.status < 500
    assert set(info.value.body()["error"]) == {"message", "type", "param", "code"}


def test_model_suffix_sets_the_route_and_conversations_parse():
    body = _body(
        model="m:off",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "first"}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "second"},
        ],
        max_completion_tokens=5,
        stop="\n",
    )
    req = parse_chat_request(body, "m")
    assert (req.route, req.mode, req.system) == (False, "off", "Be brief.")
    assert (req.user_turns, req.replies, req.max_tokens, req.stop) == (["first", "second"], ["ok"], 5, ["\n"])
    assert parse_chat_request(_body(model="m:on"), "m").route is True
    assert parse_chat_request(_body(), "m").route is None


@pytest.fixture(scope="module")
def tiny_routed(tiny_model_dir, tmp_path_factory):
    """A tiny exported checkpoint with a visible adapter and a gate that routes some prompts only."""
    from prism_lightning.model.export import load_checkpoint

    path = untrained_checkpoint(
        str(tiny_model_dir),
        tmp_path_factory.mktemp("ckpt") / "run",
        lora_std=0.5,
        lora_rank=4,
        gate_hidden=[16],
    )
    return load_checkpoint(path, device="cpu")


def test_one_routed_batch_settles_gated_forced_and_multi_turn_routes(tiny_routed):
    """Every row of a mixed batch gets the route and the answer it gets alone through RoutedModel.chat
    (the first user turn decides; :on/:off force)."""
    from prism_lightning.engines.hf_stream import RoutedBatchRunner, RowSpec

    routed = tiny_routed
    sampling = SamplingConfig(max_new_tokens=6)
    probs = sorted(routed.gate_probs(QUERIES))
    routed.threshold = (probs[1] + probs[2]) / 2  # the random gate splits these prompts two and two
    convs = [([q], [], None) for q in QUERIES] + [
        ([QUERIES[0]], [], False),
        ([QUERIES[1]], [], True),
        ([QUERIES[2], "And then?"], ["Sure."], None),
    ]

    def encode(prompt):
        return list(routed.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    rows = [
        RowSpec(
            encode(routed.formatter.prompt(turns, replies=replies)),
            sampling,
            route=route,
            first_turn_ids=encode(routed.formatter.prompt(turns[0])) if len(turns) > 1 else None,
        )
        for turns, replies, route in convs
    ]
    heard = []
    runner = RoutedBatchRunner(routed)
    try:
        outs, routes = runner.run(rows, on_route=heard.append)
    finally:
        runner.close()
    assert heard == [routes]
    for (turns, replies, route), out, got in zip(convs, outs, routes, strict=True):
        alone = routed.chat(turns, replies, route=route, sampling=sampling)
        assert got.route == alone.route
        assert got.gate_prob == pytest.approx(alone.gate_prob, abs=1e-5)
        assert out.token_ids == alone.token_ids
    assert {r.route for r in routes} == {True, False}


def test_k_way_model_names_and_one_routed_batch_for_a_k_way_checkpoint(tiny_model_dir, tmp_path):
    """NAME:<adapter> forces that adapter; in one batch every K-way row gets the route RoutedModel.chat
    gives it alone: gated, a named adapter, off, and a conversation whose first turn decides."""
    from prism_lightning.engines.hf_stream import RoutedBatchRunner, RowSpec
    from prism_lightning.model.export import load_checkpoint

    assert parse_chat_request(_body(model="m:b"), "m", ["a", "b"]).route == "b"
    assert parse_chat_request(_body(model="m:b"), "m", ["a", "b"]).mode == "on"
    with pytest.raises(APIError, match="m:a, m:b"):
        parse_chat_request(_body(model="m:c"), "m", ["a", "b"])
    path = untrained_checkpoint(
        str(tiny_model_dir), tmp_path / "kway", lora_std=0.5, lora_rank=4, gate_hidden=[16], gate_std=3.0,
        adapters={"numbers": ["math"], "code": ["coding"]}, personas=("math", "coding"),
    )  # fmt: skip
    routed = load_checkpoint(path, device="cpu")
    runner = RoutedBatchRunner(routed)
    sampling = SamplingConfig(max_new_tokens=6)
    cases = [(["Add two and two."], None), (["Sort a list."], "code"), (["Hello."], False),
             (["What is seven squared?", "And eight?"], None)]  # fmt: skip
    rows, want = [], []
    for turns, route in cases:
        replies = ["Forty nine."] if len(turns) > 1 else []
        ids = routed.tokenizer(routed.formatter.prompt(turns, replies=replies), add_special_tokens=False)
        first = routed.tokenizer(routed.formatter.prompt(turns[0]), add_special_tokens=False)["input_ids"]
        first_turn = first if replies else None
        rows.append(RowSpec(ids["input_ids"], sampling, route=route, first_turn_ids=first_turn))
        want.append(routed.chat(turns, replies, route=route, sampling=sampling))
    try:
        outs, routes = runner.run(rows)
    finally:
        runner.close()
    assert [r.adapter for r in routes] == [w.adapter for w in want]
    assert [r.route for r in routes] == [w.route for w in want]
    assert [r.gate_prob for r in routes] == pytest.approx([w.gate_prob for w in want], abs=1e-5)
    assert [o.token_ids for o in outs] == [w.token_ids for w in want]
    assert routes[1].adapter == "code" and routes[2].adapter is None


def test_rows_joining_a_running_batch_get_their_lone_answers_and_routes(tiny_routed):
    """Continuous batching: rows admitted while others decode (one, then two at once, one more after a
    row has left) each get the tokens and the route they get alone; a row dropped mid-way leaves the
    others unchanged, and the batch empties when the last row ends."""
    from prism_lightning.engines.hf_stream import RoutedBatchRunner, RoutedRunningBatch, RowSpec

    routed = tiny_routed
    probs = sorted(routed.gate_probs(QUERIES))
    routed.threshold = (probs[1] + probs[2]) / 2  # the gate splits these prompts two and two
    greedy, sampled = SamplingConfig(max_new_tokens=9), SamplingConfig(max_new_tokens=7, temperature=0.9)

    def encode(turns):
        return list(routed.tokenizer(routed.formatter.prompt(turns), add_special_tokens=False)["input_ids"])

    cases = [(QUERIES[0], None, greedy), (QUERIES[1], None, sampled), (QUERIES[2], True, greedy),
             (QUERIES[3], None, greedy), (QUERIES[2], False, sampled),
             (QUERIES[1], None, greedy)]  # fmt: skip
    rows = [RowSpec(encode([q]), s, seed=5 + i, route=r) for i, (q, r, s) in enumerate(cases)]
    want = [routed.chat([q], route=r, sampling=s, seed=5 + i) for i, (q, r, s) in enumerate(cases)]
    runner = RoutedBatchRunner(routed)
    batch = RoutedRunningBatch(runner)
    got: dict[int, list[int]] = {i: [] for i in range(len(rows))}
    routes: dict[int, bool] = {}
    ends: dict[int, str] = {}

    def book(result):
        tokens, finished = result
        for key, token in tokens.items():
            got[key].append(token)
        ends.update(finished)

    def admit(keys):
        def heard(rs):
            routes.update(zip(keys, (r.route for r in rs), strict=True))

        book(batch.admit(keys, [rows[k] for k in keys], heard))

    try:
        admit([0])
        book(batch.step())
        admit([1, 2])  # two newcomers of different lengths in one prefill
        book(batch.step())
        book(batch.step())
        admit([3])
        book(batch.step())
        batch.drop([3])  # e.g. its client left
        admit([4, 5])
        while len(batch):
            book(batch.step())
    finally:
        runner.close()
    assert 3 not in ends
    for key in (0, 1, 2, 4, 5):
        assert got[key] == want[key].token_ids, key
        assert routes[key] == want[key].route, key
    assert got[3] == want[3].token_ids[: len(got[3])]
    assert {routes[k] for k in (0, 1, 3, 5)} == {True, False}  # gate-decided routes differ in the batch
