"""The weight fingerprint tells same-shape models apart, ignores the load dtype, and fails loudly."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from prism_lightning.errors import PrismError
from prism_lightning.model.fingerprint import (
    WeightFingerprintError,
    check_weight_fingerprint,
    weight_fingerprint,
)
from prism_lightning.model.routing import apply_lora
from prism_lightning.testing import build_tiny_model

VOCAB = 384


@pytest.fixture(scope="module")
def base():
    return build_tiny_model(VOCAB, layers=2, seed=0).eval()


def test_same_weights_same_fingerprint_other_seed_differs(base):
    fp = weight_fingerprint(base)
    assert fp is not None and fp == weight_fingerprint(copy.deepcopy(base))
    other = weight_fingerprint(build_tiny_model(VOCAB, layers=2, seed=1))
    assert other["embedding"] != fp["embedding"] and other["layer0"] != fp["layer0"]


def test_fp32_bf16_fp16_copies_agree_when_stored_in_bf16(base):
    stored = copy.deepcopy(base).to(torch.bfloat16)  # what a bf16 checkpoint on disk holds
    fp = weight_fingerprint(stored)
    assert weight_fingerprint(copy.deepcopy(stored).float()) == fp
    assert weight_fingerprint(copy.deepcopy(stored).half()) == fp
    # fp32 weights: the bf16 copy rounds the same way the hash does
    assert weight_fingerprint(copy.deepcopy(base).to(torch.bfloat16)) == weight_fingerprint(base)


def test_one_changed_layer0_row_is_detected(base):
    """A fine-tune that changed only the first layer's projections (embedding kept) still differs."""
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for module in tuned.model.layers[0].modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(1.02)
    fp, got = weight_fingerprint(base), weight_fingerprint(tuned)
    assert got["embedding"] == fp["embedding"] and got["layer0"] != fp["layer0"]


def test_peft_wrapped_model_hashes_like_its_base(base):
    wrapped = apply_lora(copy.deepcopy(base), gate_layer=0, rank=4, alpha=8, dropout=0.0)
    assert weight_fingerprint(wrapped) == weight_fingerprint(base)


def test_meta_device_gives_none():
    with torch.device("meta"):
        model = build_tiny_model(VOCAB, layers=2)
    assert weight_fingerprint(model) is None
    check_weight_fingerprint(weight_fingerprint(build_tiny_model(VOCAB, layers=2)), model)  # no check


def test_check_raises_a_one_line_prism_error(base):
    expected = weight_fingerprint(base)
    check_weight_fingerprint(expected, copy.deepcopy(base))
    check_weight_fingerprint(None, base)  # checkpoints from before the fingerprint: no check
    check_weight_fingerprint({"method": "some-future-method", "x": "y"}, base)
    other = build_tiny_model(VOCAB, layers=2, seed=1)
    with pytest.raises(WeightFingerprintError) as err:
        check_weight_fingerprint(expected, other, checkpoint="checkpoints/run1")
    assert isinstance(err.value, PrismError)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("checkpoint checkpoints/run1 was trained on weights with fingerprint")
    assert "same architecture" in message and "check_weights=False" in message


def test_fingerprint_touches_only_slices(base):
    """A 7B-sized embedding (152k x 3584) hashes in well under a second: only a few rows are read."""
    big = torch.nn.Embedding(152_064, 3584, dtype=torch.bfloat16, device="meta")
    big = big.to_empty(device="cpu")
    model = copy.deepcopy(base)
    model.set_input_embeddings(big)
    start = time.perf_counter()
    assert weight_fingerprint(model) is not None
    assert time.perf_counter() - start < 0.5
