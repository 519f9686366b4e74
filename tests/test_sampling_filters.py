"""Top-k and the repetition penalty of the generation engine: transformers' rules (penalty over the
prompt and the answer so far, greedy included; top-k before top-p), per-row independence kept."""

from __future__ import annotations

import pytest
import torch

from prism_lightning.generation import SamplingConfig, generate_batch, row_seed, stop_token_ids
from prism_lightning.testing import with_large_random_weights
from prism_lightning.token_sampling import SeenTokens, pick_rows, pick_tokens

QUERIES = ["Write a short poem about the sea.", "What is twelve times seven?", "Hi there, how are you?"]


@pytest.fixture(scope="module")
def parts(tiny_backbone):
    """Large random weights so greedy decoding is not one token repeated (the penalty then matters)."""
    model = with_large_random_weights(tiny_backbone.model, seed=1)
    prompts = [tiny_backbone.formatter.prompt(q) for q in QUERIES]
    return model, tiny_backbone.tokenizer, prompts


def test_greedy_repetition_penalty_matches_model_generate(parts):
    model, tokenizer, prompts = parts
    stops = stop_token_ids(tokenizer, model)
    penalised = SamplingConfig(max_new_tokens=16, repetition_penalty=1.8)
    batch = generate_batch(model, tokenizer, prompts, penalised)
    plain = generate_batch(model, tokenizer, prompts, SamplingConfig(max_new_tokens=16))
    assert [o.token_ids for o in batch] != [o.token_ids for o in plain]  # the penalty changes answers
    for prompt, out in zip(prompts, batch, strict=True):
        enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        ref = model.generate(
            **enc, do_sample=False, max_new_tokens=16, repetition_penalty=1.8,
            eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
        )[0, enc["input_ids"].shape[1] :].tolist()  # fmt: skip
        if ref and ref[-1] in stops:
            ref = ref[:-1]
        assert out.token_ids == ref  # left padding of batch mates is not "seen"


def test_sampled_rows_with_filters_do_not_depend_on_batch_mates(parts):
    model, tokenizer, prompts = parts
    configs = [
        SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.8, repetition_penalty=1.05),
        SamplingConfig(max_new_tokens=6, temperature=0.7, top_k=5),
        SamplingConfig(max_new_tokens=8, repetition_penalty=1.3),
    ]
    seeds = [row_seed(5, str(i)) for i in range(len(prompts))]
    together = generate_batch(model, tokenizer, prompts, configs, seeds=seeds)
    for i, prompt in enumerate(prompts):
        alone = generate_batch(model, tokenizer, [prompt], configs[i], seeds=[seeds[i]])[0]
        assert alone == together[i], f"row {i}"


def test_top_k_samples_exactly_the_k_most_likely():
    logits = torch.tensor([[3.0, 2.9, 2.8, 0.0, 0.0, 0.0, -1.0, 2.7]])
    gen = [torch.Generator().manual_seed(0)]
    picks = {pick_tokens(logits, SamplingConfig(temperature=1.0, top_k=4), gen).item() for _ in range(300)}
    assert picks == {0, 1, 2, 7}
    # top-p then works on the probabilities renormalised over the k (0.28, 0.26, 0.23, 0.21): 0.5 keeps two
    picks = {pick_tokens(logits, SamplingConfig(temperature=1.0, top_k=4, top_p=0.5), gen).item()
             for _ in range(300)}  # fmt: skip
    assert picks == {0, 1}
    one = SamplingConfig(temperature=5.0, top_k=1)
    assert all(pick_tokens(logits, one, gen).item() == 0 for _ in range(20))


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[4.0, 3.0, -1.0, -2.0], [4.0, 3.0, -1.0, -2.0]])
    seen = SeenTokens([[0, 2], []], vocab=4, device=torch.device("cpu"))
    sampling = [SamplingConfig(repetition_penalty=2.0), SamplingConfig(repetition_penalty=2.0)]
    out = seen.penalise(logits, sampling)
    assert out.tolist() == [[2.0, 3.0, -2.0, -2.0], [4.0, 3.0, -1.0, -2.0]]
    assert pick_rows(logits, sampling, [None, None], seen).tolist() == [1, 0]
    seen.add(torch.tensor([1, 0]))
    seen.keep(torch.tensor([1]))
    assert seen.mask.tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("bad", [{"top_k": -1}, {"repetition_penalty": 0.0}, {"repetition_penalty": -1.0}])
def test_bad_filter_values_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)
