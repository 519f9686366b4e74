"""Every shipped YAML must parse against the real classes (a typo'd key fails here, not on a GPU box)."""

from pathlib import Path

import pytest

from prism_lightning.data import PrismDataModule
from prism_lightning.lightning_cli import PrismCLI
from prism_lightning.model.module import PrismModule

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
MODEL_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml"))
TRAINER_PRESETS = sorted((CONFIGS / "trainer").glob("*.yaml"))


class ParseOnlyCLI(PrismCLI):
    def instantiate_classes(self) -> None:  # no Trainer (the GPU presets would need a GPU)
        pass


def parse(*paths: Path):
    args = [a for p in paths for a in ("--config", str(p))]
    return ParseOnlyCLI(PrismModule, PrismDataModule, run=False, args=args).config


def test_configs_exist():
    assert CONFIGS / "default.yaml" in MODEL_CONFIGS
    assert {p.name for p in TRAINER_PRESETS} >= {"ddp.yaml", "fsdp.yaml"}


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.name)
def test_model_config_parses(path):
    cfg = parse(path)
    assert cfg.model.backbone.model
    assert cfg.data.backbone.model == cfg.model.backbone.model  # linked, never out of step
    assert cfg.data.bootstrap.queries_per_persona >= 1


@pytest.mark.parametrize("path", TRAINER_PRESETS, ids=lambda p: p.name)
def test_trainer_preset_composes_with_default(path):
    cfg = parse(CONFIGS / "default.yaml", path)
    assert cfg.trainer.strategy is not None


def test_default_is_the_embedded_model():
    cfg = parse(CONFIGS / "default.yaml")
    assert cfg.model.backbone.model == "smollm2-135m-instruct"
    assert cfg.model.gate_layer == 0 and cfg.model.lora_rank == 16 and cfg.model.lora_alpha == 32


def test_config_typo_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lora_rnak: 8\n")
    with pytest.raises(SystemExit):
        parse(CONFIGS / "default.yaml", bad)
