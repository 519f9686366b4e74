"""Tests for the context (persona) registry: built-in content, user files, selection, errors."""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path

import pytest

from prism_lightning.contexts import (
    BEHAVIOURAL_PERSONAS,
    LENGTHS,
    MTBENCH_CATEGORIES,
    WORD_BOUNDS,
    Context,
    ContextFileError,
    ContextLibrary,
    UnknownContextError,
    for_category,
    load_context_file,
)

BUILTIN = ContextLibrary.builtin()


def _write(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


# ---------------------------------------------------------------- built-in personas


def test_builtin_has_exactly_the_twelve_personas_in_order() -> None:
    assert BUILTIN.names == [*MTBENCH_CATEGORIES, *BEHAVIOURAL_PERSONAS]
    assert len(BUILTIN) == 12


@pytest.mark.parametrize(
    ("name", "length"), list(itertools.product([*MTBENCH_CATEGORIES, *BEHAVIOURAL_PERSONAS], LENGTHS))
)
def test_builtin_text_within_word_bounds(name: str, length: str) -> None:
    text = BUILTIN.get(name).text(length)
    low, high = WORD_BOUNDS[length]
    assert low <= len(text.split()) <= high, f"{name}/{length}: {len(text.split())} words"
    assert text == text.strip()


def test_builtin_lengths_grow() -> None:
    for context in BUILTIN:
        counts = [len(context.text(length).split()) for length in LENGTHS]
        assert counts == sorted(counts) and len(set(counts)) == 3, context.name


def test_builtin_categories() -> None:
    for name in MTBENCH_CATEGORIES:
        assert BUILTIN.get(name).category == name
        assert for_category(BUILTIN, name).name == name
    for name in BEHAVIOURAL_PERSONAS:
        assert BUILTIN.get(name).category is None


def test_builtin_metadata_and_second_person() -> None:
    for context in BUILTIN:
        assert context.source == "builtin"
        assert context.description and context.expertise
        assert context.description != context.name
        assert context.text("short").startswith("You ")
        assert context.text("long").startswith("You ")


@pytest.mark.parametrize("length", LENGTHS)
def test_builtin_texts_distinct_across_personas(length: str) -> None:
    texts = [context.text(length) for context in BUILTIN]
    assert all(texts)
    assert len(set(texts)) == len(texts)


def test_builtin_is_parsed_once() -> None:
    again = ContextLibrary.builtin()
    assert again.get("math") is BUILTIN.get("math")


# ---------------------------------------------------------------- Context


def test_context_text_default_and_unknown_length() -> None:
    math = BUILTIN.get("math")
    assert math.text() == math.text("short")
    with pytest.raises(ValueError, match="min, short, long"):
        math.text("medium")


def test_context_requires_all_lengths() -> None:
    with pytest.raises(ValueError, match="long"):
        Context(name="x", texts={"min": "a", "short": "b"}, description="d", expertise="e")


def test_context_is_frozen_and_copies_texts() -> None:
    texts = dict.fromkeys(LENGTHS, "hello")
    context = Context(name="x", texts=texts, description="d", expertise="e")
    texts["min"] = "changed"
    assert context.text("min") == "hello"
    with pytest.raises(AttributeError):
        context.name = "y"  # type: ignore[misc]
    assert hash(context) == hash(Context(name="x", texts=texts, description="d", expertise="e"))


# ---------------------------------------------------------------- user files


def test_user_yaml_adds_and_overrides(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "mine.yaml",
        """
math:
  description: "a tutor"
  expertise: "algebra"
  category: math
  min: "You are a tutor."
  short: "You are a patient tutor."
  long: "You are a very patient algebra tutor."
pirate:
  min: "You are a pirate."
  short: "You are a pirate captain."
  long: "You are a seasoned pirate captain."
""",
    )
    library = ContextLibrary.from_config(files=[path])
    assert library.names == [*BUILTIN.names, "pirate"]  # override keeps its position
    assert library.get("math").text("min") == "You are a tutor."
    assert library.get("math").source == str(path)
    pirate = library.get("pirate")
    assert pirate.description == "an expert in pirate"
    assert pirate.expertise == pirate.description
    assert pirate.category is None
    # The builtin library is not affected by the override.
    assert ContextLibrary.builtin().get("math").text("min") == "You are a mathematician."


def test_later_files_override_earlier_and_inline_overrides_files(tmp_path: Path) -> None:
    first = _write(tmp_path, "a.yml", "pirate:\n  text: first\n")
    second = _write(tmp_path, "b.yaml", "pirate:\n  text: second\n")
    library = ContextLibrary.from_config(files=[first, second])
    assert library.get("pirate").text("long") == "second"
    library = ContextLibrary.from_config(files=[first], inline={"pirate": {"text": "inline"}})
    assert library.get("pirate").text("min") == "inline"
    assert library.get("pirate").source == "inline"


def test_single_text_entry_used_for_all_lengths(tmp_path: Path) -> None:
    path = _write(tmp_path, "one.yaml", "lawyer:\n  description: a lawyer\n  text: '  You are a lawyer.  '\n")
    lawyer = load_context_file(path)["lawyer"]
    assert {lawyer.text(length) for length in LENGTHS} == {"You are a lawyer."}
    assert lawyer.description == lawyer.expertise == "a lawyer"


def test_text_fills_only_missing_lengths(tmp_path: Path) -> None:
    path = _write(tmp_path, "mix.yaml", "x:\n  text: general\n  min: tiny\n")
    x = load_context_file(path)["x"]
    assert (x.text("min"), x.text("short"), x.text("long")) == ("tiny", "general", "general")


def test_txt_file_becomes_context(tmp_path: Path) -> None:
    path = _write(tmp_path, "Tool Registry-v2.txt", "\n  tools: search(query), calc(expr)\n\n")
    contexts = load_context_file(path)
    assert list(contexts) == ["tool_registry_v2"]
    context = contexts["tool_registry_v2"]
    assert {context.text(length) for length in LENGTHS} == {"tools: search(query), calc(expr)"}
    assert context.source == str(path)
    library = ContextLibrary.from_config(files=[str(path)])
    assert "tool_registry_v2" in library


def test_md_file_becomes_context(tmp_path: Path) -> None:
    path = _write(tmp_path, "retrieval.md", "# Docs\n\nSome retrieved passage.\n")
    assert load_context_file(path)["retrieval"].text("long") == "# Docs\n\nSome retrieved passage."


# ---------------------------------------------------------------- errors


def test_unknown_name_suggests_close_match() -> None:
    with pytest.raises(UnknownContextError) as info:
        BUILTIN.get("mathh")
    message = str(info.value)
    assert "'mathh'" in message
    assert "Did you mean 'math'" in message
    assert "coding" in message  # lists the available names
    assert "--data.bootstrap.context_files" in message and "--context_file" in message  # how to add one
    assert isinstance(info.value, KeyError)


def test_unknown_category() -> None:
    with pytest.raises(UnknownContextError, match="persona category 'cooking'"):
        for_category(BUILTIN, "cooking")


@pytest.mark.parametrize("selection", [[], "", " , "])
def test_empty_selection(selection: list[str] | str) -> None:
    with pytest.raises(ValueError, match="no personas selected"):
        BUILTIN.select(selection)


def test_missing_file() -> None:
    with pytest.raises(ContextFileError, match="file not found"):
        load_context_file("/nonexistent/personas.yaml")


def test_empty_txt_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "blank.txt", "  \n\n")
    with pytest.raises(ContextFileError, match="empty") as info:
        load_context_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "empty"),
        ("a: [unclosed\n", "invalid YAML"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("x: 3\n", "must be a mapping"),
        ("x:\n  text: hi\n  shrot: oops\n", "unknown key"),
        ("x:\n  text: ''\n", "non-empty string"),
        ("all:\n  text: hi\n", "reserved"),
        ("'a b':\n  text: hi\n", "context name"),
    ],
)
def test_bad_yaml_file(tmp_path: Path, content: str, expected: str) -> None:
    path = _write(tmp_path, "bad.yaml", content)
    with pytest.raises(ContextFileError, match=expected) as info:
        load_context_file(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_lengths_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "partial.yaml", "pirate:\n  min: You are a pirate.\n")
    with pytest.raises(ContextFileError, match="'pirate' is missing length") as info:
        load_context_file(path)
    assert "short, long" in str(info.value)


def test_errors_pickle() -> None:
    for error in (UnknownContextError("x", ["a"]), ContextFileError("f.yaml", "bad")):
        clone = pickle.loads(pickle.dumps(error))
        assert type(clone) is type(error) and str(clone) == str(error)


def test_bad_inline_entry() -> None:
    with pytest.raises(ContextFileError, match="contexts.inline"):
        ContextLibrary.from_config(inline={"pirate": {"min": "arr"}})


# ---------------------------------------------------------------- selection


def test_select_comma_separated_string() -> None:
    assert [c.name for c in BUILTIN.select("math,coding")] == ["math", "coding"]
    assert [c.name for c in BUILTIN.select(" math , coding ")] == ["math", "coding"]


def test_select_all_and_none() -> None:
    assert [c.name for c in BUILTIN.select(None)] == BUILTIN.names
    assert [c.name for c in BUILTIN.select("all")] == BUILTIN.names


def test_select_list_dedupes_keeping_order() -> None:
    chosen = BUILTIN.select(["critic", "math", "critic", "math,stem"])
    assert [c.name for c in chosen] == ["critic", "math", "stem"]


def test_select_unknown() -> None:
    with pytest.raises(UnknownContextError, match="'codin'.*Did you mean 'coding'"):
        BUILTIN.select(["math", "codin"])


def test_library_protocols() -> None:
    assert "math" in BUILTIN and "nope" not in BUILTIN
    assert [c.name for c in BUILTIN] == BUILTIN.names
    with pytest.raises(ValueError, match="does not match"):
        ContextLibrary({"a": BUILTIN.get("math")})
