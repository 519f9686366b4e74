"""The README is the front door: its quick start is the contract with users and CI (two commands; CI runs
the second), it stays short, its links stay inside the repository and its module map matches the package.
The long-form pages and their checks against the code are in docs/ and tests/test_docs.py."""

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


def test_ci_runs_in_a_virtualenv_it_creates_and_runs_the_second_tier():
    """A package installed on the machine by hand must not hide a missing install step, and the tests kept
    out of the default run must still run somewhere."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    create = next(i for i, line in enumerate(lines) if " -m venv " in line)
    activate = next(i for i, line in enumerate(lines) if line.startswith(". ") and "bin/activate" in line)
    readme = lines.index(quick_start_commands()[1])
    second = lines.index("python -m pytest -q -m second_tier")
    assert create < activate < readme < second


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def test_readme_is_a_front_door():
    lines = _readme().splitlines()
    assert len(lines) <= 300
    long = [line[:60] for line in lines if len(line) > 200]
    assert not long, long


def test_readme_links_point_inside_the_repository():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _readme())
    assert len(links) >= 10
    for link in links:
        assert "://" not in link and not link.startswith(("/", "..")), link
        assert (ROOT / link).exists(), link
    assert "docs/method.md" in links


def test_module_map_names_every_module_and_package_and_nothing_else():
    """The map's first column, e.g. `backbone.py`, `bootstrap/`, against prism_lightning's top level."""
    section = _readme().split("## Module map", 1)[1].split("\n## ", 1)[0]
    named = {
        name
        for line in section.splitlines()
        if line.startswith("| `")
        for name in re.findall(r"`([\w./]+)`", line.split("|")[1])
    }
    package = ROOT / "prism_lightning"
    modules = {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    packages = {f"{p.name}/" for p in package.iterdir() if p.is_dir() and any(p.rglob("*.py"))}
    assert named == modules | packages
