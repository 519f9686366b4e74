"""The documentation site under docs/: it builds with `mkdocs build --strict` without a network, and the
pages that mirror code (config keys, commands and their flags, assets, the public API) still match it."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _section(text: str, heading: str) -> str:
    """The body of a Markdown section, from `heading` to the next heading of the same level."""
    level = heading.split(" ", 1)[0]
    return text.split(f"\n{heading}\n", 1)[1].split(f"\n{level} ", 1)[0]


def _table_rows(text: str) -> list[list[str]]:
    """The body rows (not the headers) of every Markdown table in `text`, as stripped cells (escaped pipes
    kept whole)."""
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines):
        header = i + 1 < len(lines) and lines[i + 1].startswith("|--")
        if line.startswith("| ") and not header and not set(line) <= set("|- "):
            rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def _help(command: str, capsys, monkeypatch) -> str:
    """`python -m prism_lightning <command> --help`, in-process, with its whitespace folded."""
    from prism_lightning.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code in (0, None)
    return " ".join(capsys.readouterr().out.split())


# --- the site -----------------------------------------------------------------------------------------


def test_site_builds_strict_offline_with_the_whole_public_api(tmp_path):
    dead = "http://127.0.0.1:9"  # any attempt to fetch fonts, inventories or the like fails the build
    env = {**os.environ, "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "http_proxy": dead, "https_proxy": dead}
    env["NO_MKDOCS_2_WARNING"] = "1"  # mkdocs-material's banner about its successor
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    import prism_lightning

    api = (site / "reference" / "api" / "index.html").read_text()
    missing = [
        n for n in prism_lightning.__all__ if n != "__version__" and f'id="prism_lightning.{n}"' not in api
    ]
    assert not missing, f"the API reference lacks {missing} (each needs a docstring)"


def test_every_page_is_in_the_nav():
    import yaml

    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    listed = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", nav, re.M))
    assert pages == listed
    assert yaml.safe_load(nav.split("\nnav:", 1)[0])["theme"]["font"] is False  # no web fonts


# --- config keys (docs/configuration.md) against the class signatures -----------------------------------


def _documented_defaults() -> dict[str, object]:
    """{"model.lora_rank": 16, "data.bootstrap.seed": 0, ...} from the config-key tables, for the rows whose
    keys and defaults pair up one to one."""
    import yaml

    text = (DOCS / "configuration.md").read_text()
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


def test_config_tables_match_the_class_defaults():
    documented, code = _documented_defaults(), _signature_defaults()
    assert len(documented) >= 30  # the tables are still parsed
    wrong = {
        k: (v, code.get(k, "<no such key>"))
        for k, v in documented.items()
        if code.get(k, "<no such key>") != v
    }
    assert not wrong, wrong


def test_default_yaml_sets_no_model_or_data_value_that_the_classes_already_have():
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    code = _signature_defaults()
    assert config["data"] == {"run_dir": "runs/default"}
    assert config["model"] == {"backbone": {"model": code["model.backbone.model"]}}


def test_every_config_key_the_deviations_name_exists():
    """Each deviation names the key that switches it; a renamed key must not leave a dead name there."""
    import inspect

    import lightning.pytorch as pl

    text = (DOCS / "reproducing.md").read_text(encoding="utf-8").split("## Deviations from the paper", 1)[1]
    named = set(re.findall(r"`((?:model|data|trainer)\.[\w.]+)", text))
    assert {"data.val_fraction", "model.gate_lr", "trainer.gradient_clip_val"} <= named  # still parsed
    code = set(_signature_defaults()) | {f"trainer.{p}" for p in inspect.signature(pl.Trainer).parameters}
    code |= {"data.bootstrap.generation"}  # a nested config of its own (engines.GenerationConfig)
    assert not sorted(named - code)


# --- commands (docs/commands.md) against the CLI ---------------------------------------------------------


def _declared_commands(capsys) -> set[str]:
    from prism_lightning.cli import main

    main(["--help"])
    usage = capsys.readouterr().out.split("commands:", 1)[1]
    return set(re.findall(r"^  ([\w-]+) ", usage, re.M))


def test_command_table_lists_exactly_the_cli_commands(capsys):
    declared = _declared_commands(capsys)
    text = (DOCS / "commands.md").read_text()
    first_table = text.split("\n\n| command |", 1)[1].split("\n\n", 1)[0]
    documented = {name for row in _table_rows(first_table) for name in re.findall(r"`([\w-]+)`", row[0])}
    assert documented == declared
    headings = {h for line in re.findall(r"^## (.+)$", text, re.M) for h in line.split(", ")}
    assert declared <= headings, f"no section for {declared - headings}"


def test_fit_options_table_matches_fit_help(capsys, monkeypatch):
    import yaml

    rows = [
        r for r in _table_rows(_section((DOCS / "commands.md").read_text(), "## fit")) if r[0][:3] == "`--"
    ]
    assert len(rows) >= 5
    help_text = _help("fit", capsys, monkeypatch)
    for option, default, _ in rows:
        option = option.strip("`")
        # the option's own entry (not the usage line's "[--option METAVAR]"), up to jsonargparse's
        # "(type: ..., default: ...)"
        match = re.search(rf"(?<!\[){re.escape(option)} \S+ .*?\(type: [^)]*?default: ([^)]+)\)", help_text)
        assert match, f"{option} is not in `fit --help`"
        assert yaml.safe_load(match.group(1)) == yaml.safe_load(default.strip("`")), option


def _declared_settings() -> dict[str, type]:
    from prism_lightning.analysis.report import ReportSettings
    from prism_lightning.asset_cli import AssetsSettings
    from prism_lightning.chat import ChatSettings
    from prism_lightning.eval.cli import EvaluateSettings, StudySettings
    from prism_lightning.eval.gate_probe import ProbeGateSettings
    from prism_lightning.reproduce.cli import ReproduceSettings
    from prism_lightning.serve.cli import ServeSettings

    return {
        "evaluate": EvaluateSettings,
        "study": StudySettings,
        "reproduce": ReproduceSettings,
        "report": ReportSettings,
        "assets": AssetsSettings,
        "chat": ChatSettings,
        "serve": ServeSettings,
        "probe-gate": ProbeGateSettings,
    }


# study documents its own options and shares the rest with evaluate's table
_TABLE_SHARED_WITH = {"study": "evaluate"}


def _documented_options(command: str) -> dict[str, str]:
    """{"--flag": "default cell"} of a command section's options table (one row may name several flags)."""
    rows = _table_rows(_section((DOCS / "commands.md").read_text(), f"## {command}"))
    return {flag: row[1] for row in rows if row[0][:3] == "`--" for flag in re.findall(r"`(--\w+)`", row[0])}


@pytest.mark.parametrize(
    "command", ["evaluate", "study", "reproduce", "report", "assets", "chat", "serve", "probe-gate"]
)
def test_options_table_matches_the_declared_settings(command):
    """Each row's flag and default against the settings dataclass the command's parser is generated from,
    and every declared option documented (positional arguments are named in the section's prose)."""
    import dataclasses

    import yaml

    from prism_lightning.settings_args import declared_options

    declared = {k: v for k, v in declared_options(_declared_settings()[command]).items() if k[:2] == "--"}
    own = _documented_options(command)
    assert len(own) >= 2
    assert not sorted(set(own) - set(declared)), "documented but not declared"
    shared = _documented_options(_TABLE_SHARED_WITH.get(command, command))
    documented = {**{k: v for k, v in shared.items() if k in declared}, **own}
    assert not sorted(set(declared) - set(documented)), "declared but not documented"
    for option, default in declared.items():
        cell = documented[option]
        if default is dataclasses.MISSING:
            assert cell == "required", option
            continue
        if isinstance(default, (tuple, list)) and default:
            default = ",".join(default)
        assert yaml.safe_load(cell.strip("`")) == default, (option, cell, default)


# The Lightning verbs and `bootstrap` share one parser (LightningCLI over PrismModule and PrismDataModule),
# so their sections are checked against `fit --help`.
_HELP_OF = {"validate": "fit", "test": "fit", "predict": "fit", "bootstrap": "fit"}


def test_every_flag_a_command_section_names_is_in_its_help(capsys, monkeypatch):
    declared = _declared_commands(capsys)
    text = (DOCS / "commands.md").read_text()
    helps: dict[str, str] = {}
    checked = 0
    for heading in re.findall(r"^## (.+)$", text, re.M):
        commands = [c for c in heading.split(", ") if c in declared]  # not "Bad input", "Models"
        flags = set(re.findall(r"--[a-z][\w.-]*[a-z_]", _section(text, f"## {heading}")))
        for command in commands:
            source = _HELP_OF.get(command, command)
            if source not in helps:
                helps[source] = _help(source, capsys, monkeypatch)
            for flag in flags:
                assert re.search(rf"{re.escape(flag)}\b", helps[source]), (
                    f"{command}: {flag} not in its --help"
                )
                checked += 1
    assert checked >= 40


def test_readme_command_lines_use_real_commands_and_flags(capsys, monkeypatch):
    """Every `python -m prism_lightning <command> ...` line of the README, its tour included."""
    declared = _declared_commands(capsys)
    lines = re.findall(r"^python -m prism_lightning ([\w-]+)(.*)$", (ROOT / "README.md").read_text(), re.M)
    assert len(lines) >= 10
    helps: dict[str, str] = {}
    for command, rest in lines:
        assert command in declared, command
        source = _HELP_OF.get(command, command)
        if source not in helps:
            helps[source] = _help(source, capsys, monkeypatch)
        for flag in re.findall(r"--[a-z][\w.-]*[a-z_]", rest.split("#", 1)[0]):
            assert re.search(rf"{re.escape(flag)}\b", helps[source]), f"README: {command} {flag}"


# --- assets (docs/assets.md) against prism_lightning/assets.py ---------------------------------------------


def test_asset_table_matches_the_pins():
    from prism_lightning.assets import ASSETS

    rows = _table_rows((DOCS / "assets.md").read_text())
    documented = {row[0].strip("`"): row[1].strip("`") for row in rows}
    assert documented == {name: a.requirement for name, a in ASSETS.items()}
