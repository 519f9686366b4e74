"""The README's quick start is the contract with users and CI: two commands; CI runs the second."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quick_start_has_exactly_two_commands():
    fit, tests = quick_start_commands()
    assert fit.endswith("python -m prism_lightning fit")
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert quick_start_commands()[1] in [line.strip() for line in ci]


def _readme_defaults() -> dict[str, object]:
    """{"model.lora_rank": 16, "data.bootstrap.seed": 0, ...} from the README's config-key tables, for the
    rows whose keys and defaults pair up one to one."""
    import yaml

    text = (ROOT / "README.md").read_text().split("## Config keys", 1)[1].split("\n## ", 1)[0]
    out: dict[str, object] = {}
    section = None
    for line in text.splitlines():
        if line.startswith("**`"):
            section = line.split("`")[1]
        if not line.startswith("| `") or section is None:
            continue
        key_cell, default_cell = line.split("|")[1:3]
        keys = re.findall(r"`([\w.]+)`", key_cell)
        defaults = [d.strip().strip("`") for d in default_cell.split(",")]
        if len(keys) != len(defaults):
            continue
        prefix = ""
        for key, default in zip(keys, defaults, strict=True):
            if "." in key:
                prefix = key.rsplit(".", 1)[0] + "."
                name = key
            else:
                name = prefix + key
            if " " in default:  # prose such as "the 7 projections"
                continue
            value = yaml.safe_load(default)
            if isinstance(value, str) and re.fullmatch(r"[\d.]+e-?\d+", value):
                value = float(value)  # YAML 1.1 reads 1e-3 as a string
            out[f"{section}.{name}"] = value
    return out


def _signature_defaults() -> dict[str, object]:
    import dataclasses
    import inspect

    from prism_lightning.backbone import BackboneConfig
    from prism_lightning.bootstrap.config import BootstrapConfig
    from prism_lightning.data import PrismDataModule
    from prism_lightning.model.module import PrismModule

    def of_class(cls) -> dict[str, object]:
        if dataclasses.is_dataclass(cls):
            return {
                f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)
            }
        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}

    out: dict[str, object] = {}
    for section, cls, nested in (
        ("model", PrismModule, {"backbone": BackboneConfig}),
        ("data", PrismDataModule, {"bootstrap": BootstrapConfig}),
    ):
        for name, value in of_class(cls).items():
            out[f"{section}.{name}"] = value
        for name, sub in nested.items():
            for key, value in of_class(sub).items():
                out[f"{section}.{name}.{key}"] = value
    return out


def test_readme_config_tables_match_the_class_defaults():
    readme, code = _readme_defaults(), _signature_defaults()
    assert len(readme) >= 30  # the tables are still parsed
    wrong = {
        k: (v, code.get(k, "<no such key>")) for k, v in readme.items() if code.get(k, "<no such key>") != v
    }
    assert not wrong, wrong


def test_default_yaml_sets_no_model_or_data_value_that_the_classes_already_have():
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    code = _signature_defaults()
    assert config["data"] == {"run_dir": "runs/default"}
    assert config["model"] == {"backbone": {"model": code["model.backbone.model"]}}
