"""Single-pass routing: exactness of the per-sequence adapter mask, gate features, layer placement."""

import pytest
import torch

from prism_lightning.model.gate import Gate
from prism_lightning.model.routing import (
    RoutingController,
    apply_lora,
    decoder_layers,
    validate_routing_setup,
)
from prism_lightning.testing import build_tiny_model

VOCAB = 384


def _lora_model(gate_layer=0, layers=4, seed=0):
    base = build_tiny_model(VOCAB, layers=layers, seed=seed).eval()
    model = apply_lora(base, gate_layer=gate_layer, rank=4, alpha=8, dropout=0.0)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft initialises B to zero: make the adapter actually do something
            torch.nn.init.normal_(p, std=0.3)
    return model.eval()


@pytest.fixture(scope="module")
def routed():
    model = _lora_model()
    gate = Gate(model.config.hidden_size, (16, 8)).eval()
    return model, RoutingController(model, gate, 0)


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(0)
    return torch.randint(3, VOCAB, (2, 11))


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def test_mask_off_equals_base_and_on_equals_adapter(routed, ids):
    model, ctl = routed
    with model.disable_adapter():
        base = _logits(model, ids)
    ctl.reset()
    always_on = _logits(model, ids)  # a plain peft model with the adapter on
    assert not torch.allclose(base, always_on)
    ctl.set_mask(0.0)
    assert torch.equal(_logits(model, ids), base)
    ctl.set_mask(torch.zeros(2))
    assert torch.equal(_logits(model, ids), base)
    ctl.set_mask(torch.ones(2))
    assert torch.equal(_logits(model, ids), always_on)
    # all-off with autograd on: multiply path (no skipping), still exact
    ctl.set_mask(0.0)
    assert not ctl._skipping
    with torch.enable_grad():
        out = model(input_ids=ids).logits.detach()
    assert torch.equal(out, base)
    ctl.reset()


def test_mixed_batch_equals_per_row(routed, ids):
    model, ctl = routed
    with model.disable_adapter():
        base = _logits(model, ids)
    ctl.reset()
    on = _logits(model, ids)
    ctl.set_mask(torch.tensor([1.0, 0.0]))
    mixed = _logits(model, ids)
    assert torch.equal(mixed[0], on[0])
    assert torch.equal(mixed[1], base[1])
    ctl.reset()


def test_gate_decides_inside_prefill(routed, ids):
    model, ctl = routed
    gate = ctl.gate
    with model.disable_adapter():
        base = _logits(model, ids)
    ctl.reset()
    on = _logits(model, ids)
    last = gate.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        for bias, expected in ((-50.0, base), (50.0, on)):
            last.bias.fill_(bias)
            ctl.mode = "gated"
            ctl.arm()
            assert torch.equal(_logits(model, ids), expected)
            assert ctl.decision.tolist() == [bias > 0] * 2
            assert ctl.probs.shape == (2,)
        # on/off modes ignore the gate's decision but still report probabilities
        last.bias.fill_(50.0)
        ctl.mode = "off"
        ctl.arm()
        assert torch.equal(_logits(model, ids), base)
        assert ctl.probs.min() > 0.99
        # force overrides, per row
        ctl.mode = "gated"
        ctl.arm(force=torch.tensor([False, True]))
        mixed = _logits(model, ids)
        assert torch.equal(mixed[0], base[0]) and torch.equal(mixed[1], on[1])
    # decode steps (not armed) keep the mask; select() follows dropped rows
    ctl.select(torch.tensor([1]))
    assert ctl.state == "on"
    ctl.reset()
    with pytest.raises(ValueError, match="gated, on, off"):
        ctl.mode = "sometimes"


def test_gate_features_stop_after_gate_layer(routed, ids):
    model, ctl = routed
    calls = []
    handle = decoder_layers(model)[1].register_forward_hook(lambda *a: calls.append(1))
    feats = ctl.gate_features(ids)
    handle.remove()
    assert feats.shape == (2, model.config.hidden_size)
    assert calls == []  # layers above k never ran
    with torch.no_grad():
        out = model.get_base_model().model(input_ids=ids, output_hidden_states=True)
    # hidden_states[k + 1] is the output of decoder layer k
    torch.testing.assert_close(feats, out.hidden_states[1][:, -1])


def test_training_and_inference_features_match(routed):
    """Right-padded prompt+response at prompt_len-1 == left-padded prompt alone at the last position."""
    model, ctl = routed
    torch.manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,)) for n in (7, 4)]
    responses = [torch.randint(3, VOCAB, (n,)) for n in (3, 5)]
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    train_ids = torch.zeros(2, width, dtype=torch.long)
    train_mask = torch.zeros(2, width, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        seq = torch.cat([p, r])
        train_ids[i, : len(seq)] = seq
        train_mask[i, : len(seq)] = 1
    plen = torch.tensor([len(p) for p in prompts])
    train_feats = ctl.gate_features(train_ids, train_mask, positions=plen - 1)
    pw = max(len(p) for p in prompts)
    inf_ids = torch.zeros(2, pw, dtype=torch.long)
    inf_mask = torch.zeros(2, pw, dtype=torch.long)
    for i, p in enumerate(prompts):
        inf_ids[i, pw - len(p) :] = p
        inf_mask[i, pw - len(p) :] = 1
    inf_feats = ctl.gate_features(inf_ids, inf_mask)
    torch.testing.assert_close(train_feats, inf_feats, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate_layer", [0, 1])
def test_lora_only_above_gate_layer(gate_layer):
    model = _lora_model(gate_layer=gate_layer)
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        has_lora = any("lora_A" in n for n, _ in layer.named_modules())
        assert has_lora == (i > gate_layer), i


def test_bad_gate_layer_and_target_module():
    base = build_tiny_model(VOCAB, layers=4)
    for bad in (-1, 3, 4):
        with pytest.raises(ValueError, match=r"valid choices: 0\.\.2"):
            validate_routing_setup(base, bad, ["q_proj"])
    with pytest.raises(ValueError, match="valid choices: .*down_proj.*q_proj"):
        apply_lora(base, gate_layer=0, target_modules=["q_proj", "qkv_proj"])


def test_the_routing_rule_for_one_adapter_and_for_k_way():
    """One rule decides every route (route_rule.decide_routes): threshold, forced rows, modes, K-way."""
    from prism_lightning.model.route_rule import decide_routes, forced_routes, gate_routes

    p = torch.tensor([0.2, 0.5, 0.9])
    assert decide_routes(p, 3, threshold=0.5).tolist() == [False, True, True]
    assert decide_routes(p, 3, mode="on").tolist() == [True] * 3
    assert decide_routes(None, 3, mode="off").tolist() == [False] * 3
    assert decide_routes(p, 3, threshold=0.5, forced=[True, False, None]).tolist() == [True, False, True]
    assert decide_routes(None, 2, forced=[True, False]).tolist() == [True, False]  # no gate needed
    with pytest.raises(RuntimeError, match="needs a gate"):
        decide_routes(None, 1)
    # K-way: class 0 = none; gated routes to the best adapter when 1 - P(none) >= threshold
    k = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.45, 0.5, 0.05]])
    assert gate_routes(k, 0.5).tolist() == [0, 2, 1]
    assert decide_routes(k, 3, kway=True, threshold=0.5).tolist() == [0, 2, 1]
    assert decide_routes(k, 3, kway=True, mode="on").tolist() == [1, 2, 1]
    assert decide_routes(k, 3, kway=True, mode="off").tolist() == [0, 0, 0]
    names = ["a", "b"]
    forced = forced_routes(["b", True, None], names)
    assert forced == [2, -1, None]  # True: an adapter, the gate picks which
    assert decide_routes(k, 3, kway=True, threshold=0.5, forced=forced).tolist() == [2, 2, 1]
    with pytest.raises(ValueError, match="unknown adapter"):
        forced_routes(["c"], names)
    with pytest.raises(ValueError, match="one adapter"):
        forced_routes(["a"], None)
