"""`serve` end to end: a real server process on a free localhost port, the embedded SmolLM2 checkpoint,
and the official `openai` client (plus raw HTTP where a client would refuse to send the bad request)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from prism_lightning.cli import main

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NAME = "smol"
QUESTIONS = [
    "What is 2+2?",
    "Name a color.",
    "Write one word about the sea.",
    "Who wrote Hamlet? Answer briefly, please.",
]


@pytest.fixture(scope="module")
def checkpoint(embedded_checkpoint) -> Path:
    return embedded_checkpoint


class Server:
    def __init__(self, proc: subprocess.Popen, log: Path, url: str) -> None:
        self.proc, self.log, self.url = proc, log, url
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@contextmanager
def running_server(
    checkpoint: Path, log: Path, *extra: str, timeout: float = 120, env: dict[str, str] | None = None
):
    """`python -m prism_lightning serve` on a free port (--port 0), ready (health 200), killed after;
    without an API key unless ``env`` sets $PRISM_API_KEY (one in the caller's environment is dropped)."""
    env = {
        **{k: v for k, v in os.environ.items() if k != "PRISM_API_KEY"},
        "OMP_NUM_THREADS": "2",
        **(env or {}),
    }
    device = [] if "vllm" in extra else ["--device", "cpu"]  # vLLM places the model itself
    cmd = [sys.executable, "-m", "prism_lightning", "serve", "--checkpoint", str(checkpoint), "--port", "0",
           *device, "--default_max_tokens", "8", *extra]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = None
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            found = re.search(r"on (http://\S+)/v1", log.read_text())
            if found:
                url = found.group(1)
                try:
                    if httpx.get(f"{url}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        assert url and proc.poll() is None, log.read_text()[-5000:]
        yield Server(proc, log, url)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with running_server(checkpoint, log, "--max_model_len", "2048") as running:
        yield running


def ask(server: Server, question: str, model: str = NAME, **kw):
    return server.client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=8, **kw
    )


def test_models_health_and_an_answer_with_its_route(server):
    assert [m.id for m in server.client.models.list()] == [NAME, f"{NAME}:on", f"{NAME}:off"]
    raw = ask(server, QUESTIONS[0])
    reply = raw.parse()
    prism = reply.model_extra["prism"]
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
    assert prism["mode"] == "gated" and prism["route"] == raw.headers["x-prism-route"]
    header_p = float(raw.headers["x-prism-gate-probability"])
    assert header_p == pytest.approx(prism["gate_probability"], abs=1e-6)
    assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 0

    stream = server.client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": QUESTIONS[0]}], temperature=0, max_tokens=8,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].model_extra["prism"] == prism
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == reply.choices[0].message.content  # token by token
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_forced_routes_and_greedy_answers_equal_chat(server, checkpoint, capsys):
    answers = {}
    for suffix, route in (("", "gated"), (":on", "on"), (":off", "off")):
        raw = ask(server, QUESTIONS[1], model=NAME + suffix)
        answers[route] = (raw.parse().choices[0].message.content, raw.headers["x-prism-route"])
    assert answers["on"][1] == "adapter" and answers["off"][1] == "base"
    assert answers["on"][0] != answers["off"][0]  # the adapter changes the answer
    with pytest.raises(SystemExit) as info:  # one load of the model: the gate decides here too
        main(["chat", "--checkpoint", str(checkpoint), "--device", "cpu", "--max_new_tokens", "8",
              QUESTIONS[1]])  # fmt: skip
    assert info.value.code == 0
    captured = capsys.readouterr()
    assert captured.out == answers["gated"][0] + "\n"
    assert f"[route: {answers['gated'][1]}" in captured.err


def check_kway_server(server: Server, routed) -> None:
    """A K-way checkpoint behind ``server`` (served as NAME): NAME routes by the K+1-way gate,
    NAME:<adapter> forces that adapter, NAME:off the base; each greedy answer equals the hf routed
    model's for the same route, and the response names the adapter that answered."""
    from prism_lightning.generation import SamplingConfig

    names = [NAME, f"{NAME}:on", f"{NAME}:off", f"{NAME}:numbers", f"{NAME}:code"]
    assert [m.id for m in server.client.models.list()] == names
    sampling = SamplingConfig(max_new_tokens=8)
    texts = {}
    for suffix, route in (("", None), (":numbers", "numbers"), (":code", "code"), (":off", False)):
        raw = ask(server, QUESTIONS[1], model=NAME + suffix)
        reply = raw.parse()
        alone = routed.chat([QUESTIONS[1]], route=route, sampling=sampling)
        prism = reply.model_extra["prism"]
        assert prism["adapter"] == alone.adapter and raw.headers.get("x-prism-adapter") == alone.adapter
        assert raw.headers["x-prism-route"] == ("adapter" if alone.route else "base")
        assert prism["gate_probability"] == pytest.approx(alone.gate_prob, abs=1e-4)
        assert reply.choices[0].message.content == alone.text
        texts[route] = alone.text
    assert texts[None] == texts[routed.choose_adapters([QUESTIONS[1]])[0] or False]
    assert len({texts["numbers"], texts["code"], texts[False]}) == 3  # each adapter answers its own way


def test_a_kway_checkpoint_is_served_with_per_request_routes(embedded_kway_checkpoint, tmp_path):
    from prism_lightning.model.export import load_checkpoint

    args = ("--max_model_len", "2048", "--served_model_name", NAME)
    with running_server(embedded_kway_checkpoint, tmp_path / "server.log", *args) as running:
        check_kway_server(running, load_checkpoint(embedded_kway_checkpoint, device="cpu"))


def test_32_concurrent_requests_each_equal_their_single_answer(server):
    # greedy and seeded sampling, gate-decided and forced routes, four prompt lengths
    specs = [(q, m, 0.8 if i % 2 else 0.0) for i, q in enumerate(QUESTIONS) for m in (NAME, f"{NAME}:on")]

    def run(spec):
        question, model, temperature = spec
        reply = server.client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=6,
            temperature=temperature, seed=11,
        )  # fmt: skip
        return reply.choices[0].message.content, reply.model_extra["prism"]["route"]

    single = [run(spec) for spec in specs]
    batches_before = server.metric("prism_batch_size_count")
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(run, specs * 4))
    assert together == single * 4
    assert server.metric("prism_batch_size_count") - batches_before < 32  # they really shared batches


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    good = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    long_prompt = "word " * 3000  # > 2048 tokens (--max_model_len)
    bad = [
        ({"model": NAME}, 400),
        ({**good, "messages": []}, 400),
        ({**good, "messages": "Hi"}, 400),
        ({**good, "messages": [{"role": "user", "content": 5}]}, 400),
        ({**good, "model": "gpt-4"}, 404),
        ({**good, "max_tokens": 0}, 400),
        ({**good, "max_tokens": -3}, 400),
        ({**good, "max_tokens": 5000}, 400),  # beyond the context
        ({**good, "messages": [{"role": "user", "content": long_prompt}]}, 400),
        ({**good, "temperature": "warm"}, 400),
        ({**good, "top_p": 1.5}, 400),
        ("{not json", 400),
    ]
    for body, status in bad:
        content = body if isinstance(body, str) else json.dumps(body)
        response = httpx.post(f"{server.url}/v1/chat/completions", content=content, timeout=60)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
        assert httpx.post(f"{server.url}/v1/chat/completions", json=good, timeout=60).status_code == 200
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        server.client.chat.completions.create(**{**good, "max_tokens": 0})
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(**{**good, "model": "nope"})


def test_a_client_leaving_mid_stream_stalls_no_one(server):
    cancelled = server.metric("prism_requests_cancelled_total")
    body = {"model": NAME, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 400, "temperature": 0, "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        got = [next(lines) for _ in range(6)]  # role chunk + a few tokens, then hang up
    assert any('"content"' in line for line in got)
    started = time.time()
    reply = ask(server, QUESTIONS[0]).parse()
    assert reply.choices[0].message.content
    deadline = time.time() + 30
    while server.metric("prism_requests_cancelled_total") == cancelled and time.time() < deadline:
        time.sleep(0.1)
    assert server.metric("prism_requests_cancelled_total") == cancelled + 1  # its row left the batch
    assert time.time() - started < 30


def test_a_short_request_joins_a_running_long_one_and_finishes_first(server):
    """Continuous batching, as a user sees it: a short request sent while a long generation streams gets
    its first token, and its whole answer, before the long one ends; both answers equal their lone ones."""
    long_body = {"model": NAME, "messages": [{"role": "user", "content": "Count from 1 to 1000, one number "
                 "per line."}], "max_tokens": 120, "temperature": 0}  # fmt: skip
    short_body = {"model": NAME, "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 8,
                  "temperature": 0.8, "seed": 3}  # fmt: skip

    def streamed(body, times: dict | None = None) -> str:
        parts = []
        for chunk in server.client.chat.completions.create(**body, stream=True):
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if piece:
                if times is not None:
                    times.setdefault("first", time.perf_counter())
                parts.append(piece)
        if times is not None:
            times["done"] = time.perf_counter()
        return "".join(parts)

    long_alone, short_alone = streamed(long_body), streamed(short_body)
    long_times: dict = {}
    with ThreadPoolExecutor(1) as pool:
        long_text = pool.submit(streamed, long_body, long_times)
        deadline = time.time() + 60
        while "first" not in long_times and time.time() < deadline:  # the long one is decoding
            time.sleep(0.01)
        short_times: dict = {}
        short_text = streamed(short_body, short_times)
        assert long_text.result(timeout=120) == long_alone
    assert short_text == short_alone
    assert long_times["first"] < short_times["first"] < short_times["done"] < long_times["done"]


def test_sigterm_finishes_the_request_in_flight_then_exits(server):
    """Last in this module: it stops the shared server."""
    result = {}

    def long_request():
        stream = server.client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": QUESTIONS[2]}], temperature=0,
            max_tokens=24, stream=True,
        )  # fmt: skip
        result["chunks"] = list(stream)

    thread = threading.Thread(target=long_request)
    thread.start()
    deadline = time.time() + 30
    while server.metric("prism_requests_running") < 1 and time.time() < deadline:
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    thread.join(timeout=60)
    assert server.proc.wait(timeout=60) == 0
    chunks = result["chunks"]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks)


def test_bad_cli_input_is_one_error_line(checkpoint, tmp_path, capsys):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = str(taken.getsockname()[1])
    cases = [
        (["--checkpoint", str(tmp_path / "missing")], "does not exist"),
        (["--checkpoint", str(checkpoint), "--port", port], "cannot listen on 127.0.0.1:" + port),
        (["--checkpoint", str(checkpoint), "--port", "70000"], "--port must be in 0..65535"),
        (["--checkpoint", str(checkpoint), "--threshold", "1.5"], "--threshold must be in (0, 1)"),
        (
            ["--checkpoint", str(checkpoint), "--engine", "vllm", "--scheduler", "static"],
            "--scheduler static is for --engine hf",
        ),  # fmt: skip
    ]
    try:
        for argv, message in cases:
            with pytest.raises(SystemExit) as info:
                main(["serve", *argv])
            err = capsys.readouterr().err
            assert info.value.code == 2 and message in err and "Traceback" not in err, err
            assert err.strip().splitlines()[-1].startswith("error: ")
    finally:
        taken.close()
