"""The one registry of contexts (personas) that PRISM distils into its gated adapter.

A *context* is any text that can be put in front of a query: an expert persona, a retrieval block,
a tool registry, a user profile. Every pipeline stage (query generation, answering, teacher logits,
evaluation) looks contexts up here, so there is exactly one place that defines them.

The twelve built-in personas live in ``personas.yaml`` next to this file (one per MT-Bench category
plus four behavioural ones), each in three lengths because persona length changes its effect.
Users add or override contexts with their own files (config ``contexts.files``) or inline entries
(config ``contexts.inline``); see :meth:`ContextLibrary.from_config`.

A context's ``kind`` says how the bootstrap writes queries for it: a ``persona`` is described by its
``description``/``expertise``, while a ``reference`` (a fact sheet, a tool registry, a style guide) is
shown to the query writer in full, so the queries ask about what it contains. Example reference
contexts ship in ``examples/`` (see :func:`example_path`).
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from prism_lightning.errors import PrismError

__all__ = [
    "BEHAVIOURAL_PERSONAS",
    "EXAMPLES",
    "KINDS",
    "LENGTHS",
    "MTBENCH_CATEGORIES",
    "WORD_BOUNDS",
    "Context",
    "ContextFileError",
    "ContextLibrary",
    "UnknownContextError",
    "example_path",
    "for_category",
    "load_context_file",
]

#: Persona lengths studied in the paper (min ~5 words, short ~50, long ~150).
LENGTHS: tuple[str, ...] = ("min", "short", "long")
#: The eight MT-Bench categories; each has a matching built-in persona of the same name.
MTBENCH_CATEGORIES: tuple[str, ...] = (
    "writing",
    "roleplay",
    "reasoning",
    "math",
    "coding",
    "extraction",
    "stem",
    "humanities",
)
#: Built-in personas that describe a behaviour rather than a domain (no MT-Bench category).
BEHAVIOURAL_PERSONAS: tuple[str, ...] = ("safety_monitor", "critic", "helpful", "compliant")
#: Context kinds: a persona (who answers) or a reference text (what the answer must draw on).
KINDS: tuple[str, ...] = ("persona", "reference")
#: The example reference contexts shipped in ``examples/`` (file stem = context name).
EXAMPLES: tuple[str, ...] = ("fact_sheet", "tool_registry", "style_guide")
#: Word-count bounds (``str.split``) per length; enforced by tests for the built-ins only, so user
#: contexts (e.g. a long retrieval block) are free to be any length.
WORD_BOUNDS: dict[str, tuple[int, int]] = {"min": (3, 10), "short": (35, 70), "long": (120, 190)}

_BUILTIN_RESOURCE = "personas.yaml"
_YAML_SUFFIXES = (".yaml", ".yml")
_ENTRY_KEYS = frozenset({"description", "expertise", "category", "kind", "text", "example_queries", *LENGTHS})
# "all" is reserved because ContextLibrary.select("all") means every context.
_RESERVED_NAMES = frozenset({"all"})
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_HOW_TO_ADD = (
    "To add one, give a .yaml/.txt/.md file: --data.bootstrap.context_files for fit/bootstrap, "
    "--context_file for chat."
)


class UnknownContextError(PrismError, KeyError):
    """A context name that is not in the library; the message lists what is available."""

    def __init__(self, name: str, available: Sequence[str], what: str = "context") -> None:
        self.name = name
        self.available = list(available)
        self.what = what
        close = difflib.get_close_matches(name, self.available, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        self.message = (
            f"unknown {what} {name!r}.{hint} Available: {', '.join(self.available) or '(none)'}. "
            f"{_HOW_TO_ADD}"
        )
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would repr() the message, quoting it
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across worker processes
        return (type(self), (self.name, self.available, self.what))


class ContextFileError(PrismError, ValueError):
    """A user context file (or inline entry) that cannot be used; says where and what is wrong."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across worker processes
        return (type(self), (self.path, self.problem))


@dataclass(frozen=True)
class Context:
    """One named context with its text at every length in :data:`LENGTHS`.

    ``description`` is a noun phrase ("a professional mathematician") and ``expertise`` a short
    phrase of what it is good at; both feed the query-generation prompts. ``category`` links a
    persona to an MT-Bench category for evaluation. ``source`` records where it was defined, so
    an override is traceable. ``kind`` is one of :data:`KINDS` (see the module docstring).
    ``example_queries`` are a few questions its users send, written by the user; the query writer
    continues a list of them when ``bootstrap.query_prompt`` is ``examples`` (small models follow a
    list far better than an instruction).
    """

    name: str
    texts: dict[str, str] = field(hash=False)
    description: str
    expertise: str
    category: str | None = None
    source: str = "builtin"
    kind: str = "persona"
    example_queries: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"context {self.name!r} has unknown kind {self.kind!r}; expected one of {KINDS}")
        missing = [length for length in LENGTHS if not str(self.texts.get(length, "")).strip()]
        if missing:
            raise ValueError(f"context {self.name!r} has no text for length(s): {', '.join(missing)}")
        # Own copy, so mutating the caller's dict cannot change a frozen context.
        object.__setattr__(self, "texts", {length: self.texts[length] for length in LENGTHS})

    def text(self, length: str = "short") -> str:
        """The context text at ``length``; ValueError names the valid lengths."""
        if length not in self.texts:
            raise ValueError(f"unknown context length {length!r}; expected one of {', '.join(LENGTHS)}")
        return self.texts[length]


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ContextFileError(
            where,
            f"context name {name!r} must be a string of letters, digits, '_', '-' or '.' "
            "(no spaces or commas, since names are given as comma-separated lists)",
        )
    if name.lower() in _RESERVED_NAMES:
        raise ContextFileError(where, f"context name {name!r} is reserved (it selects every context)")
    return name


def _optional_str(entry: Mapping[str, Any], key: str, name: str, where: str) -> str | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ContextFileError(where, f"entry {name!r}: {key!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _parse_entry(name: Any, entry: Any, where: str, source: str) -> Context:
    """Build a Context from one YAML-style entry; a bare string is shorthand for ``{text: ...}``."""
    name = _check_name(name, where)
    if isinstance(entry, str):
        entry = {"text": entry}
    if not isinstance(entry, Mapping):
        raise ContextFileError(
            where, f"entry {name!r} must be a mapping (description, expertise, min/short/long or text)"
        )
    unknown = sorted(str(k) for k in entry if k not in _ENTRY_KEYS)
    if unknown:  # most likely a typo such as `shrot:`; silently ignoring it would drop a text
        raise ContextFileError(
            where, f"entry {name!r} has unknown key(s) {unknown}; allowed: {sorted(_ENTRY_KEYS)}"
        )
    common = _optional_str(entry, "text", name, where)
    texts: dict[str, str] = {}
    for length in LENGTHS:
        value = _optional_str(entry, length, name, where)
        if value is None:
            value = common  # `text:` fills every length not given explicitly
        if value is not None:
            texts[length] = value
    missing = [length for length in LENGTHS if length not in texts]
    if missing:
        raise ContextFileError(
            where,
            f"entry {name!r} is missing length(s) {', '.join(missing)}; "
            f"give all of {', '.join(LENGTHS)} or a single `text:` used for every length",
        )
    kind = _optional_str(entry, "kind", name, where) or "persona"
    if kind not in KINDS:
        raise ContextFileError(where, f"entry {name!r}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    default_description = f"an expert in {name}" if kind == "persona" else f"the reference text {name!r}"
    description = _optional_str(entry, "description", name, where) or default_description
    expertise = _optional_str(entry, "expertise", name, where) or description
    category = _optional_str(entry, "category", name, where)
    examples = entry.get("example_queries") or []
    if not isinstance(examples, list) or not all(isinstance(q, str) and q.strip() for q in examples):
        raise ContextFileError(where, f"entry {name!r}: example_queries must be a list of non-empty strings")
    return Context(
        name=name,
        texts=texts,
        description=description,
        expertise=expertise,
        category=category,
        source=source,
        kind=kind,
        example_queries=tuple(q.strip() for q in examples),
    )


def _parse_yaml_text(raw: str, where: str, source: str) -> dict[str, Context]:
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ContextFileError(where, f"invalid YAML: {exc}") from exc
    if data is None:
        raise ContextFileError(where, "file defines no contexts (it is empty)")
    if not isinstance(data, Mapping):
        raise ContextFileError(
            where, f"top level must be a mapping of context name -> entry, got {type(data).__name__}"
        )
    if not data:
        raise ContextFileError(where, "file defines no contexts (empty mapping)")
    return {str(name): _parse_entry(name, entry, where, source) for name, entry in data.items()}


def _name_from_stem(stem: str) -> str:
    return re.sub(r"[\s\-]+", "_", stem.strip().lower())


def load_context_file(path: str | Path) -> dict[str, Context]:
    """Load user contexts from ``path`` so that any text, not just a persona, can be distilled.

    ``.yaml``/``.yml``: a mapping ``name -> entry`` with the schema of ``personas.yaml``; an entry
    may give one ``text:`` for all lengths. Any other extension (``.txt``, ``.md``, ...): one
    ``reference`` context named after the file stem (lowercased, spaces/dashes -> ``_``) whose whole
    stripped content is used at every length (a persona in a plain file is better written as YAML, with
    its description). A relative path that does not exist from the working directory is looked up in
    this package's contexts folder, so ``examples/fact_sheet.yaml`` names a shipped example from
    anywhere. Raises :class:`ContextFileError` on any problem.
    """
    path = Path(path).expanduser()
    if not path.exists() and not path.is_absolute():
        shipped = Path(str(resources.files(__name__))) / path
        path = shipped if shipped.is_file() else path
    if not path.exists():
        raise ContextFileError(path, "file not found")
    if not path.is_file():
        raise ContextFileError(path, "not a regular file")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ContextFileError(path, f"cannot read as UTF-8 text: {exc}") from exc
    if "\x00" in raw:  # valid UTF-8 can still be a binary file; no prompt holds NUL characters
        raise ContextFileError(path, "holds NUL bytes: not a text file")
    if path.suffix.lower() in _YAML_SUFFIXES:
        return _parse_yaml_text(raw, str(path), source=str(path))
    text = raw.strip()
    if not text:
        raise ContextFileError(path, "file is empty")
    name = _check_name(_name_from_stem(path.stem), str(path))
    context = Context(
        name=name,
        texts=dict.fromkeys(LENGTHS, text),
        description=f"the reference text {name!r}",
        expertise=f"the reference text {name!r}",
        source=str(path),
        kind="reference",
    )
    return {name: context}


def example_path(name: str) -> Path:
    """The shipped example file ``examples/<name>.yaml`` (one of :data:`EXAMPLES`, or a companion file
    such as ``fact_sheet_questions``) as an absolute path; ``bootstrap.context_files`` may also name it
    as ``examples/<name>.yaml``."""
    path = Path(str(resources.files(__name__).joinpath("examples", f"{name}.yaml")))
    if not path.is_file():
        raise UnknownContextError(name, list(EXAMPLES), what="example context")
    return path


@functools.lru_cache(maxsize=1)
def _builtin_contexts() -> dict[str, Context]:
    resource = resources.files(__name__).joinpath(_BUILTIN_RESOURCE)
    return _parse_yaml_text(resource.read_text(encoding="utf-8"), _BUILTIN_RESOURCE, source="builtin")


# --------------------------------------------------------------------------------------------
# Library
# --------------------------------------------------------------------------------------------


class ContextLibrary:
    """An ordered, read-only set of contexts that every stage resolves names against."""

    def __init__(self, contexts: Mapping[str, Context]) -> None:
        for key, context in contexts.items():
            if key != context.name:
                raise ValueError(f"library key {key!r} does not match context name {context.name!r}")
        self._contexts: dict[str, Context] = dict(contexts)

    @classmethod
    def builtin(cls) -> ContextLibrary:
        """The twelve shipped personas (parsed once per process)."""
        return cls(_builtin_contexts())

    @classmethod
    def from_config(
        cls,
        files: Sequence[str | Path] = (),
        inline: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> ContextLibrary:
        """Built-ins, then each file in order, then inline entries; later definitions win.

        An override keeps the overridden context's position, so built-in order stays stable;
        new names are appended.
        """
        if isinstance(files, (str, Path)):  # a single path is an easy config mistake to forgive
            files = [files]
        contexts = dict(_builtin_contexts())
        for path in files:
            contexts.update(load_context_file(path))
        if inline:
            if not isinstance(inline, Mapping):
                raise ContextFileError("contexts.inline", "must be a mapping of context name -> entry")
            for name, entry in inline.items():
                contexts[str(name)] = _parse_entry(name, entry, "contexts.inline", source="inline")
        return cls(contexts)

    @property
    def names(self) -> list[str]:
        """Context names in library order."""
        return list(self._contexts)

    def get(self, name: str) -> Context:
        """The context called ``name``; :class:`UnknownContextError` suggests close matches."""
        try:
            return self._contexts[name]
        except KeyError:
            raise UnknownContextError(name, self.names) from None

    def select(self, names: Sequence[str] | str | None) -> list[Context]:
        """Resolve a user selection (config list or CLI string) into contexts.

        ``None`` or ``"all"`` -> every context; strings are split on commas (also inside a list);
        duplicates are dropped keeping the first occurrence. An empty selection is a ValueError,
        an unknown name an :class:`UnknownContextError`.
        """
        if names is None:
            tokens = ["all"]
        else:
            items = [names] if isinstance(names, str) else list(names)
            tokens = [tok.strip() for item in items for tok in str(item).split(",") if tok.strip()]
        selected: dict[str, Context] = {}
        for token in tokens:
            if token.lower() == "all":
                for name, context in self._contexts.items():
                    selected.setdefault(name, context)
            else:
                selected.setdefault(token, self.get(token))
        if not selected:
            raise ValueError(
                f"no personas selected (got {names!r}); give names from: {', '.join(self.names)}, or 'all'"
            )
        return list(selected.values())

    def __contains__(self, name: object) -> bool:
        return name in self._contexts

    def __len__(self) -> int:
        return len(self._contexts)

    def __iter__(self) -> Iterator[Context]:
        return iter(self._contexts.values())

    def __repr__(self) -> str:
        return f"ContextLibrary({self.names})"


def for_category(library: ContextLibrary, category: str) -> Context:
    """The persona matched to an MT-Bench ``category`` (evaluation's "expert prompting" arm).

    A context named exactly like the category wins; otherwise the first context (library order)
    whose ``category`` matches. :class:`UnknownContextError` if none does.
    """
    wanted = category.strip().lower()
    matches = [c for c in library if c.category is not None and c.category.lower() == wanted]
    if not matches:
        available = sorted({c.category for c in library if c.category is not None})
        raise UnknownContextError(category, available, what="persona category")
    exact = [c for c in matches if c.name.lower() == wanted]
    return (exact or matches)[0]
