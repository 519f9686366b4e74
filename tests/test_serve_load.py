"""benchmarks/serve_load.py's plan and comparisons without servers: which servers and phases a command
line asks for, bad arguments as one ``error:`` line and exit status 2, and the ratios, routing shares and
answer agreement it reports from pooled phases (the load itself starts servers and takes minutes; it is
run by hand, see its docstring)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def script(load_benchmark):
    return load_benchmark("serve_load")


def test_both_engines_are_one_run_with_paired_phases(script, tmp_path):
    args = script.parse_args(["--demo-checkpoint", str(tmp_path), "--engines", "hf,vllm", "--clients", "8"])
    assert args.servers == [("hf", "continuous"), ("vllm", None)]
    assert script.phase_order(args) == [
        ("hf-continuous", 8, "routed"),
        ("vllm", 8, "routed"),
        ("hf-continuous", 8, "base"),
        ("vllm", 8, "base"),
    ]


@pytest.mark.parametrize(
    ("argv", "servers"),
    [
        ([], [("hf", "continuous")]),
        (["--engine", "vllm"], [("vllm", None)]),  # the older spelling still works
        (["--schedulers", "continuous,static"], [("hf", "continuous"), ("hf", "static")]),
        (["--engines", "vllm,hf", "--schedulers", "static"], [("hf", "static"), ("vllm", None)]),
    ],
)
def test_servers_of_a_command_line(script, tmp_path, argv, servers):
    assert script.parse_args(["--demo-checkpoint", str(tmp_path), *argv]).servers == servers


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--engines", "hf,tgi"], "error: --engines takes a comma-separated list of hf, vllm; got 'hf,tgi'"),
        (["--engines", "vllm", "--schedulers", "static"], "error: --schedulers is for the hf engine"),
        (["--requests", "0"], "error: --requests must be >= 1"),
        (["--clients", "8,x"], "error: --clients takes numbers"),
        (["--seconds", "0"], "error: --seconds must be > 0"),
        (["--rounds", "two"], "error: argument --rounds: invalid int value: 'two'"),
    ],
)
def test_bad_arguments_are_one_error_line_and_exit_2(script, tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        script.parse_args(["--demo-checkpoint", str(tmp_path), *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message)


def _run(texts: list[str], routes: list[str]) -> dict:
    records = [
        {"prompt": k, "text": t, "route": r, "latency": 1.0, "ttft": 0.5, "tokens": 4}
        for k, (t, r) in enumerate(zip(texts, routes, strict=True))
    ]
    return {"wall_s": 2.0, "records": records, "errors": []}


def test_ratios_keep_rates_and_times_apart_and_engines_are_compared_by_answer(script, tmp_path):
    args = script.parse_args(["--demo-checkpoint", str(tmp_path), "--engines", "hf,vllm"])
    runs = {
        ("hf-continuous", 8, "routed"): [_run(["a", "b"], ["adapter", "base"])],
        ("vllm", 8, "routed"): [_run(["a", "c"], ["adapter", "adapter"])],
        ("hf-continuous", 8, "base"): [_run(["x", "y"], ["base", "base"])],
        ("vllm", 8, "base"): [_run(["x", "y"], ["base", "base"]), _run(["x", "y"], ["base", "base"])],
    }
    summary = {f"{s}/{n}/{m}": script.pooled(rs) for (s, n, m), rs in runs.items()}
    ratios, shares, agreement = script.compare(args, summary, runs)
    assert shares == {"hf-continuous 8": 0.5, "vllm 8": 1.0}
    both = ratios["vllm/hf-continuous 8 base"]  # same requests per second, the same latencies
    assert both["rate"] == {"requests_per_s": 1.0, "tokens_per_s": 1.0}
    assert set(both["time"]) == {"latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s"}
    assert set(ratios) == {
        "vllm/hf-continuous 8 routed",
        "vllm/hf-continuous 8 base",
        "routed/base hf-continuous 8",
        "routed/base vllm 8",
    }
    assert agreement["vllm/hf-continuous 8 routed"] == {
        "compared": 2,
        "identical_answers_share": 0.5,
        "identical_routes_share": 0.5,
    }
    assert agreement["vllm/hf-continuous 8 base"]["identical_answers_share"] == 1.0
