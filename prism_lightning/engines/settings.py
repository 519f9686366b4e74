"""Which engine generates and its settings: ``hf`` (this package's own decode loop,
:mod:`prism_lightning.generation`) or ``vllm`` (vLLM's engine: paged attention, continuous batching,
per-request LoRA, tensor/data parallel).

:class:`GenerationConfig` is the one config section both the bootstrap (``data.bootstrap.generation``)
and ``evaluate``/``study`` (``--backend``, ``--vllm KEY=VALUE``) read. vLLM itself is imported only
when the ``vllm`` backend is used (``pip install 'prism_lightning[vllm]'``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from prism_lightning.errors import ConfigError

__all__ = ["BACKENDS", "GenerationConfig", "parse_overrides"]

BACKENDS: tuple[str, ...] = ("hf", "vllm")
VLLM_DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")


@dataclass
class GenerationConfig:
    """Which engine generates, the hf engine's decode and the vLLM engine's settings.

    Args:
        backend: hf (default; exact per-row seeds, single-pass routing, any device) or vllm.
        decode_compile: hf only: decode on a static KV cache with a torch.compile-d one-token step
            (batches padded to powers of two; CUDA graphs on GPU): auto (on for CUDA, off on CPU), on
            or off. Same tokens up to the compiled kernels' rounding; the first batch of each size pays
            the compilation.
        tensor_parallel_size: GPUs one vLLM engine shards the model over (models that do not fit one GPU).
        data_parallel_size: vLLM engine replicas (throughput); each has tensor_parallel_size GPUs.
        pipeline_parallel_size: pipeline stages (e.g. one per node when a model spans several nodes).
        distributed_executor_backend: null (vLLM picks: processes on one node), ray (several nodes;
            start the Ray cluster first) or mp.
        gpu_memory_utilization: fraction of GPU memory vLLM may take; null: 0.9 on GPU. On CPU vLLM
            reads it as a fraction of the machine's RAM; null there reserves cpu_kv_cache_gib instead.
        cpu_kv_cache_gib: KV-cache size of a CPU engine when gpu_memory_utilization is null.
        max_model_len: longest prompt + answer in tokens (bounds the KV cache); null: the model's own.
        max_num_seqs: sequences vLLM runs at once; also the rows the bootstrap hands it per batch.
        enforce_eager: no CUDA graphs / compilation; null: eager on CPU, graphs on GPU.
        dtype: auto (the hf backend's rule: bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16.
        max_lora_rank: largest LoRA rank the engine accepts (the exported adapter's rank must fit).
    """

    backend: str = "hf"
    decode_compile: str = "auto"
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    gpu_memory_utilization: float | None = None
    cpu_kv_cache_gib: float = 1.0
    max_model_len: int | None = 4096
    max_num_seqs: int = 64
    enforce_eager: bool | None = None
    dtype: str = "auto"
    max_lora_rank: int = 64

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            choices = ", ".join(BACKENDS)
            raise ConfigError(f"unknown generation backend {self.backend!r}; choose one of {choices}.")
        from prism_lightning.static_decode import DECODE_COMPILE

        if self.decode_compile not in DECODE_COMPILE:
            choices = ", ".join(DECODE_COMPILE)
            raise ConfigError(
                f"generation.decode_compile must be one of {choices}, got {self.decode_compile!r}."
            )
        if self.backend == "vllm" and self.decode_compile == "on":
            raise ConfigError(
                "generation.decode_compile=on compiles the hf engine's decode; the vllm backend compiles its "
                "own (generation.enforce_eager)."
            )
        if self.dtype not in VLLM_DTYPES:
            choices = ", ".join(VLLM_DTYPES)
            raise ConfigError(f"generation.dtype must be one of {choices}, got {self.dtype!r}.")
        if self.distributed_executor_backend not in (None, "ray", "mp"):
            raise ConfigError(
                "generation.distributed_executor_backend must be null, ray or mp, got "
                f"{self.distributed_executor_backend!r}."
            )
        sizes = ("tensor_parallel_size", "data_parallel_size", "pipeline_parallel_size")
        for name in (*sizes, "max_num_seqs", "max_lora_rank"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"generation.{name} must be >= 1, got {getattr(self, name)}.")
        if self.max_model_len is not None and int(self.max_model_len) < 16:
            raise ConfigError(f"generation.max_model_len must be >= 16 or null, got {self.max_model_len}.")
        util = self.gpu_memory_utilization
        if util is not None and not 0.0 < float(util) <= 1.0:
            raise ConfigError(f"generation.gpu_memory_utilization must be in (0, 1] or null, got {util}.")
        if float(self.cpu_kv_cache_gib) <= 0:
            raise ConfigError(f"generation.cpu_kv_cache_gib must be > 0, got {self.cpu_kv_cache_gib}.")

    @classmethod
    def from_value(cls, value: GenerationConfig | dict[str, Any] | None) -> GenerationConfig:
        """A config from YAML/kwargs (a plain dict), an instance, or null (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                keys = ", ".join(cls.__dataclass_fields__)
                raise ConfigError(f"unknown generation key(s) {', '.join(unknown)}; valid keys: {keys}.")
            return cls(**value)
        raise ConfigError(f"generation must be a mapping of settings, got {value!r}.")

    def identity(self) -> dict[str, Any] | None:
        """What of this config changes generated rows (part of stage hashes and item cache keys): None
        for hf, so the hf backend's existing hashes stay as they were; the backend and its dtype for vllm
        (parallel sizes, memory and batch limits change speed, not results)."""
        if self.backend == "hf":
            return None
        return {"backend": self.backend, "dtype": self.dtype}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_overrides(pairs: list[str] | None, backend: str | None = None) -> GenerationConfig:
    """``--vllm KEY=VALUE`` pairs (values read as YAML: 2, 0.5, null, true) + ``--backend``."""
    import yaml

    values: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--vllm takes KEY=VALUE (e.g. tensor_parallel_size=2), got {pair!r}.")
        values[key.strip()] = yaml.safe_load(raw)
    if backend is not None:
        values["backend"] = backend
    return GenerationConfig.from_value(values)
