"""The prefix gate (embeddings + layers <= k + the exported gate) decides like the full routed model."""

from __future__ import annotations

import pytest
import torch

from prism_lightning.testing import untrained_checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_model_dir, tmp_path_factory):
    # a gate whose probabilities spread around the threshold
    return untrained_checkpoint(
        str(tiny_model_dir), tmp_path_factory.mktemp("ckpt") / "run", gate_std=2.0,
        gate_layer=1, lora_rank=4, gate_hidden=[16],
    )  # fmt: skip


QUERIES = ["What is twelve times seven?", "Write a short poem about the sea.", "Hi", "def add(a, b):", "Why?"]


def test_prefix_gate_matches_the_routed_model(tiny_checkpoint):
    from prism_lightning.model.export import load_checkpoint
    from prism_lightning.model.prefix_gate import PrefixGate

    routed = load_checkpoint(tiny_checkpoint, device="cpu")
    gate = PrefixGate.from_checkpoint(tiny_checkpoint)
    assert len(gate.decoder.layers) == 2  # gate layer 1: layers 0 and 1 only
    prompts = routed.prompts(QUERIES)
    expected = torch.tensor(routed.gate_probs(QUERIES))
    got = gate.gate_probs(prompts, batch_size=2)
    assert torch.allclose(got, expected, atol=1e-5)
    assert gate.routes(prompts) == [bool(p >= routed.threshold) for p in expected]
    gate.threshold = float(expected.median())  # a threshold that routes some rows and not others
    assert gate.routes(prompts) == [bool(p >= gate.threshold) for p in expected]
    assert 0 < sum(gate.routes(prompts)) < len(QUERIES)
    # token ids and strings give the same answer
    ids = [routed.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert torch.allclose(gate.gate_probs(ids), got, atol=1e-6)


def test_prefix_gate_refuses_a_damaged_checkpoint(tiny_checkpoint, tmp_path):
    import shutil

    from prism_lightning.model.export import CheckpointError
    from prism_lightning.model.prefix_gate import PrefixGate

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "gate.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError):
        PrefixGate.from_checkpoint(broken)
