"""Command-line flags generated from a settings dataclass, so each option is declared once: its field
holds the type and the default, the attribute docstring under it is the ``--help`` text, and the field's
``metadata`` (see :func:`flag`) holds what the command line adds (older spellings, choices, comma lists).

A field whose type is itself a dataclass contributes its own fields as flags at the same level, and is
built back as that dataclass: ``evaluate``'s settings hold the scoring settings (``EvalSettings``) whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "HelpFormatter",
    "add_dataclass_arguments",
    "csv_list",
    "declared_options",
    "flag",
    "nested",
    "parse_settings",
    "settings_from_namespace",
]

T = TypeVar("T")
_Container = argparse._ActionsContainer  # a parser or one of its argument groups


def csv_list(text: str) -> list[str]:
    """A comma list from the command line, blanks dropped."""
    return [t.strip() for t in text.split(",") if t.strip()]


def flag(
    default: Any = dataclasses.MISSING,
    *,
    name: str | None = None,
    aliases: Sequence[str] = (),
    choices: Sequence[str] | None = None,
    csv: bool = False,
    metavar: str | None = None,
    append: bool = False,
    many: bool = False,
    convert: Callable[[Any], Any] | None = None,
    keys: Sequence[str] = (),
    positional: bool = False,
    cli: bool = True,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field with its command-line spelling. ``name``: the flag when it differs from the
    field; ``aliases``: older spellings still accepted (not shown by ``--help``); ``csv``: a tuple given
    as one comma list; ``append``: a list given by repeating the flag; ``many``: a list given as the
    flag's values (``--flag A B``); ``convert``: applied to the parsed text when the settings are built
    (its PrismError is the one ``error:`` line); ``keys``: a dict field given as one ``--<key>_file``
    flag per key; ``positional``: an argument without a flag (optional when it has a default);
    ``cli=False``: no flag (set from Python only)."""
    meta = {
        "name": name, "aliases": tuple(aliases), "choices": choices, "csv": csv, "metavar": metavar,
        "append": append, "many": many, "convert": convert, "keys": tuple(keys), "positional": positional,
        "cli": cli,
    }  # fmt: skip
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of ``cls`` and its bases, by field name."""
    import docstring_parser

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        if dataclasses.is_dataclass(klass):
            docs.update(
                {p.arg_name: p.description or "" for p in docstring_parser.parse_from_object(klass).params}
            )
    return docs


def _base_type(hint: Any) -> Any:
    """``int`` of ``int | None``, ``str`` of ``tuple[str, ...]`` and the like."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else str
    if typing.get_origin(hint) in (tuple, list):
        return _base_type(typing.get_args(hint)[0])
    return hint


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def nested(cls: type, group: tuple[str, str] | None = None) -> Any:
    """A field holding a nested settings dataclass (its fields are flags at the same level); ``group``
    (title, description) lists them under their own heading in ``--help``."""
    return dataclasses.field(default_factory=cls, metadata={"group": group})


def _fields(cls: type) -> Iterator[tuple[dataclasses.Field, Any, str]]:
    """(field, resolved type, docstring) of every field, nested dataclasses expanded in place."""
    hints, docs = typing.get_type_hints(cls), _docs(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _fields(hints[f.name])
        else:
            yield f, hints[f.name], docs.get(f.name, "")


def declared_options(cls: type) -> dict[str, Any]:
    """``{"--flag": default}`` of every option ``cls`` declares (a required one: ``MISSING``): what a
    command's documented options table is checked against."""
    out: dict[str, Any] = {}
    for f, _, _ in _fields(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        if meta.get("keys"):
            out.update({f"--{k}_file": None for k in meta["keys"]})
        elif meta.get("positional"):
            out[f.name] = _default(f)
        else:
            out[f"--{meta.get('name') or f.name}"] = _default(f)
    return out


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` lists each option under its underscore name only, not its older aliases."""

    hidden: typing.ClassVar[set[str]] = set()

    def _format_action_invocation(self, action: argparse.Action) -> str:
        shown = [s for s in action.option_strings if s not in self.hidden]
        if not shown or shown == action.option_strings:
            return super()._format_action_invocation(action)
        if action.nargs == 0:
            return ", ".join(shown)
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return ", ".join(f"{s} {metavar}" for s in shown)


def _add(ap: _Container, name: str, aliases: Sequence[str], **kwargs: Any) -> None:
    """``--name`` (underscores, the project's spelling) plus, hidden from ``--help``, its dashed spelling
    and any older names, so existing scripts keep working."""
    dashed = f"--{name.replace('_', '-')}"
    old = ([dashed] if dashed != f"--{name}" else []) + list(aliases)
    HelpFormatter.hidden.update(old)
    ap.add_argument(f"--{name}", *old, **kwargs)


def add_dataclass_arguments(ap: _Container, cls: type) -> None:
    """One flag per field of ``cls`` (see :func:`flag`), help from its attribute docstring; a nested
    dataclass's flags join them, under their own ``--help`` heading when the field has a ``group``."""
    hints, docs = typing.get_type_hints(cls), _docs(cls)
    for f in dataclasses.fields(cls):
        meta, hint, doc = f.metadata, hints[f.name], docs.get(f.name, "")
        if dataclasses.is_dataclass(hint):
            group = meta.get("group")
            add_dataclass_arguments(ap.add_argument_group(*group) if group else ap, hint)
            continue
        if not meta.get("cli", True):
            continue
        help_text = doc.replace("%", "%%") or None
        name = meta.get("name") or f.name
        aliases = meta.get("aliases", ())
        if meta.get("keys"):
            for key in meta["keys"]:
                text = help_text.replace("{key}", key) if help_text else None
                _add(ap, f"{key}_file", (), dest=f"{f.name}.{key}", metavar="FILE", default=None, help=text)
            continue
        default = _default(f)
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = ",".join(default) if meta.get("csv") and default is not None else default
        base = _base_type(hint)
        if base is bool:
            kwargs["action"] = "store_true"
        else:
            if meta.get("append"):
                kwargs["action"] = "append"
                kwargs["default"] = None if default is None else list(default)
            if meta.get("many"):
                kwargs["nargs"] = "+"
            if base in (int, float, Path) and not meta.get("convert"):
                kwargs["type"] = base
            if meta.get("choices") is not None:
                kwargs["choices"] = list(meta["choices"])
            elif not meta.get("metavar") and not meta.get("positional"):
                kwargs["metavar"] = name.upper()
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
        if meta.get("positional"):
            del kwargs["dest"]
            if not kwargs.pop("required", False):
                kwargs["nargs"] = "?"
            ap.add_argument(f.name, **kwargs)
        else:
            _add(ap, name, aliases, **kwargs)


def settings_from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    """The ``cls`` instance of parsed flags (its ``__post_init__`` checks run; nested dataclasses built)."""
    values = vars(ns)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = settings_from_namespace(hints[f.name], ns)
        elif not meta.get("cli", True):
            continue
        elif meta.get("keys"):
            given = {k: values.get(f"{f.name}.{k}") for k in meta["keys"]}
            kwargs[f.name] = {k: v for k, v in given.items() if v}
        else:
            value = values[f.name]
            if meta.get("csv") and isinstance(value, str):
                value = tuple(csv_list(value))
            if meta.get("convert"):
                value = meta["convert"](value)
            kwargs[f.name] = value
    return cls(**kwargs)


class _RaisingParser(argparse.ArgumentParser):
    """A parser whose bad input is a ConfigError (one ``error:`` line from the command that called it)."""

    def error(self, message: str) -> typing.NoReturn:
        from prism_lightning.errors import ConfigError

        raise ConfigError(f"{self.prog}: {message}.")


def parse_settings(cls: type[T], args: Sequence[str], what: str, **given: Any) -> T:
    """``cls`` of flags written down elsewhere (a reproduction preset's ``evaluate:`` list), with
    ``given`` fields (by name, nested ones included) as their defaults; a bad flag is a ConfigError that
    starts with ``what``."""
    ap = _RaisingParser(prog=what, add_help=False)
    add_dataclass_arguments(ap, cls)
    for action in ap._actions:
        if action.dest in given:
            action.default, action.required = given[action.dest], False
    return settings_from_namespace(cls, ap.parse_args(list(args)))
