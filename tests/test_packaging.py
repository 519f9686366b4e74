"""A real package: the wheel carries the configs, and a plain (not editable) install runs `fit --help` and
`fit --print_config` from an empty directory."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(
    p.relative_to(ROOT / "prism_lightning").as_posix()
    for p in (ROOT / "prism_lightning" / "configs").rglob("*.yaml")
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the sources, so the build leaves no build/ or egg-info behind in the checkout.
    source = out / "source"
    skip = shutil.ignore_patterns(".git", "runs", "checkpoints", "build", "dist", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, source, ignore=skip, symlinks=True)
    # Without build isolation when setuptools is here already (no download); CI can reach PyPI either way.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", *isolation, "-w", str(out), "-q"],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (path,) = out.glob("prism_lightning-*.whl")
    return path


def test_wheel_ships_the_configs_and_the_persona_library(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert CONFIGS and {"default.yaml", "trainer/ddp.yaml"} <= {c.removeprefix("configs/") for c in CONFIGS}
    for config in CONFIGS:
        assert f"prism_lightning/{config}" in names
    assert "prism_lightning/contexts/personas.yaml" in names
    assert not any(n.startswith(("tests/", "notebooks/", "benchmarks/")) for n in names)


def test_configs_link_at_the_top_of_the_checkout_is_the_package_copy():
    assert (ROOT / "configs").resolve() == (ROOT / "prism_lightning" / "configs").resolve()


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtualenv holding its own non-editable copy, which sees the dependencies this interpreter
    sees wherever they live: an active virtualenv, a user site or the system (`system_site_packages` would
    expose only the base interpreter's, which is how a missing install step once hid)."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.create(env_dir, system_site_packages=False, with_pip=False)
    python = env_dir / "bin" / "python"
    own_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # Plain path lines: the directories join sys.path after the venv's own site-packages, and the .pth
    # files inside them (an editable install's finder among them) are not run, so the wheel's copy wins.
    dependency_dirs = [
        p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()
    ]
    (Path(own_site) / "_dependencies_of_the_test_interpreter.pth").write_text(
        "\n".join(dependency_dirs) + "\n"
    )
    pip = [sys.executable, "-m", "pip", "--python", str(python)]  # this pip, installing into the venv
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return python


def _run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [str(python), *args], cwd=cwd, env={**env, "WANDB_MODE": "offline"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def test_installed_package_runs_fit_help_and_print_config_from_an_empty_directory(installed, tmp_path):
    where = _run(installed, "-c", "import prism_lightning; print(prism_lightning.__file__)", cwd=tmp_path)
    assert str(installed.parent.parent) in where.stdout, where.stdout + where.stderr  # not the checkout
    helped = _run(installed, "-m", "prism_lightning", "fit", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "--model.lora_rank" in helped.stdout
    assert "LoRA rank r" in helped.stdout  # per-argument help from the docstrings
    printed = _run(installed, "-m", "prism_lightning", "fit", "--print_config", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert "smollm2-135m-instruct" in printed.stdout and "run_dir: runs/default" in printed.stdout
    assert list(tmp_path.iterdir()) == []  # printing the config writes nothing


def test_public_api_is_importable_from_the_top_level(installed, tmp_path):
    code = (
        "import prism_lightning as p\n"
        "missing = [n for n in p.__all__ if getattr(p, n, None) is None]\n"
        "assert not missing, missing\n"
        "print(p.load_checkpoint.__module__, p.PrismExport.__name__)\n"
    )
    result = _run(installed, "-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "prism_lightning.model.export PrismExport" in result.stdout
