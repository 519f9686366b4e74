"""The batched generation engine: exact agreement with `model.generate`, per-row seeded sampling,
input order, dropping finished rows, edge cases."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from prism_lightning.generation import (
    Generation,
    SamplingConfig,
    balanced_batches,
    generate,
    generate_batch,
    row_seed,
    stop_token_ids,
)
from prism_lightning.testing import GENERATION_QUERIES, with_large_random_weights

QUERIES = list(GENERATION_QUERIES)
N_NEW = 12


@pytest.fixture(scope="module")
def parts(tiny_backbone):
    """The tiny model with larger random weights: at its default init (std 0.02) greedy decoding
    repeats one token forever for every prompt, which would make the comparisons vacuous."""
    model = with_large_random_weights(tiny_backbone.model, seed=0)
    prompts = [tiny_backbone.formatter.prompt(q) for q in QUERIES]
    return model, tiny_backbone.tokenizer, prompts


def hf_greedy(model, tokenizer, prompt: str, max_new_tokens: int, stops: list[int]):
    """Reference: single-prompt `model.generate`, greedy, with the same stop tokens."""
    enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(
        **enc,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
    )
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    if new and new[-1] in stops:
        return new[:-1], "stop"
    return new, "length"


def test_prompts_have_different_lengths(parts):
    _, tokenizer, prompts = parts
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert len(set(lengths)) == len(lengths)


def test_greedy_matches_model_generate(parts):
    model, tokenizer, prompts = parts
    stops = stop_token_ids(tokenizer, model)
    outs = generate_batch(model, tokenizer, prompts, SamplingConfig(max_new_tokens=N_NEW))
    assert len(outs) == len(prompts)
    assert len({tuple(o.token_ids) for o in outs}) == len(prompts)  # the prompts matter
    for prompt, out in zip(prompts, outs, strict=True):
        ref, reason = hf_greedy(model, tokenizer, prompt, N_NEW, stops)
        assert out.token_ids == ref
        assert out.finish_reason == reason
        assert out.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert out.text == tokenizer.decode(ref, skip_special_tokens=True).strip()


def test_pretokenized_prompts_match_strings(parts):
    model, tokenizer, prompts = parts
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[:3]]
    sampling = SamplingConfig(max_new_tokens=6)
    assert generate_batch(model, tokenizer, ids, sampling) == generate_batch(
        model, tokenizer, prompts[:3], sampling
    )


def test_sampling_is_reproducible_and_independent_of_batch_mates(parts):
    model, tokenizer, prompts = parts
    sampling = SamplingConfig(max_new_tokens=N_NEW, temperature=1.0, top_p=0.95)
    seeds = [row_seed(7, f"row-{i}") for i in range(len(prompts))]
    batch = generate_batch(model, tokenizer, prompts, sampling, seeds=seeds)
    assert generate_batch(model, tokenizer, prompts, sampling, seeds=seeds) == batch
    for i, prompt in enumerate(prompts):
        alone = generate_batch(model, tokenizer, [prompt], sampling, seeds=[seeds[i]])[0]
        assert alone == batch[i], f"row {i} depends on its batch mates"
    # Other seeds give other samples, and sampling is not greedy in disguise.
    other = generate_batch(model, tokenizer, prompts, sampling, seeds=[s + 1 for s in seeds])
    assert [o.token_ids for o in other] != [b.token_ids for b in batch]
    greedy = generate_batch(model, tokenizer, prompts, SamplingConfig(max_new_tokens=N_NEW))
    assert [g.token_ids for g in greedy] != [b.token_ids for b in batch]


def test_tiny_top_p_is_greedy(parts):
    model, tokenizer, prompts = parts
    greedy = generate_batch(model, tokenizer, prompts, SamplingConfig(max_new_tokens=8))
    nucleus = generate_batch(
        model,
        tokenizer,
        prompts,
        SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=1e-6),
        seeds=[1] * 5,
    )
    assert nucleus == greedy


@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
def test_generate_keeps_input_order(parts, batch_size):
    model, tokenizer, prompts = parts
    sampling = SamplingConfig(max_new_tokens=6)
    expected = [generate_batch(model, tokenizer, [p], sampling)[0] for p in prompts]
    assert generate(model, tokenizer, prompts, sampling, batch_size=batch_size) == expected


def test_generate_sampling_does_not_depend_on_batch_size(parts):
    model, tokenizer, prompts = parts
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.8)
    seeds = [row_seed(0, str(i)) for i in range(len(prompts))]
    a = generate(model, tokenizer, prompts, sampling, batch_size=2, seeds=seeds)
    b = generate(model, tokenizer, prompts, sampling, batch_size=5, seeds=seeds, progress=True)
    assert a == b
    # Without seeds: drawn from torch's global generator in input order.
    torch.manual_seed(3)
    c = generate(model, tokenizer, prompts, sampling, batch_size=1)
    torch.manual_seed(3)
    d = generate(model, tokenizer, prompts, sampling, batch_size=4)
    assert c == d


def test_finished_rows_are_dropped(parts):
    model, tokenizer, prompts = parts
    base_stops = stop_token_ids(tokenizer, model)
    # Make the third greedy token of prompt 1 a stop token, so that row stops early.
    free, _ = hf_greedy(model, tokenizer, prompts[1], N_NEW, base_stops)
    assert len(free) >= 3
    stops = base_stops + [free[2]]
    refs = [hf_greedy(model, tokenizer, p, N_NEW, stops) for p in prompts]
    assert refs[1][1] == "stop" and len(refs[1][0]) <= 2

    batch_sizes: list[int] = []
    kept_calls: list[list[int]] = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: batch_sizes.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        outs = generate_batch(
            model,
            tokenizer,
            prompts,
            SamplingConfig(max_new_tokens=N_NEW),
            stop_ids=stops,
            on_rows_kept=lambda kept: kept_calls.append(kept.tolist()),
        )
    finally:
        hook.remove()

    for out, (ref, reason) in zip(outs, refs, strict=True):
        assert out.token_ids == ref
        assert out.finish_reason == reason
    # Prefill over all rows, then each decode step runs only rows that have not stopped.
    lengths = [len(o.token_ids) for o in outs]
    expected = [len(prompts)] + [
        alive for step in range(N_NEW - 1) if (alive := sum(n > step for n in lengths)) > 0
    ]
    assert batch_sizes == expected
    # on_rows_kept indices follow the running batch: replaying them gives the surviving rows.
    assert kept_calls, "no compaction happened"
    alive_rows = list(range(len(prompts)))
    for kept in kept_calls:
        assert kept == sorted(set(kept)) and len(kept) < len(alive_rows)
        dropped = [alive_rows[j] for j in range(len(alive_rows)) if j not in kept]
        assert all(outs[r].finish_reason == "stop" for r in dropped)
        alive_rows = [alive_rows[j] for j in kept]
    last_step = len(expected) - 2
    assert alive_rows == [r for r, n in enumerate(lengths) if n > last_step]


def test_padding_goes_when_the_padded_rows_finish(parts):
    model, tokenizer, prompts = parts
    base_stops = stop_token_ids(tokenizer, model)
    long_first, _ = hf_greedy(model, tokenizer, prompts[2], 1, base_stops)
    stops = base_stops + long_first  # the longest prompt stops at once
    refs = [hf_greedy(model, tokenizer, p, N_NEW, stops) for p in (prompts[2], prompts[0], prompts[0])]
    assert refs[0] == ([], "stop") and len(refs[1][0]) > 2

    masks: list[bool] = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: masks.append(kw["attention_mask"] is not None), with_kwargs=True
    )
    try:
        outs = generate_batch(
            model,
            tokenizer,
            [prompts[2], prompts[0], prompts[0]],
            SamplingConfig(max_new_tokens=N_NEW),
            stop_ids=stops,
        )
    finally:
        hook.remove()
    assert [(o.token_ids, o.finish_reason) for o in outs] == refs
    # Padded prefill needs the mask; the two equal prompts left afterwards need none.
    assert masks[0] and not any(masks[1:])


def test_no_autograd_graph(parts):
    model, tokenizer, prompts = parts
    grad_enabled: list[bool] = []
    hook = model.register_forward_pre_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    try:
        generate(model, tokenizer, prompts[:2], SamplingConfig(max_new_tokens=2))
        generate_batch(model, tokenizer, prompts[:2], SamplingConfig(max_new_tokens=2))
    finally:
        hook.remove()
    assert grad_enabled and not any(grad_enabled)


def test_sampled_rows_keep_their_streams_after_compaction(parts):
    model, tokenizer, prompts = parts
    sampling = SamplingConfig(max_new_tokens=N_NEW, temperature=1.0)
    seeds = [row_seed(1, str(i)) for i in range(len(prompts))]
    # A broad stop set so rows finish at different steps.
    stops = stop_token_ids(tokenizer, model) + list(range(100, 140))
    kept_calls: list[list[int]] = []
    batch = generate_batch(
        model,
        tokenizer,
        prompts,
        sampling,
        seeds=seeds,
        stop_ids=stops,
        on_rows_kept=lambda kept: kept_calls.append(kept.tolist()),
    )
    assert kept_calls, "no compaction happened"
    assert len({len(o.token_ids) for o in batch}) > 2
    for i, prompt in enumerate(prompts):
        alone = generate_batch(model, tokenizer, [prompt], sampling, seeds=[seeds[i]], stop_ids=stops)[0]
        assert alone == batch[i]


def test_model_that_stops_at_once(parts):
    model, tokenizer, prompts = parts
    eos = tokenizer.eos_token_id
    calls: list[int] = []

    def force_eos(_module, _inputs, output):
        output = output.clone()
        output[..., eos] = 1e4
        return output

    hooks = [
        model.lm_head.register_forward_hook(force_eos),
        model.register_forward_pre_hook(lambda *_: calls.append(1)),
    ]
    try:
        for sampling in (SamplingConfig(max_new_tokens=5), SamplingConfig(max_new_tokens=5, temperature=1.0)):
            outs = generate_batch(model, tokenizer, prompts, sampling, seeds=list(range(len(prompts))))
            assert all(o == Generation("", [], "stop", o.prompt_tokens) for o in outs)
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == 2  # the prefill only, once per call


def test_edge_cases(parts):
    model, tokenizer, prompts = parts
    assert generate_batch(model, tokenizer, [], SamplingConfig()) == []
    assert generate(model, tokenizer, [], SamplingConfig()) == []
    outs = generate(model, tokenizer, prompts[:2], SamplingConfig(max_new_tokens=0))
    assert [(o.text, o.token_ids, o.finish_reason) for o in outs] == [("", [], "length")] * 2
    assert all(o.prompt_tokens > 0 for o in outs)
    with pytest.raises(ValueError, match="empty"):
        generate_batch(model, tokenizer, [""], SamplingConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="seeds"):
        generate_batch(model, tokenizer, prompts[:2], SamplingConfig(temperature=1.0), seeds=[1])
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingConfig(temperature=-1.0)


def test_works_through_peft(tiny_backbone):
    from peft import LoraConfig, get_peft_model

    from prism_lightning.testing import build_tiny_model

    tokenizer = tiny_backbone.tokenizer
    prompts = [tiny_backbone.formatter.prompt(q) for q in QUERIES[:3]]
    base = build_tiny_model(len(tokenizer), layers=2, seed=1).eval()
    sampling = SamplingConfig(max_new_tokens=6)
    expected = generate_batch(base, tokenizer, prompts, sampling)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    assert generate_batch(peft_model, tokenizer, prompts, sampling) == expected  # LoRA B starts at zero


def test_stop_token_ids(tiny_backbone):
    tokenizer = tiny_backbone.tokenizer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = stop_token_ids(tokenizer, tiny_backbone.model)
    assert im_end in ids
    assert len(ids) == len(set(ids))
    assert tokenizer.unk_token_id not in ids  # absent markers (<|eot_id|>...) must not map to unk
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[im_end, 7]))
    assert stop_token_ids(tokenizer, model) == [im_end, 7]
    assert stop_token_ids(tokenizer) == [im_end]


def test_row_seed_is_stable():
    seed = row_seed(0, "writing/0")
    assert seed == row_seed(0, "writing/0")
    assert 0 <= seed < 2**63
    assert seed == 5554045781745602242  # hashlib-based: the same in every process and Python version
    assert row_seed(1, "writing/0") != seed
    assert row_seed(0, "writing/1") != seed


def test_first_log_probs_are_the_prefill_next_token_distribution(parts):
    model, tokenizer, prompts = parts
    prompts = prompts[:3]
    gens = generate_batch(
        model, tokenizer, prompts, SamplingConfig(max_new_tokens=2), keep_first_log_probs=True
    )
    for prompt, gen in zip(prompts, gens, strict=True):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
        torch.testing.assert_close(gen.first_log_probs, expected, atol=1e-4, rtol=1e-4)
        if gen.token_ids:  # greedy: the first generated token is that distribution's argmax
            assert gen.token_ids[0] == int(expected.argmax())
    plain = generate_batch(model, tokenizer, prompts, SamplingConfig(max_new_tokens=2))
    assert all(g.first_log_probs is None for g in plain)


def test_top_p_candidates_sample_exactly_the_nucleus(monkeypatch):
    """Top-p looks at a few candidates first; a row whose nucleus is wider falls back to the full
    vocabulary. Either way every sampled token lies in the nucleus and every nucleus token occurs."""
    from prism_lightning import token_sampling

    monkeypatch.setattr(token_sampling, "TOP_P_CANDIDATES", 4)
    peaked = torch.tensor([8.0, 7.5, 7.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # nucleus: 3 tokens
    flat = torch.zeros(10)  # nucleus at 0.85: 9 of 10 tokens, past the 4 candidates
    logits = torch.stack([peaked, flat])
    sampling = SamplingConfig(temperature=1.0, top_p=0.85)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    seen: list[set[int]] = [set(), set()]
    for _ in range(400):
        for row, tok in enumerate(token_sampling.pick_tokens(logits, sampling, gens).tolist()):
            seen[row].add(tok)
    assert seen[0] == {0, 1, 2}
    assert len(seen[1]) == 9


def test_top_p_rows_stay_independent_of_batch_mates(monkeypatch):
    from prism_lightning import token_sampling

    monkeypatch.setattr(token_sampling, "TOP_P_CANDIDATES", 4)
    logits = torch.randn(3, 50) * torch.tensor([[5.0], [0.01], [2.0]])  # row 1 needs the fallback
    sampling = SamplingConfig(temperature=0.7, top_p=0.9)
    pick = token_sampling.pick_tokens
    together = pick(logits, sampling, [torch.Generator().manual_seed(s) for s in range(3)])
    for row in range(3):
        alone = pick(logits[row : row + 1], sampling, [torch.Generator().manual_seed(row)])
        assert alone.item() == together[row].item()


def test_per_row_sampling_matches_each_row_alone(parts):
    """Rows with different temperatures and lengths share a batch and still get exactly what they
    would get alone (MT-Bench runs its per-category temperatures in one batch)."""
    model, tokenizer, prompts = parts
    configs = [
        SamplingConfig(max_new_tokens=N_NEW),
        SamplingConfig(max_new_tokens=4, temperature=0.7, top_p=0.9),
        SamplingConfig(max_new_tokens=N_NEW, temperature=1.0),
        SamplingConfig(max_new_tokens=0),
        SamplingConfig(max_new_tokens=7, temperature=0.1, top_p=0.9),
    ]
    seeds = [row_seed(3, str(i)) for i in range(len(prompts))]
    mixed = generate(model, tokenizer, prompts, configs, batch_size=3, seeds=seeds)
    for i, prompt in enumerate(prompts):
        alone = generate_batch(model, tokenizer, [prompt], configs[i], seeds=[seeds[i]])[0]
        assert mixed[i] == alone, f"row {i}"
        assert len(alone.token_ids) <= configs[i].max_new_tokens
    assert mixed[3].token_ids == [] and mixed[3].finish_reason == "length"
    with pytest.raises(ValueError, match="sampling configs"):
        generate(model, tokenizer, prompts, configs[:2])


def test_balanced_batches():
    assert [len(b) for b in balanced_batches(list(range(40)), 32)] == [20, 20]
    assert [len(b) for b in balanced_batches(list(range(64)), 32)] == [32, 32]
    assert [len(b) for b in balanced_batches(list(range(5)), 8)] == [5]
    assert [len(b) for b in balanced_batches(list(range(7)), 3)] == [3, 2, 2]
    assert sum(balanced_batches([4, 2, 9, 1], 3), []) == [4, 2, 9, 1]
    assert balanced_batches([], 4) == []
