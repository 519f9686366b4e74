"""A griffe extension for the API reference: a folder of modules without an ``__init__.py`` inside the
package (``prism_lightning/model/``) imports fine in Python, but griffe skips it as "not importable".
This gives each such folder an empty module object before griffe loads the submodules, so
``prism_lightning.model.export`` and the names re-exported from it resolve. Once the folder has an
``__init__.py`` the extension finds nothing to add."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import griffe


class NamespaceDirs(griffe.Extension):
    def on_module_members(
        self, *, node: ast.AST | griffe.ObjectNode, mod: griffe.Module, **kwargs: Any
    ) -> None:
        if not mod.is_package or isinstance(mod.filepath, list):
            return
        for folder in sorted(Path(mod.filepath).parent.iterdir()):
            if (
                folder.is_dir()
                and folder.name.isidentifier()
                and folder.name not in mod.members
                and not (folder / "__init__.py").exists()
                and any(folder.glob("*.py"))
            ):
                mod.set_member(folder.name, griffe.Module(folder.name, filepath=[folder]))
