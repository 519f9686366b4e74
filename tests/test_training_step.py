"""The training step's functions on a tiny random model, checked against plain full forwards: the
losses of ``distill_step`` (one adapter, K-way, retain KL), the K-way step with every distill row on
one adapter equal to the one-adapter step, and the class-balanced gate loss."""

from __future__ import annotations

import pytest
import torch

from prism_lightning.model.gate import Gate
from prism_lightning.model.kway_routing import KWayRoutingController
from prism_lightning.model.routing import RoutingController, apply_lora
from prism_lightning.model.training_step import (
    balanced_class_weights,
    distill_step,
    full_kl,
    gate_loss,
    route_counts,
    route_targets,
    topk_kl,
)
from prism_lightning.testing import build_tiny_model

VOCAB, GATE_LAYER, TOP_K, T = 256, 1, 8, 2.0
PROMPT_LEN = [5, 7, 4, 6, 8, 5]
RESP_LEN = [4, 3, 5, 2, 4, 3]
GATE_TARGET = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]


def _batch() -> dict[str, torch.Tensor]:
    """Right-padded rows in the data module's schema, with a random teacher top-k on distill rows."""
    g = torch.Generator().manual_seed(0)
    n, width, rmax = (
        len(PROMPT_LEN),
        max(p + r for p, r in zip(PROMPT_LEN, RESP_LEN, strict=True)),
        max(RESP_LEN),
    )
    ids = torch.zeros((n, width), dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, rmax), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(PROMPT_LEN, RESP_LEN, strict=True)):
        ids[i, : p + r] = torch.randint(3, VOCAB, (p + r,), generator=g)
        attn[i, : p + r] = 1
        mask[i, :r] = GATE_TARGET[i] > 0
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "prompt_lengths": torch.tensor(PROMPT_LEN),
        "response_lengths": torch.tensor(RESP_LEN),
        "gate_target": torch.tensor(GATE_TARGET),
        "teacher_values": torch.randn((n, rmax, TOP_K), generator=g) * 3,
        "teacher_indices": torch.stack(
            [torch.randperm(VOCAB, generator=g)[:TOP_K] for _ in range(n * rmax)]
        ).view(n, rmax, TOP_K),
        "teacher_mask": mask,
    }


def _lora(names: list[str] | None):
    """The tiny base (same weights every call) with visible random adapters."""
    model = apply_lora(
        build_tiny_model(VOCAB, layers=4, seed=0), gate_layer=GATE_LAYER, rank=4, alpha=8, dropout=0.0,
        adapter_names=names,
    )  # fmt: skip
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    return model.eval()


@torch.no_grad()
def _reference(model, controller, batch, routes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean top-k KL over distill tokens and retain KL over retain rows, from full forwards of the whole
    batch with one route at a time (no split, no trimming, LM head everywhere)."""
    logits = {}
    for route in sorted({0, *routes.tolist()}):
        controller.set_mask(route)
        logits[route] = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kls, retains = [], []
    for i, route in enumerate(routes.tolist()):
        for j in range(int(batch["response_lengths"][i])):
            pos = int(batch["prompt_lengths"][i]) - 1 + j
            if route > 0:
                kls.append(
                    topk_kl(
                        logits[route][i, pos][None],
                        batch["teacher_values"][i, j][None],
                        batch["teacher_indices"][i, j][None],
                        T,
                    )
                )
            elif 1 in logits:  # adapter on vs off on a retain row (one adapter)
                retains.append(full_kl(logits[0][i, pos][None], logits[1][i, pos][None], T))
    retain = torch.cat(retains).mean() if retains else torch.zeros(())
    return torch.cat(kls).mean(), retain


def _step(model, controller, gate, batch, routes, **kw):
    with torch.no_grad():
        weight = torch.ones(max(2, gate.n_classes))
        return distill_step(model, controller, gate, batch, routes, weight, kl_temperature=T, **kw)


@pytest.mark.parametrize("sharded", [False, True], ids=["retain-rows-stop-at-gate", "one-pass"])
def test_one_adapter_step_equals_full_forward_losses(sharded):
    model = _lora(None)
    gate = Gate(model.config.hidden_size, (16,)).eval()
    ctl = RoutingController(model, gate, GATE_LAYER)
    batch = _batch()
    routes = route_targets(batch["gate_target"])
    assert routes.tolist() == [1, 1, 0, 1, 0, 0]
    kl, _ = _reference(model, ctl, batch, routes)
    out = _step(model, ctl, gate, batch, routes, sharded=sharded)
    torch.testing.assert_close(out.kl, kl, rtol=1e-4, atol=1e-5)
    assert out.n_tokens == sum(r for r, t in zip(RESP_LEN, GATE_TARGET, strict=True) if t)
    with torch.no_grad():
        feats = ctl.gate_features(batch["input_ids"], batch["attention_mask"], batch["prompt_lengths"] - 1)
        want_gate = gate_loss(gate(feats), routes, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(out.gate_logits, gate(feats), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.gate_loss, want_gate, rtol=1e-4, atol=1e-5)
    assert float(out.retain_kl) == 0.0 and torch.equal(out.loss, out.gate_loss + out.kl)


def test_retain_kl_compares_adapter_on_with_the_base_on_retain_rows():
    model = _lora(None)
    gate = Gate(model.config.hidden_size, (16,)).eval()
    ctl = RoutingController(model, gate, GATE_LAYER)
    batch = _batch()
    routes = route_targets(batch["gate_target"])
    kl, retain = _reference(model, ctl, batch, routes)
    out = _step(model, ctl, gate, batch, routes, retain_weight=0.5)
    assert float(retain) > 0
    torch.testing.assert_close(out.retain_kl, retain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.kl, kl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, out.gate_loss + out.kl + 0.5 * out.retain_kl)


def test_kway_step_runs_each_distill_row_under_its_own_adapter():
    model = _lora(["numbers", "code"])
    gate = Gate(model.config.hidden_size, (16,), n_classes=3).eval()
    ctl = KWayRoutingController(model, gate, GATE_LAYER, ["numbers", "code"])
    batch = {**_batch(), "persona_index": torch.tensor([0, 1, 1, 2, 0, -1])}
    routes = route_targets(batch["gate_target"], batch["persona_index"], torch.tensor([1, 2, 2]))
    assert routes.tolist() == [1, 2, 0, 2, 0, 0]
    kl, _ = _reference(model, ctl, batch, routes)
    for sharded in (False, True):
        torch.testing.assert_close(
            _step(model, ctl, gate, batch, routes, sharded=sharded).kl, kl, rtol=1e-4, atol=1e-5
        )


def test_kway_step_with_every_row_on_one_adapter_is_the_one_adapter_step():
    """K-way is the general case: the same rows on adapter "numbers" (the one adapter's weights) give the
    one-adapter step's KL and tokens."""
    single, kway = _lora(None), _lora(["numbers", "code"])
    weights = {n: p for n, p in single.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in kway.named_parameters():
            if ".numbers." in n:
                p.copy_(weights[n.replace(".numbers.", ".default.")])
    one = RoutingController(single, Gate(64, (16,)).eval(), GATE_LAYER)
    many = KWayRoutingController(kway, Gate(64, (16,), n_classes=3).eval(), GATE_LAYER, ["numbers", "code"])
    batch = _batch()
    routes = route_targets(batch["gate_target"])  # 0/1: route 1 is adapter "numbers" for the K-way model
    want = _step(single, one, one.gate, batch, routes)
    got = _step(kway, many, many.gate, batch, routes)
    assert got.n_tokens == want.n_tokens
    torch.testing.assert_close(got.kl, want.kl, rtol=1e-5, atol=1e-6)


def test_route_targets_refuse_a_distill_row_without_persona():
    with pytest.raises(RuntimeError, match="no persona index"):
        route_targets(torch.tensor([1.0, 0.0]), torch.tensor([-1, 0]), torch.tensor([1, 2]))


def test_gate_loss_is_class_balanced():
    logits = torch.zeros(4)
    targets = torch.tensor([1.0, 0.0, 0.0, 0.0])
    # pos_weight = retain / distill = 3: the single positive weighs as much as the three negatives
    weight = balanced_class_weights(route_counts(targets.long(), 2))
    torch.testing.assert_close(weight, torch.tensor([1.0, 3.0]))
    expected = torch.log(torch.tensor(2.0)) * (3 + 3) / 4
    torch.testing.assert_close(gate_loss(logits, targets, weight), expected)
    # K-way: weighted mean over none + K; uniform logits give log(K+1) whatever the weights
    routes = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    weight = balanced_class_weights(route_counts(routes, 3))
    torch.testing.assert_close(weight, torch.tensor([1.0, 4.0, 2.0]))
    torch.testing.assert_close(gate_loss(torch.zeros(7, 3), routes, weight), torch.log(torch.tensor(3.0)))
    # one confident wrong row per class: each class's rows weigh the same in total
    logits = torch.zeros(7, 3)
    logits[4, 0] = logits[0, 1] = 5.0
    per_row = torch.nn.functional.cross_entropy(logits, routes, reduction="none")
    want = (per_row * weight[routes]).sum() / weight[routes].sum()
    torch.testing.assert_close(gate_loss(logits, routes, weight), want)


def test_class_weights_of_empty_classes_and_train_split_counts():
    assert balanced_class_weights([0, 5]).tolist() == [1.0, 1.0]  # no retain rows: no balance
    assert balanced_class_weights([4, 0]).tolist() == [1.0, 1.0]  # one adapter: no re-weighting
    assert balanced_class_weights([4, 0, 2]).tolist() == [1.0, 0.0, 2.0]  # K-way: nothing to weight
    routes = torch.tensor([0, 1])
    assert route_counts(routes, 2, class_counts={"retain": 6, "distill": 2}) == [6.0, 2.0]
    groups = {"a": ["math", "code"], "b": ["prose"]}
    split = route_counts(
        routes,
        3,
        class_counts={"retain": 6},
        distill_per_persona={"math": 1, "code": 2, "prose": 4},
        groups=groups,
    )
    assert split == [6.0, 3.0, 4.0]
    assert route_counts(torch.tensor([0, 2, 2]), 3, groups=groups) == [1.0, 0.0, 2.0]


# -- the top-k KL without full logits, and per-row losses -------------------------------------------


def _grads(chunk: int, lm_head_grad: bool = False):
    """Losses and the gradients of every trainable tensor (LoRA, gate, optionally the LM head) of one
    training step with ``kl_chunk_positions=chunk``; the same model and rows every call."""
    model = _lora(None).train()
    head = model.get_base_model().get_output_embeddings()
    head.weight.requires_grad_(lm_head_grad)
    torch.manual_seed(4)
    gate = Gate(model.config.hidden_size, (16,), dropout=0.0)
    ctl = RoutingController(model, gate, GATE_LAYER)
    batch = _batch()
    routes = route_targets(batch["gate_target"])
    out = distill_step(
        model, ctl, gate, batch, routes, torch.ones(2), kl_temperature=T, kl_chunk_positions=chunk
    )
    out.loss.backward()
    params = [p for p in [*model.parameters(), *gate.parameters()] if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    return out, [p.grad for p in params]


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_topk_kl_from_hidden_states_equals_the_full_logits_loss_and_gradients(chunk):
    """The LM head on the teacher's k ids only, in chunks of positions: the loss and every gradient of the
    full-logits computation (the vocabulary's logsumexp cancels in the top-k renormalisation)."""
    want, want_grads = _grads(0)
    got, got_grads = _grads(chunk)
    torch.testing.assert_close(got.kl, want.kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_topk_kl_from_hidden_states_gives_a_trainable_lm_head_its_gradient():
    """A tied LM head that trains (not this project's setting, but allowed by the function) gets the same
    gradient as through the full logits."""
    _, want = _grads(0, lm_head_grad=True)
    _, got = _grads(2, lm_head_grad=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [0, 4])
def test_a_rows_loss_in_a_padded_batch_is_its_loss_alone(chunk):
    """Right padding is masked: the batch's KL is the token-weighted mean of each distill row's KL computed
    on its own (so grouping rows by length changes which rows share a batch, not any row's loss)."""
    model = _lora(None)
    gate = Gate(model.config.hidden_size, (16,)).eval()
    ctl = RoutingController(model, gate, GATE_LAYER)
    batch = _batch()
    routes = route_targets(batch["gate_target"])
    whole = _step(model, ctl, gate, batch, routes, kl_chunk_positions=chunk)
    total = torch.zeros(())
    for i in range(len(GATE_TARGET)):
        if not GATE_TARGET[i]:
            continue
        width = PROMPT_LEN[i] + RESP_LEN[i]
        alone = {k: v[i : i + 1] for k, v in batch.items()}
        alone["input_ids"], alone["attention_mask"] = (
            alone["input_ids"][:, :width],
            alone["attention_mask"][:, :width],
        )
        r = RESP_LEN[i]
        for key in ("teacher_values", "teacher_indices", "teacher_mask"):
            alone[key] = alone[key][:, :r]
        out = _step(model, ctl, gate, alone, routes[i : i + 1], kl_chunk_positions=chunk)
        assert out.n_tokens == r
        total = total + out.kl * r
    torch.testing.assert_close(whole.kl, total / whole.n_tokens, rtol=1e-5, atol=1e-6)


def test_a_batch_without_distill_rows_stops_at_the_gate_with_the_full_passs_loss_and_gradients():
    """Only the gate learns from retain rows: layers <= k suffice, and every trainable weight still gets
    the (zero) gradient the pass over every layer gives it (what DDP expects)."""

    def run(sharded: bool):
        model = _lora(None).train()
        torch.manual_seed(4)
        gate = Gate(model.config.hidden_size, (16,), dropout=0.0)
        ctl = RoutingController(model, gate, GATE_LAYER)
        batch = {k: v[[2, 4, 5]] for k, v in _batch().items()}  # the retain rows
        routes = route_targets(batch["gate_target"])
        calls = []
        top = model.get_base_model().model.layers[-1].register_forward_hook(lambda *a: calls.append(1))
        out = distill_step(model, ctl, gate, batch, routes, torch.ones(2), kl_temperature=T, sharded=sharded)
        top.remove()
        out.loss.backward()
        params = [p for p in [*model.parameters(), *gate.parameters()] if p.requires_grad]
        return out, [p.grad for p in params], len(calls)

    want, want_grads, want_calls = run(sharded=True)  # one pass over every row and layer
    got, got_grads, got_calls = run(sharded=False)
    assert (want_calls, got_calls) == (1, 0) and got.n_tokens == 0 and float(got.kl.detach()) == 0.0
    torch.testing.assert_close(got.loss, want.loss)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g is not None
        torch.testing.assert_close(g, w)


def test_a_batch_without_distill_rows_gives_tensors_when_nothing_trains():
    """Validating an exported run (every weight frozen): the losses are still tensors the module logs."""
    model = _lora(None).requires_grad_(False)
    gate = Gate(model.config.hidden_size, (16,)).eval().requires_grad_(False)
    ctl = RoutingController(model, gate, GATE_LAYER)
    batch = {k: v[[2, 4]] for k, v in _batch().items()}
    out = _step(model, ctl, gate, batch, route_targets(batch["gate_target"]))
    assert all(torch.is_tensor(v) for k, v in out.logged().items() if k != "n_tokens")
    assert float(out.kl) == 0.0 and torch.equal(out.loss, out.gate_loss)
