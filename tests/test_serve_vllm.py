"""`serve --engine vllm` on the real vLLM engine (CPU build): one server process, the embedded SmolLM2
checkpoint, the official `openai` client. Routes come from the prefix gate before admission and must
equal the hf engine's; greedy answers on both routes must equal the hf routed model's; bad requests,
a client leaving mid-stream and SIGTERM are checked as for the hf engine, and a base request sent
together with adapter requests must still get the base answer."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm", reason="the vllm extra is not installed")
import test_serve  # noqa: E402  (one way to start a server, the same checks)
from test_serve import NAME, QUESTIONS, ask, check_kway_server, running_server  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.second_tier]


@pytest.fixture(scope="module")
def server(embedded_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-vllm") / "server.log"
    args = ("--engine", "vllm", "--max_model_len", "512", "--max_batch_size", "8")
    with running_server(embedded_checkpoint, log, *args, timeout=240) as running:
        yield running


@pytest.fixture(scope="module")
def hf_routed(embedded_checkpoint):
    from prism_lightning.model.export import load_checkpoint

    return load_checkpoint(embedded_checkpoint, device="cpu")


def test_routes_and_greedy_answers_equal_the_hf_engine(server, hf_routed):
    from prism_lightning.generation import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=8)
    for suffix, route in (("", None), (":on", True), (":off", False)):
        raw = ask(server, QUESTIONS[0], model=NAME + suffix)
        reply = raw.parse()
        alone = hf_routed.chat([QUESTIONS[0]], route=route, sampling=sampling)
        assert raw.headers["x-prism-route"] == ("adapter" if alone.route else "base")
        assert reply.model_extra["prism"]["gate_probability"] == pytest.approx(alone.gate_prob, abs=1e-4)
        assert reply.choices[0].message.content == alone.text


def test_a_kway_checkpoint_is_served_with_per_request_routes(embedded_kway_checkpoint, tmp_path):
    """Each request carries the LoRARequest of the adapter the routing rule picks (or none)."""
    from prism_lightning.model.export import load_checkpoint

    args = ("--engine", "vllm", "--max_model_len", "512", "--max_batch_size", "8")
    args += ("--served_model_name", NAME)
    with running_server(embedded_kway_checkpoint, tmp_path / "server.log", *args, timeout=240) as running:
        check_kway_server(running, load_checkpoint(embedded_kway_checkpoint, device="cpu"))


def test_streaming_and_concurrent_requests(server):
    questions = QUESTIONS[:2]
    single = [ask(server, q, model=f"{NAME}:on").parse().choices[0].message.content for q in questions]
    stream = server.client.chat.completions.create(
        model=f"{NAME}:on", messages=[{"role": "user", "content": QUESTIONS[0]}], temperature=0, max_tokens=8,
        stream=True,
    )  # fmt: skip
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == single[0]

    def run(question):
        return ask(server, question, model=f"{NAME}:on").parse().choices[0].message.content

    with ThreadPoolExecutor(6) as pool:  # vLLM batches them (continuous batching)
        assert list(pool.map(run, questions * 3)) == single * 3


def test_a_base_request_beside_adapter_requests_gets_the_base_answer(server):
    """On vLLM's CPU build a request without an adapter that shares an engine step with adapter requests
    runs the last adapter; the serve engine admits one group at a time there, so a ``:off`` request sent
    together with ``:on`` requests answers as when sent alone."""
    question = QUESTIONS[0]

    def run(model):
        return ask(server, question, model=model).parse().choices[0].message.content

    off, on = run(f"{NAME}:off"), run(f"{NAME}:on")
    assert off != on  # the adapter changes this answer, else the check below would prove nothing
    models = [f"{NAME}:on", f"{NAME}:on", f"{NAME}:off", f"{NAME}:on", f"{NAME}:off"]
    with ThreadPoolExecutor(len(models)) as pool:
        answers = list(pool.map(run, models))
    assert answers == [off if m.endswith(":off") else on for m in models]


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    test_serve.test_bad_requests_get_openai_errors_and_the_server_goes_on(server)


def test_a_client_leaving_mid_stream_stalls_no_one(server):
    test_serve.test_a_client_leaving_mid_stream_stalls_no_one(server)


def test_sigterm_finishes_the_request_in_flight_then_exits(server):
    """Last in this module: it stops the server."""
    test_serve.test_sigterm_finishes_the_request_in_flight_then_exits(server)
