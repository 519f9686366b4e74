"""The generation-backend settings without starting an engine: validation, CLI errors, stage hashes."""

from __future__ import annotations

import pytest

from prism_lightning.engines import GenerationConfig, parse_overrides
from prism_lightning.errors import ConfigError


def test_generation_config_defaults_and_validation():
    assert GenerationConfig().backend == "hf"
    assert GenerationConfig().identity() is None  # hf adds nothing to hashes or keys
    assert GenerationConfig(backend="vllm").identity() == {"backend": "vllm", "dtype": "auto"}
    for bad in ({"backend": "tgi"}, {"tensor_parallel_size": 0}, {"gpu_memory_utilization": 1.5},
                {"dtype": "int8"}, {"max_model_len": 4}, {"cpu_kv_cache_gib": 0}):  # fmt: skip
        with pytest.raises(ConfigError):
            GenerationConfig(**bad)
    with pytest.raises(ConfigError, match="unknown generation key"):
        GenerationConfig.from_value({"tensor_paralel_size": 2})
    pairs = ["tensor_parallel_size=2", "gpu_memory_utilization=0.8", "max_model_len=null"]
    cfg = parse_overrides(pairs, "vllm")
    assert (cfg.backend, cfg.tensor_parallel_size, cfg.gpu_memory_utilization, cfg.max_model_len) == (
        "vllm", 2, 0.8, None,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["tensor_parallel_size"])


def test_backend_is_part_of_the_stage_hashes_and_hf_hashes_are_unchanged(tmp_path):
    from prism_lightning.backbone import BackboneConfig
    from prism_lightning.bootstrap.runner import stage_stores
    from prism_lightning.testing import tiny_bootstrap_config

    bb = BackboneConfig()
    default = stage_stores(tiny_bootstrap_config(), bb, tmp_path)
    hf = stage_stores(tiny_bootstrap_config(generation={"backend": "hf", "max_num_seqs": 8}), bb, tmp_path)
    vllm = stage_stores(tiny_bootstrap_config(generation={"backend": "vllm"}), bb, tmp_path)
    for name in default:
        assert default[name].path == hf[name].path  # engine settings of an unused backend change nothing
        assert default[name].path != vllm[name].path
    with pytest.raises(ConfigError):
        tiny_bootstrap_config(generation={"backend": "vllm", "max_num_seqs": 0})


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vllm", "foo=1"], "unknown generation key"),
        (["--vllm", "max_num_seqs=0"], "max_num_seqs must be >= 1"),
        (["--backend", "tgi"], "invalid choice"),
    ],
)
def test_evaluate_backend_errors_are_one_line(args, message, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "prism_lightning", "evaluate", "--out", str(tmp_path), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_a_head_size_vllm_cpu_cannot_run_is_refused_before_the_engine_starts(tiny_model_dir):
    """vLLM's CPU attention has kernels for fixed head sizes (the tiny test model's 16 is not one); the
    engine would otherwise fail inside its first forward with a traceback."""
    pytest.importorskip("vllm")
    import torch

    from prism_lightning.backbone import BackboneConfig
    from prism_lightning.engines.vllm_core import get_engine

    if torch.cuda.is_available():
        pytest.skip("a GPU engine has other kernels")
    with pytest.raises(ConfigError, match="head size 16; vLLM's CPU build supports 32, 64"):
        get_engine(GenerationConfig(backend="vllm"), BackboneConfig(model=str(tiny_model_dir)))
