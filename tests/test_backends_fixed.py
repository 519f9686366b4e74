"""benchmarks/backends_fixed.py refuses bad arguments with one ``error:`` line and exit status 2, before it
opens an engine (the measurement itself needs vLLM and minutes; it is run by hand, see its docstring)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def script(load_benchmark):
    return load_benchmark("backends_fixed")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats", "0"], "error: --repeats must be >= 1, got 0"),
        (["--max-new-tokens", "-1"], "error: --max-new-tokens must be >= 1, got -1"),
        (["--warmup", "-1"], "error: --warmup must be >= 0, got -1"),
        (["--order", "hf"], "error: --order lists each of hf, vllm once, got hf"),
        (["--prompts", "x"], "error: argument --prompts: invalid int value: 'x'"),
        (["--vllm", "nosuch=1"], "error: unknown generation key(s) nosuch"),
    ],
)
def test_bad_arguments_are_one_error_line_and_exit_2(script, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        script.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message)


def test_good_arguments_parse(script):
    args = script.parse_args(["--prompts", "4", "--order", "vllm,hf", "--vllm", "max_num_seqs=8"])
    assert args.order == ["vllm", "hf"] and args.generation.backend == "vllm"
    assert args.generation.max_num_seqs == 8
