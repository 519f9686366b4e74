"""Tiny random models built from a config, with a tokenizer trained on the spot: fast tests and
CPU benchmarks need a real transformers model and tokenizer without touching the hub."""

from __future__ import annotations

from pathlib import Path

import torch

# ChatML with a default system prompt, like SmolLM2's template: exercises the "no persona" rule.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Mistral-like: no system role, raises on one.
NO_SYSTEM_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '[' + message['role'] + '] ' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
)
# DeepSeek-R1-Distill's layout on the tiny tokenizer's markers: the system prompt bare before the turns, the
# thinking block cut from earlier assistant turns, and a generation prompt that opens the block.
THINKING_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<|im_start|>user\n' + message['content'] + '<|im_end|>\n' }}"
    "{% else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)
#: The tags of a thinking block, one (non-special) token each, as in DeepSeek-R1-Distill's vocabulary.
THINK_TAGS = ("<think>", "</think>")

_CORPUS = (
    "You are a mathematician. What is twelve times seven? The answer is eighty four. "
    "Write a short poem about the sea. Explain how photosynthesis works in plants. "
    "A: B: TIE. Output A is better. Output B is better. Which answer is more helpful, correct and clear? "
    "def add(a, b): return a + b  # code 0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] { } : ; , . ! ? "
    "Safety first: I cannot help with that request. History, philosophy, literature and art. "
)


# Qwen2's pre-tokenizer split (Llama 3's is alike): punctuation keeps the line breaks that follow it
# (`` ?[^\s\p{L}\p{N}]+[\r\n]*``), so BPE learns merged tokens such as "?\n", ":\n" and ".\n".
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Lines ending in punctuation, frequent enough that "?\n", ":\n" and ".\n" become single tokens.
_LINES_CORPUS = (
    "Here is a question:\nWhat is twelve times seven?\nWrite a short poem about the sea.\n"
    "1. Explain how photosynthesis works in plants.\nQuery:\nWhich answer is better?\n"
)


#: Prompts of very different lengths (one a single word, one code) for the decode-loop equality tests.
GENERATION_QUERIES = (
    "Write a short poem about the sea.",
    "What is twelve times seven?",
    "Explain how photosynthesis works in plants, step by step, for a curious child of ten.",
    "Hi",
    "def add(a, b): return a + b  # explain this code",
)


def build_tiny_tokenizer(
    vocab_size: int = 384,
    chat_template: str = TINY_CHAT_TEMPLATE,
    *,
    merged_newlines: bool = False,
    thinking: bool = False,
):
    """A byte-level BPE tokenizer with ChatML special tokens, trained in milliseconds.

    ``merged_newlines`` splits words like Qwen2.5 / Llama 3 and trains on lines, so the tokenizer has
    tokens that hold punctuation and a line break together ("?\n", ":\n", ".\n"); the default
    (GPT-2 split, like SmolLM2) always puts a line break in a token of its own. ``thinking`` adds the
    :data:`THINK_TAGS` as tokens (use with :data:`THINKING_CHAT_TEMPLATE`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    if merged_newlines:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [_CORPUS] * 4 + ([_LINES_CORPUS] * 8 if merged_newlines else [])
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = chat_template
    if thinking:
        fast.add_tokens(list(THINK_TAGS))
    return fast


def build_tiny_model(vocab_size: int, *, layers: int = 4, hidden: int = 64, seed: int = 0):
    """A Llama-architecture causal LM with random weights, small enough for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny_model(
    directory: str | Path,
    *,
    layers: int = 4,
    hidden: int = 64,
    chat_template: str = TINY_CHAT_TEMPLATE,
    merged_newlines: bool = False,
    thinking: bool = False,
) -> Path:
    """Write a tiny model + tokenizer to a directory that `load_backbone` takes like any local model;
    ``thinking``: a reasoning model's (DeepSeek-R1-Distill-like template and think tags)."""
    directory = Path(directory)
    if thinking and chat_template == TINY_CHAT_TEMPLATE:
        chat_template = THINKING_CHAT_TEMPLATE
    tokenizer = build_tiny_tokenizer(
        chat_template=chat_template, merged_newlines=merged_newlines, thinking=thinking
    )
    model = build_tiny_model(len(tokenizer), layers=layers, hidden=hidden)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# Bootstrap settings small enough for a tiny model to run every stage in a few seconds.
TINY_BOOTSTRAP_SETTINGS = {
    "personas": ["math", "writing"],
    "queries_per_persona": 3,
    "min_query_chars": 2,
    "query_max_new_tokens": 12,
    "answer_max_new_tokens": 10,
    "teacher_top_k": 8,
    "batch_size": 2,
}


def with_large_random_weights(model, seed: int = 0, std: float = 0.2):
    """A copy of ``model`` (eval mode) with every non-norm weight redrawn at ``std``: at the default
    init (std 0.02) greedy decoding repeats one token forever, which makes generation tests vacuous."""
    import copy

    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model.eval()


def untrained_checkpoint(
    model: str,
    path: str | Path,
    *,
    lora_std: float | None = None,
    lora_params: str = "lora_",
    gate_std: float | None = None,
    prepare=None,
    personas: tuple[str, ...] = ("math",),
    **module_kwargs,
) -> Path:
    """An exported PRISM checkpoint without training, for tests and benchmarks of what serves it (a
    training run costs minutes; routing and serving do not depend on what the adapter learned).

    From seed 0: the adapter parameters whose names contain ``lora_params`` are drawn at ``lora_std``
    (``lora_B`` alone is zero at init, so the adapter becomes visible), ``prepare(module)`` runs, then the
    gate's last layer is drawn at ``gate_std``, and its bias is zero so it decides near 0.5."""
    from prism_lightning.backbone import BackboneConfig
    from prism_lightning.model.export import export_checkpoint
    from prism_lightning.model.module import PrismModule

    torch.manual_seed(0)
    module = PrismModule(backbone=BackboneConfig(model=model), **module_kwargs)
    module.configure_model()
    module.eval()
    with torch.no_grad():
        if lora_std is not None:
            for name, param in module.model.named_parameters():
                if lora_params in name:
                    param.normal_(0.0, lora_std)
        if prepare is not None:
            prepare(module)
        if gate_std is not None:
            module.gate.net[-1].weight.normal_(0.0, gate_std)
        module.gate.net[-1].bias.fill_(0.0)
    return export_checkpoint(module, Path(path), personas=list(personas))


def write_small_mtbench(directory: Path, per_category: int = 1, turns=None) -> list[str]:
    """MT-Bench-format question, reference and judge-prompt files with short texts (the real judge prompts
    are 1-3k tokens: too slow for a test), in ``directory``; returns the ``evaluate`` options naming them.
    ``turns(question_id, category)`` gives a question's two turns."""
    import json

    from prism_lightning.eval import benchmarks as B

    turns = turns or (lambda qid, cat: [f"Q{qid}?", "And?"])
    q, r, j = directory / "question.jsonl", directory / "reference.jsonl", directory / "judge_prompts.jsonl"
    with open(q, "w") as fq, open(r, "w") as fr:
        for k, cat in enumerate(B.MTBENCH_CATEGORIES):
            for i in range(per_category):
                qid = 100 + 10 * k + i
                fq.write(json.dumps({"question_id": qid, "category": cat, "turns": turns(qid, cat)}) + "\n")
                answers = {"question_id": qid, "choices": [{"index": 0, "turns": ["R1", "R2"]}]}
                fr.write(json.dumps(answers) + "\n")
    rate = ' Rate 1-10 as "[[rating]]".'
    templates = {
        "single-v1": "Q: {question}\nA: {answer}" + rate,
        "single-math-v1": "Q: {question}\nRef: {ref_answer_1}\nA: {answer}" + rate,
        "single-v1-multi-turn": "Q: {question_1}\nA: {answer_1}\nQ: {question_2}\nA: {answer_2}",
        "single-math-v1-multi-turn": "Q: {question_1} {ref_answer_1}\nA: {answer_1}\nQ: {question_2}"
        " {ref_answer_2}\nA: {answer_2}",
    }
    with open(j, "w") as f:
        for name, t in templates.items():
            row = {"name": name, "type": "single", "system_prompt": "Judge." + rate, "prompt_template": t,
                   "output_format": "[[rating]]"}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return ["--mtbench_file", str(q), "--mtbench_references_file", str(r), "--judge_prompts_file", str(j)]


def tiny_bootstrap_config(**overrides):
    from prism_lightning.bootstrap.config import BootstrapConfig

    return BootstrapConfig(**{**TINY_BOOTSTRAP_SETTINGS, **overrides})


# A `fit` override (after configs/default.yaml) that runs the whole method on a tiny model in seconds;
# format with model=<tiny model dir>. Runs land in runs/tiny (W&B through the default config's logger, with
# its paths derived from data.run_dir), the export in checkpoints/tiny.
TINY_FIT_YAML = """
trainer:
  max_epochs: 2
  callbacks: []
  enable_checkpointing: false
model:
  backbone: {{model: {model}}}
  gate_hidden: [16]
  lora_rank: 4
data:
  run_dir: runs/tiny
  batch_size: 4
  bootstrap:
    personas: [math, coding, writing]
    queries_per_persona: 4
    query_max_new_tokens: 12
    min_query_chars: 1
    answer_max_new_tokens: 8
"""


def run_script(path: str | Path, source: str, *, timeout: float = 300):
    """Write ``source`` (dedented) to ``path`` and run it in a fresh Python process from its directory,
    with this checkout importable and one thread per process; the run must succeed. Multi-process tests
    (DDP, FSDP) need their own process: Lightning launches the other ranks from the script."""
    import os
    import subprocess
    import sys
    import textwrap

    path = Path(path)
    path.write_text(textwrap.dedent(source))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(
        [sys.executable, str(path)], cwd=path.parent, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc
