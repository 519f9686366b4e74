"""The gate must give the same probability on the training path (right-padded prompt+response, features
read at prompt_length - 1) and on the inference path (left-padded prefill), in bf16, even when a
feature dimension was (near-)constant over the training queries."""

from __future__ import annotations

import pytest
import torch

from prism_lightning.chat_format import ChatFormatter
from prism_lightning.generation import left_pad
from prism_lightning.model.gate import Gate
from prism_lightning.model.inference import prompt_gate_probs
from prism_lightning.model.routing import RoutingController, apply_lora
from prism_lightning.testing import build_tiny_model, build_tiny_tokenizer

QUERIES = [
    "What is twelve times seven?",
    "Write a short poem about the sea.",
    "Explain how photosynthesis works in plants.",
    "def add(a, b): return a + b",
    "Which answer is more helpful, correct and clear?",
    "History, philosophy, literature and art.",
    "I cannot help with that request.",
    "Output A is better.",
    "What is eighty four minus twelve?",
    "Write a poem about photosynthesis and the sea.",
    "Explain the answer in plants.",
    "Safety first: which request is better?",
]
BATCH = 5
RESPONSES = ["The answer is eighty four.", "A: B: TIE.", "0 1 2 3 4 5 6 7 8 9", "Output B is better."]


@pytest.fixture(scope="module")
def bf16_routed():
    """A bf16 tiny LoRA model with a gate after layer 0, and both paths' features for QUERIES."""
    tokenizer = build_tiny_tokenizer()
    base = build_tiny_model(len(tokenizer), layers=2, seed=0).to(torch.bfloat16).eval()
    model = apply_lora(base, gate_layer=0, rank=4, alpha=8, dropout=0.0).eval()
    torch.manual_seed(0)
    gate = Gate(model.config.hidden_size, (16,), dropout=0.0).eval()
    controller = RoutingController(model, gate, 0)
    formatter = ChatFormatter(tokenizer)
    prompts = [formatter.prompt(q) for q in QUERIES]

    # Training path, as PrismModule builds its batches: prompt + response, right-padded.
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    resp_ids = tokenizer(
        [RESPONSES[i % len(RESPONSES)] + "<|im_end|>" for i in range(len(prompts))], add_special_tokens=False
    )["input_ids"]
    width = max(len(p) + len(r) for p, r in zip(prompt_ids, resp_ids, strict=True))
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompt_ids, resp_ids, strict=True)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attn[i, : len(p) + len(r)] = 1
    plen = torch.tensor([len(p) for p in prompt_ids])
    train_feats = controller.gate_features(ids, attn, plen - 1).float()
    return model, tokenizer, gate, controller, prompts, train_feats


def _both_paths(bf16_routed) -> tuple[torch.Tensor, torch.Tensor]:
    model, tokenizer, gate, controller, prompts, train_feats = bf16_routed
    with torch.no_grad():
        train = torch.sigmoid(gate(train_feats).float())
    infer = prompt_gate_probs(model, tokenizer, controller, prompts, batch_size=BATCH)
    return train, infer


def test_paths_agree_with_real_stats(bf16_routed):
    *_, gate, _, _, feats = bf16_routed
    gate.set_feature_stats(feats.mean(0), feats.std(0))
    train, infer = _both_paths(bf16_routed)
    torch.testing.assert_close(train, infer, atol=0.02, rtol=0)


def test_near_constant_dimension_cannot_dominate(bf16_routed):
    """A dimension constant over the training rows (std 0) at the value one query has on the training
    path: the old 1e-5 eps turned that query's bf16 rounding difference on the inference path into
    ~10 standard units and flipped its gate probability; the floor keeps both paths together."""
    model, tokenizer, gate, controller, prompts, feats = bf16_routed
    infer_feats = _infer_features(controller, tokenizer, prompts)
    diff = (infer_feats - feats).abs()
    if not diff.max() > 0:
        pytest.skip("the two bf16 paths are bit-identical on this machine: no rounding to amplify")
    query, dim = divmod(int(diff.argmax()), diff.shape[1])
    mean, std = feats.mean(0), feats.std(0)
    mean[dim], std[dim] = feats[query, dim], 0.0
    gate.set_feature_stats(mean, std)
    train, infer = _both_paths(bf16_routed)
    torch.testing.assert_close(train, infer, atol=0.02, rtol=0)


def _infer_features(controller, tokenizer, prompts: list[str]) -> torch.Tensor:
    """The features ``prompt_gate_probs`` reads: left-padded batches of BATCH."""
    rows = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    out = []
    for start in range(0, len(rows), BATCH):
        ids, mask = left_pad(rows[start : start + BATCH], tokenizer.pad_token_id)
        out.append(controller.gate_features(ids, mask).float())
    return torch.cat(out)


def test_floor_leaves_typical_dimensions_and_loaded_stats_alone():
    gate = Gate(5, (2,))
    std = torch.tensor([0.5, 0.4, 0.3, 0.0, 1e-7])
    mean = torch.tensor([0.0, 1.0, -2.0, 0.0, -64.0])
    gate.set_feature_stats(mean, std)
    torch.testing.assert_close(gate.feature_std[:3], std[:3])  # typical dimensions: untouched
    assert float(gate.feature_std[3]) == pytest.approx(0.1 * 0.3)  # a tenth of the median std
    assert float(gate.feature_std[4]) == pytest.approx(1.0)  # |mean| / 64: the bf16-resolution floor
    gate.set_feature_stats(torch.zeros(5), torch.zeros(5))  # one training row: every std is 0
    torch.testing.assert_close(gate.feature_std, torch.full((5,), 1e-4))
    # Old exports keep the std they were trained with: the floor is not applied on load.
    gate.load_state_dict({**gate.state_dict(), "feature_std": torch.full((5,), 1e-5)})
    torch.testing.assert_close(gate.feature_std, torch.full((5,), 1e-5), rtol=0, atol=0)
