"""`probe-gate`: the probe's features are exactly the gate's input, its cross-validation tells signal from
noise, and the command reads labels from files, benchmarks or a run and refuses bad input in one line."""

from __future__ import annotations

import json

import pytest
import torch

from prism_lightning.cli import main
from prism_lightning.eval.gate_probe import cross_validate, prompt_features, stratified_folds


def test_folds_cover_every_row_once_with_both_classes_in_each():
    y = torch.tensor([1] * 7 + [0] * 13, dtype=torch.float32)
    folds = stratified_folds(y, 5, seed=3)
    assert sorted(torch.cat(folds).tolist()) == list(range(20))
    assert all(0 < y[f].sum() < len(f) for f in folds)


def test_cross_validation_finds_a_linear_signal_and_no_signal_in_noise():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 32, generator=gen)
    y = (x[:, 3] - 0.5 * x[:, 7] > 0).float()
    auroc, _, accuracy = cross_validate(x, y)
    assert auroc > 0.95 and accuracy > 0.85
    noise = (torch.rand(200, generator=gen) > 0.5).float()
    auroc, _, _ = cross_validate(x, noise)
    assert 0.3 < auroc < 0.7  # 40 held-out rows per fold: chance within a wide margin


def test_last_token_feature_is_the_hidden_state_after_layer_k_whatever_the_padding(tiny_backbone):
    bb = tiny_backbone
    queries = ["Write a poem about the sea.", "2+2?", "Explain what a compiler does, in one sentence please."]
    batched = prompt_features(bb, queries, [0, 2], batch_size=3)  # left-padded together
    for i, q in enumerate(queries):
        ids = bb.tokenizer(bb.formatter.prompt(q), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = bb.model(input_ids=ids, output_hidden_states=True).hidden_states
        for k in (0, 2):
            torch.testing.assert_close(
                batched[(k, "last")][i], hidden[k + 1][0, -1].float(), atol=1e-4, rtol=1e-4
            )
            torch.testing.assert_close(
                batched[(k, "mean")][i], hidden[k + 1][0].float().mean(0), atol=1e-4, rtol=1e-4
            )


def _labelled(path, n=12):
    rows = [{"query": f"Write a short poem about topic {i}.", "gate_target": 1} for i in range(n)]
    rows += [
        {"query": f"What is {i} plus {i + 1}? Answer with a number.", "gate_target": 0} for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_probe_gate_command_prints_and_writes_the_scores(tiny_model_dir, tmp_path, capsys):
    labelled = _labelled(tmp_path / "labelled.jsonl")
    out = tmp_path / "scores.json"
    with pytest.raises(SystemExit) as done:
        main(["probe-gate", "--model", str(tiny_model_dir), "--labelled", str(labelled), "--layers", "0,1",
              "--folds", "3", "--out", str(out)])  # fmt: skip
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "| 0 | last (the gate's input) |" in printed and "| 1 | mean |" in printed
    scores = json.loads(out.read_text())["scores"]
    assert {(s["layer"], s["pooling"]) for s in scores} == {
        (0, "last"),
        (0, "mean"),
        (1, "last"),
        (1, "mean"),
    }
    assert all(s["n"] == 24 and s["positives"] == 12 for s in scores)
    # two templates this different are separable from the first layer on
    assert all(s["auroc"] > 0.9 for s in scores), scores


@pytest.mark.parametrize(
    "args, message",
    [
        (["--labelled", "LABELLED", "--folds", "1"], "--folds must be >= 2"),
        (["--labelled", "LABELLED", "--folds", "13"], "each class needs at least --folds=13"),
        (["--labelled", "LABELLED", "--layers", "0,9"], "--layers goes up to 9"),
        (["--labelled", "LABELLED", "--layers", "a"], "--layers must be a comma list"),
        (["--labelled", "LABELLED", "--run_dir", "."], "exactly one of"),
        (["--positive", "benchmark:nope", "--negative", "benchmark:mmlu"], "unknown benchmark 'nope'"),
        (["--positive", "missing.jsonl"], "--positive and --negative go together"),
        (["--labelled", "missing.jsonl"], "labelled file missing.jsonl does not exist"),
        (["--run_dir", "RUN"], "holds no finished verdicts stage"),
    ],
)
def test_bad_input_is_one_error_line(args, message, tiny_model_dir, tmp_path, capsys):
    labelled = _labelled(tmp_path / "labelled.jsonl")
    (tmp_path / "run").mkdir()
    args = [str(labelled) if a == "LABELLED" else str(tmp_path / "run") if a == "RUN" else a for a in args]
    with pytest.raises(SystemExit) as done:
        main(["probe-gate", "--model", str(tiny_model_dir), *args])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
