"""An OpenAI-compatible endpoint as the bootstrap's judge (``data.bootstrap.judge: {base_url, model,
api_key_env}``), through the real CLI against this project's own ``serve`` (a real server process on the
embedded SmolLM2, with an API key): strict verdicts are parsed and record the judge; the logprob rule,
which ``serve`` cannot answer, fails before any stage with one error line; a refused key and an
unreachable server are one error line each, and the finished stages stay. Plus the pure pieces: the
config's checks, the endpoint's messages and its option scores."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prism_lightning.backbone import BackboneConfig
from prism_lightning.bootstrap import stage_stores
from prism_lightning.bootstrap.config import JudgeConfig
from prism_lightning.bootstrap.prompts import VERDICT_OPTIONS
from prism_lightning.bootstrap.verdicts import parse_verdict, strict_verdict
from prism_lightning.engines.endpoint import MessagesFormatter, option_scores_from_tokens
from prism_lightning.errors import ConfigError
from prism_lightning.testing import TINY_FIT_YAML, tiny_bootstrap_config

ROOT = Path(__file__).resolve().parent.parent
KEY = "judge-test-key-5d1c"


# --- the pure pieces -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, message",
    [
        ({"base_url": "http://x/v1"}, "judge.model is missing"),
        ({"base_url": "http://x/v1", "model": "m", "dtype": "float32"}, "one or the other"),
        ({"model": "m", "api_key_env": "K"}, "only an endpoint takes"),
        ({"base_url": "ftp://x", "model": "m"}, "must start with http"),
        ({"base_url": "http://x/v1", "model": "m", "key": "secret"}, "unknown bootstrap.judge key"),
    ],
)
def test_judge_config_is_a_local_model_or_an_endpoint(value, message):
    with pytest.raises(ConfigError, match=message):
        tiny_bootstrap_config(judge=value)


def test_the_stage_hash_covers_the_endpoint_but_not_its_key(tmp_path, monkeypatch):
    bb = BackboneConfig(model="some/model")
    judge = {"base_url": "http://127.0.0.1:1/v1", "model": "m", "api_key_env": "JUDGE_KEY"}

    def verdicts(**settings):
        return stage_stores(tiny_bootstrap_config(verdict_rule="strict", **settings), bb, tmp_path)[
            "verdicts"
        ]

    ours = verdicts(judge=judge)
    assert ours.hash != verdicts().hash  # the self-judge
    assert ours.hash != verdicts(judge={**judge, "base_url": "http://127.0.0.1:2/v1"}).hash
    assert ours.hash != verdicts(judge={**judge, "model": "other"}).hash
    assert ours.hash == verdicts(judge={**judge, "api_key_env": "OTHER", "timeout": 5}).hash
    assert ours.settings["judge"] == {"base_url": judge["base_url"], "model": "m", "option_scores": False}
    # a local judge keeps the hash it had before endpoints existed (its backbone keys)
    local = JudgeConfig(model="some/judge")
    assert local.identity("logprob") == BackboneConfig(model="some/judge").__dict__


def test_the_endpoint_sees_the_judge_prompt_as_messages():
    fmt = MessagesFormatter()
    assert fmt.prompt("Q", reply_start="Verdict:") == [{"role": "user", "content": "Q"}]
    assert fmt.prompt("Q", "ctx", "system") == [
        {"role": "system", "content": "ctx"},
        {"role": "user", "content": "Q"},
    ]
    assert fmt.prompt("Q", "ctx", "user") == [{"role": "user", "content": "ctx\n\nQ"}]


def test_option_scores_from_an_endpoints_top_tokens():
    top = {" A": -0.1, "A": -3.0, "B": -2.5, "T": -4.0, "The": -1.0}
    scores = option_scores_from_tokens(top, VERDICT_OPTIONS)
    assert scores["A"] == pytest.approx(-0.1 + math.log1p(math.exp(-2.9)))  # " A" and "A"
    assert scores["B"] == -2.5
    assert scores["TIE"] == -4.0  # "T" starts only TIE's spellings; "The" spells no option
    none = option_scores_from_tokens({"x": -0.5, "y": -7.0}, VERDICT_OPTIONS)
    assert none == {"A": -7.0, "B": -7.0, "TIE": -7.0}  # below the least returned log-probability


def test_an_endpoint_failing_mid_stage_loses_no_finished_rows(tiny_model_dir, tmp_path):
    """A server that breaks after a few requests (a stand-in that answers "A", since the failure has to come
    in the middle of the verdict stage): one PrismError, the finished batches stay, the rerun resumes."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prism_lightning.bootstrap import run_bootstrap
    from prism_lightning.errors import PrismError

    budget = {"requests": 5}  # the probe + one batch of two pairs in two orders

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            budget["requests"] -= 1
            ok = budget["requests"] >= 0
            answer = {"choices": [{"message": {"content": "A"}, "finish_reason": "stop"}]}
            body = (
                {**answer, "usage": {"completion_tokens": 1}} if ok else {"error": {"message": "overloaded"}}
            )
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        judge = {"base_url": f"http://127.0.0.1:{server.server_address[1]}/v1", "model": "m"}
        config = tiny_bootstrap_config(verdict_rule="strict", judge=judge)
        backbone, trainer = BackboneConfig(model=str(tiny_model_dir)), {"accelerator": "cpu"}
        with pytest.raises(PrismError, match="HTTP 503: overloaded"):
            run_bootstrap(config, backbone, tmp_path / "run", trainer)
        shard = next((tmp_path / "run/bootstrap").glob("verdicts-*/shard-0.jsonl"))
        assert len(shard.read_text().splitlines()) == 2  # the first batch
        budget["requests"] = 10**6
        resumed = run_bootstrap(config, backbone, tmp_path / "run", trainer)
    finally:
        server.shutdown()
    stages = resumed.summary["stages"]
    assert stages["queries"]["cached"] and stages["answers"]["cached"]
    assert stages["verdicts"]["resumed_rows"] == 2
    assert len(resumed.rows("verdicts")) == len(resumed.rows("answers"))
    assert all(r["order_persona_first"]["parsed"] == "A" for r in resumed.rows("verdicts"))


# --- through the real CLI against a real `serve` -------------------------------------------------------


@pytest.fixture(scope="module")
def judge_server(embedded_checkpoint, tmp_path_factory):
    """`python -m prism_lightning serve` on the embedded SmolLM2 checkpoint, with an API key."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_serve import running_server

    log = tmp_path_factory.mktemp("judge-serve") / "server.log"
    with running_server(
        embedded_checkpoint, log, "--max_model_len", "2048", env={"PRISM_API_KEY": KEY}
    ) as srv:
        yield srv


def _bootstrap(work: Path, *args: str, key: str | None = KEY) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("JUDGE_KEY", None)
    if key is not None:
        env["JUDGE_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "prism_lightning", "bootstrap", "--config", str(ROOT / "configs/default.yaml"),
         "--config", "tiny.yaml", *args], cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _endpoint_args(url: str, rule: str) -> list[str]:
    # the checkpoint served as "smol"; ":off" asks for its base model (no adapter)
    judge = {"base_url": f"{url}/v1", "model": "smol:off", "api_key_env": "JUDGE_KEY"}
    args = [f"--data.bootstrap.judge.{key}={value}" for key, value in judge.items()]
    return [*args, f"--data.bootstrap.verdict_rule={rule}"]


def _one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


@pytest.mark.integration
@pytest.mark.slow
def test_cli_bootstrap_with_an_endpoint_as_judge(judge_server, tiny_model_dir, tmp_path):
    work = tmp_path
    (work / "tiny.yaml").write_text(TINY_FIT_YAML.format(model=tiny_model_dir))
    boot = work / "runs/tiny/bootstrap"

    # the logprob rule: serve refuses `logprobs`, so the run stops at its probe, before any stage
    line = _one_error_line(
        _bootstrap(work, *_endpoint_args(judge_server.url, "logprob")), "verdict_rule: strict"
    )
    assert "log-probabilities" in line and not boot.exists()
    # a key the server does not accept
    _one_error_line(_bootstrap(work, *_endpoint_args(judge_server.url, "strict"), key="wrong"), "HTTP 401")
    assert not boot.exists()

    # strict: the endpoint's free-text verdicts in both orders
    result = _bootstrap(work, *_endpoint_args(judge_server.url, "strict"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((boot / "summary.json").read_text())
    assert any(m.startswith(f"smol:off at {judge_server.url}/v1") for m in summary["models_loaded"])
    verdicts_dir = next(boot.glob("verdicts-*"))
    meta = json.loads((verdicts_dir / "meta.json").read_text())
    judge = {"base_url": f"{judge_server.url}/v1", "model": "smol:off", "option_scores": False}
    assert meta["settings"]["judge"] == judge
    rows = [json.loads(line) for line in (verdicts_dir / "rows.jsonl").read_text().splitlines()]
    assert rows and all(r["gate_target"] == r["strict_label"] for r in rows)
    orders = [r[o] for r in rows for o in ("order_persona_first", "order_base_first")]
    assert all(o["raw"] and o["logprobs"] is None and o["tokens"] > 0 for o in orders)
    # each reply parsed by the local judge's rule (SmolLM2-135M, unprimed, often names no verdict in 8 tokens)
    assert all(o["parsed"] == parse_verdict(o["raw"]) for o in orders)
    pairs = [(r["order_persona_first"]["parsed"], r["order_base_first"]["parsed"]) for r in rows]
    assert [r["strict_label"] for r in rows] == [strict_verdict(pf, bf) for pf, bf in pairs]
    assert all(r["logprob_label"] is None for r in rows)
    assert "logprob" not in summary["verdicts"]["split"]
    # the key is in no file of the run
    assert not [p for p in work.rglob("*") if p.is_file() and KEY in p.read_text(errors="ignore")]
    # the self-judge's verdict stage lives elsewhere (another hash)
    self_judge = stage_stores(
        tiny_bootstrap_config(personas=["math", "coding", "writing"], queries_per_persona=4,
                              query_max_new_tokens=12, min_query_chars=1, answer_max_new_tokens=8,
                              verdict_rule="strict"),
        BackboneConfig(model=str(tiny_model_dir)), work / "runs/tiny",
    )["verdicts"]  # fmt: skip
    assert self_judge.path != verdicts_dir
    answers = self_judge.upstream_stores[0]
    assert [p.name for p in boot.glob("answers-*")] == [answers.path.name]  # shared with the self-judge

    # an unreachable endpoint: one error line, and the finished stages stay for the next run
    done = sorted(p.name for p in boot.iterdir() if (p / "DONE").exists())
    closed = ["--data.bootstrap.judge.base_url", "http://127.0.0.1:9/v1"]
    _one_error_line(_bootstrap(work, *_endpoint_args(judge_server.url, "strict"), *closed), "cannot reach")
    assert sorted(p.name for p in boot.iterdir() if (p / "DONE").exists()) == done


# --- the logprob rule against an endpoint that returns log-probabilities (vLLM's own OpenAI server) ------


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """vLLM's OpenAI-compatible server on the embedded SmolLM2 (CPU build), on a free port."""
    pytest.importorskip("vllm")
    import socket
    import time
    import urllib.request

    from prism_lightning.backbone import load_model_config

    source, _ = load_model_config("smollm2-135m-instruct")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", source,
           "--served-model-name", "smol", "--port", str(port), "--max-model-len", "2048",
           "--dtype", "float32", "--enforce-eager", "--max-logprobs", "20"]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            try:
                if urllib.request.urlopen(f"{url}/v1/models", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(1)
        assert proc.poll() is None, log.read_text()[-5000:]
        yield url
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.second_tier
def test_cli_logprob_rule_on_an_endpoint_with_logprobs(vllm_server, tiny_model_dir, tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_FIT_YAML.format(model=tiny_model_dir))
    args = [f"--data.bootstrap.judge.base_url={vllm_server}/v1", "--data.bootstrap.judge.model=smol",
            "--data.bootstrap.verdict_rule=logprob"]  # fmt: skip
    result = _bootstrap(tmp_path, *args, key=None)
    assert result.returncode == 0, result.stderr[-3000:]
    boot = tmp_path / "runs/tiny/bootstrap"
    verdicts_dir = next(boot.glob("verdicts-*"))
    meta = json.loads((verdicts_dir / "meta.json").read_text())
    assert meta["settings"]["judge"] == {
        "base_url": f"{vllm_server}/v1",
        "model": "smol",
        "option_scores": True,
    }
    rows = [json.loads(line) for line in (verdicts_dir / "rows.jsonl").read_text().splitlines()]
    assert rows and all(r["gate_target"] == r["logprob_label"] for r in rows)
    for r in rows:
        for order in ("order_persona_first", "order_base_first"):
            scores = r[order]["logprobs"]
            assert set(scores) == {"A", "B", "TIE"} and all(v <= 0 for v in scores.values())
        assert isinstance(r["logprob_score"], float)
    summary = json.loads((boot / "summary.json").read_text())
    assert "logprob" in summary["verdicts"]["split"]
