"""The import graph follows the layers of docs/design.md: a module imports only modules of its own layer or
below (lazy imports inside functions included, type-only imports excluded), and no two top-level modules or
packages import each other, directly or through others."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "prism_lightning"

# foundation < model < engines < pipelines < commands
LAYERS: dict[str, int] = {
    **dict.fromkeys(
        [
            "errors", "files", "settings_args", "config_files", "run_paths", "assets", "token_sampling",
            "generation", "static_decode", "chat_format", "backbone", "contexts/", "configs/",
        ],
        0,
    ),
    **dict.fromkeys(["model/", "callbacks"], 1),
    "engines/": 2,
    **dict.fromkeys(["bootstrap/", "data/", "eval/", "analysis/"], 3),
    **dict.fromkeys(
        ["lightning_cli", "cli", "__main__", "chat", "serve/", "reproduce/", "asset_cli", "testing",
         "__init__"],
        4,
    ),
}  # fmt: skip


def _unit(name: str) -> str:
    """A module's unit: its top-level package ("eval/") or its top-level module ("backbone")."""
    parts = name.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1] + "/" if (PACKAGE / parts[1]).is_dir() else parts[1]


def _runtime_imports(tree: ast.AST):
    """Every import node outside ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        source = _unit(module)
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.level:  # relative: resolve against this package
                names = [".".join(module.split(".")[: -node.level] + ([node.module] if node.module else []))]
            for name in names:
                if name.startswith("prism_lightning.") and _unit(name) != source:
                    edges[source].add(_unit(name))
    return edges


def test_every_unit_has_a_layer():
    units = {_unit(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"))
             for p in PACKAGE.rglob("*.py")}  # fmt: skip
    assert not sorted(units - set(LAYERS)), "place the new module in LAYERS (and docs/design.md)"


def test_no_module_imports_a_layer_above_its_own():
    upward = sorted(
        f"{src} (layer {LAYERS[src]}) imports {dst} (layer {LAYERS[dst]})"
        for src, dsts in _graph().items()
        for dst in dsts
        if LAYERS[dst] > LAYERS[src]
    )
    assert not upward, upward


def test_no_import_circles_between_modules_and_packages():
    edges = _graph()
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(edges.get(node, ())):
            if nxt == path[0]:
                cycles.append(" -> ".join([*path, nxt]))
            elif nxt not in path and nxt > path[0]:  # each cycle once, from its smallest unit
                visit(nxt, [*path, nxt])

    for start in sorted(edges):
        visit(start, [start])
    assert not cycles, cycles
