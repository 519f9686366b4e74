"""`serve` on a network: the API key, the body-size and nesting limits, the bound on requests in flight and
the per-request timeout, through a real server process, raw HTTP and the `openai` client; and the
command line's refusals (bad limits, a non-loopback host without a key, a missing web stack)."""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from prism_lightning.cli import main
from prism_lightning.serve.cli import is_loopback

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parent.parent
NAME = "smol"
KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 256 * 1024
TIMEOUT_S = 1  # the hurried server's: LONG's ~120 greedy tokens take several seconds on 2 cores
GOOD = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
# Greedy SmolLM2 counts to 20 (about 120 tokens): past the timeout on 2 CPU cores.
LONG = {**GOOD, "messages": [{"role": "user", "content": "Count from 1 to 1000, one number per line."}],
        "max_tokens": 1500}  # fmt: skip


class Client:
    """Raw HTTP and the openai client against one server, with the key."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.openai = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)

    def post(self, body, headers=AUTH, **kw) -> httpx.Response:
        content = json.dumps(body) if isinstance(body, dict) else body
        return httpx.post(
            f"{self.url}/v1/chat/completions", content=content, headers=headers, timeout=60, **kw
        )

    def metric(self, name: str, label: str = "") -> float:
        text = httpx.get(f"{self.url}/metrics", headers=AUTH).text
        found = [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(name + label + " ")]
        return float(found[0]) if found else 0.0

    def refused(self, reason: str) -> float:
        return self.metric("prism_refused_total", f'{{reason="{reason}"}}')


def _serve(checkpoint, log, timeout_s: float):
    """A server with the key from $PRISM_API_KEY, one running request and one waiting at most, a 256 KiB
    body limit and the given per-request timeout."""
    from test_serve import running_server

    extra = ["--max_model_len", "2048", "--max_batch_size", "1", "--max_queue", "1",
             "--max_body_bytes", str(BODY_LIMIT), "--request_timeout", str(timeout_s)]  # fmt: skip
    return running_server(checkpoint, log, *extra, env={"PRISM_API_KEY": KEY})


@pytest.fixture(scope="module")
def server(embedded_checkpoint, tmp_path_factory):
    """The limits and the key; a timeout long enough never to interfere with them."""
    log = tmp_path_factory.mktemp("serve-limits") / "server.log"
    with _serve(embedded_checkpoint, log, 120) as running:
        assert "(an API key required)" in log.read_text()
        yield Client(running.url)


@pytest.fixture(scope="module")
def hurried_server(embedded_checkpoint, tmp_path_factory):
    """The same with a timeout shorter than LONG's answer takes on any machine this suite runs on."""
    with _serve(
        embedded_checkpoint, tmp_path_factory.mktemp("serve-hurried") / "server.log", TIMEOUT_S
    ) as running:
        yield Client(running.url)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.integration
@pytest.mark.slow
def test_the_key_is_required_everywhere_but_health(server):
    assert httpx.get(f"{server.url}/health").status_code == 200  # open: a load balancer's probe
    for path in ("/v1/models", "/metrics"):
        error = _error(httpx.get(server.url + path), 401)
        assert error["type"] == "invalid_request_error" and "Authorization: Bearer" in error["message"]
    missing = server.post(GOOD, headers={})
    assert _error(missing, 401)["code"] is None and missing.headers["www-authenticate"] == "Bearer"
    for header in (f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", "Bearer", f"Basic {KEY}", KEY):
        assert server.post(GOOD, headers={"Authorization": header}).status_code == 401, header
    assert (
        _error(server.post(GOOD, headers={"Authorization": "Bearer wrong"}), 401)["code"] == "invalid_api_key"
    )
    assert (
        server.post(GOOD, headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    )  # scheme: any case

    assert [m.id for m in server.openai.models.list()] == [NAME, f"{NAME}:on", f"{NAME}:off"]
    reply = server.openai.chat.completions.create(**GOOD)
    assert reply.choices[0].message.content
    stranger = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.chat.completions.create(**GOOD)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    assert server.refused("unauthorized") >= 9


@pytest.mark.integration
@pytest.mark.slow
def test_a_large_body_gets_413_before_it_is_read_or_parsed(server):
    before = server.refused("body_too_large")
    padding = BODY_LIMIT - len(json.dumps({**GOOD, "user": ""})) - 10
    fits = server.post({**GOOD, "user": "x" * padding})  # `user` is a field the server ignores
    assert fits.status_code == 200, fits.text
    declared = server.post({**GOOD, "user": "x" * (BODY_LIMIT + 1)})  # Content-Length says it all
    assert _error(declared, 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted while it streams in, 20 MiB, refused after 256 KiB
        yield json.dumps(GOOD)[:-1].encode() + b', "user": "'
        for _ in range(320):
            yield b"x" * 65536

    started = time.time()
    chunked = server.post(chunks())
    assert chunked.request.headers["transfer-encoding"] == "chunked"
    assert _error(chunked, 413)["code"] == "request_too_large" and time.time() - started < 10
    with pytest.raises(openai.APIStatusError) as info:
        server.openai.chat.completions.create(**{**GOOD, "user": "x" * (BODY_LIMIT + 1)})
    assert info.value.status_code == 413
    assert server.refused("body_too_large") == before + 3
    assert server.post(GOOD).status_code == 200


@pytest.mark.integration
@pytest.mark.slow
def test_deep_nesting_and_huge_numbers_are_400_not_500(server):
    deep = 100_000
    nested = b"[" * deep + b"]" * deep
    assert _error(server.post(nested), 400)["code"] == "nesting_too_deep"
    inside = json.dumps(GOOD).replace('"Hi"', "[" * 65 + "]" * 65)  # 1 + 1 + 1 + 65 levels
    assert _error(server.post(inside), 400)["code"] == "nesting_too_deep"
    assert server.post({**GOOD, "user": '"[{\\' * 500}).status_code == 200  # brackets in strings: no nesting
    assert _error(server.post("1" * 5000), 400)["type"] == "invalid_request_error"  # int() digit limit
    assert _error(server.post(b'{"model": "\xff"}'), 400)["message"].startswith("The request body is not")
    assert server.refused("nesting_too_deep") == 2
    assert server.post(GOOD).status_code == 200


@pytest.mark.integration
@pytest.mark.slow
def test_a_full_queue_answers_429_with_retry_after(server):
    """--max_batch_size 1 --max_queue 1: one request runs, one waits, the third is refused at once."""
    before = server.refused("queue_full")
    with ThreadPoolExecutor(1) as pool, httpx.Client(timeout=60) as running_client:
        with running_client.stream("POST", f"{server.url}/v1/chat/completions", headers=AUTH,
                                   json={**LONG, "stream": True}) as running:  # fmt: skip
            lines = running.iter_lines()
            assert next(lines).startswith("data: ")  # its batch runs
            waiting = pool.submit(server.post, GOOD)  # waits for that batch to end
            deadline = time.time() + 5
            while server.metric("prism_requests_in_flight") < 2 and time.time() < deadline:
                time.sleep(0.05)
            refused = server.post(GOOD)
            assert _error(refused, 429)["code"] == "queue_full" and refused.headers["retry-after"] == "1"
            with pytest.raises(openai.RateLimitError):
                server.openai.chat.completions.create(**GOOD)
        # the running stream's client left: its row ends, the waiting request runs
        assert waiting.result(timeout=60).status_code == 200
    assert server.refused("queue_full") == before + 2
    deadline = time.time() + 10
    while server.metric("prism_requests_in_flight") > 0 and time.time() < deadline:
        time.sleep(0.05)
    assert server.metric("prism_requests_in_flight") == 0  # every slot came back
    assert server.post(GOOD).status_code == 200


@pytest.mark.integration
@pytest.mark.slow
def test_a_request_past_its_timeout_is_cancelled(hurried_server):
    server = hurried_server
    cancelled = server.metric("prism_requests_cancelled_total")
    started = time.time()
    error = _error(server.post(LONG), 504)
    assert error["code"] == "timeout" and TIMEOUT_S <= time.time() - started < TIMEOUT_S + 10
    stream = server.openai.chat.completions.create(**LONG, stream=True)
    with pytest.raises(openai.APIError, match="request timeout"):  # the error event ends the stream
        for _chunk in stream:
            pass
    assert server.refused("timeout") == 2
    deadline = time.time() + 20
    while server.metric("prism_requests_cancelled_total") < cancelled + 2 and time.time() < deadline:
        time.sleep(0.1)
    assert server.metric("prism_requests_cancelled_total") == cancelled + 2  # both rows left the batch
    assert server.post(GOOD).status_code == 200


# -- the command line: all refused before the checkpoint is even looked at -------------------------------


def _one_error_line(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(["serve", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max_body_bytes", "0"], "--max_body_bytes must be >= 1"),
        (["--max_queue", "-1"], "--max_queue must be >= 0"),
        (["--request_timeout", "0"], "--request_timeout must be a number of seconds > 0"),
        (["--request_timeout", "-5"], "--request_timeout must be a number of seconds > 0"),
        (["--request_timeout", "nan"], "--request_timeout must be a number of seconds > 0"),
        (["--api_key", ""], "--api_key must be a non-empty key"),
        (["--api_key", "two words"], "--api_key must be a non-empty key"),
        (["--host", "0.0.0.0"], "--host 0.0.0.0 can be reached from other machines and no API key is set"),
    ],
)
def test_bad_network_options_are_one_error_line(extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PRISM_API_KEY", raising=False)
    line = _one_error_line(["--checkpoint", str(tmp_path / "missing"), *extra], capsys)
    assert message in line


def test_an_open_host_needs_a_key_or_an_explicit_yes(tmp_path, capsys, monkeypatch):
    missing = ["--checkpoint", str(tmp_path / "missing"), "--host", "0.0.0.0"]
    monkeypatch.delenv("PRISM_API_KEY", raising=False)
    # past the host check: the next error is the missing checkpoint
    assert "does not exist" in _one_error_line([*missing, "--allow_unauthenticated"], capsys)
    assert "does not exist" in _one_error_line([*missing, "--api_key", KEY], capsys)
    monkeypatch.setenv("PRISM_API_KEY", KEY)
    assert "does not exist" in _one_error_line(missing, capsys)
    monkeypatch.setenv("PRISM_API_KEY", "bad key")
    assert "$PRISM_API_KEY must be" in _one_error_line(missing, capsys)
    assert "does not exist" in _one_error_line([*missing, "--api_key", KEY], capsys)  # the flag wins
    monkeypatch.setenv("PRISM_API_KEY", "")  # empty: unset
    assert "no API key is set" in _one_error_line(missing, capsys)
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::")


@pytest.mark.parametrize("package", ["fastapi", "uvicorn", "prometheus_client"])
def test_a_missing_web_stack_is_one_error_line_naming_it(package, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if it were not installed
    line = _one_error_line(["--checkpoint", str(tmp_path / "missing")], capsys)
    assert (
        f"`{package}` cannot be imported" in line and "pip install fastapi uvicorn prometheus_client" in line
    )


def test_the_server_packages_are_installed_by_default():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("=")[0] for dep in project["dependencies"]}
    assert {"fastapi", "uvicorn", "prometheus_client"} <= names
    assert project["optional-dependencies"]["serve"] == []  # kept so `.[serve]` still installs
