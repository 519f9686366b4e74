import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + trained BPE tokenizer on disk, loaded through the real local-path route."""
    from prism_lightning.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_backbone(tiny_model_dir):
    from prism_lightning.backbone import load_backbone

    return load_backbone(str(tiny_model_dir), device="cpu")
