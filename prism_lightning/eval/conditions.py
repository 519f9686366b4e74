"""The evaluation conditions of the paper's table, as prompt + routing recipes.

========================  ===================================================  ==============
condition                 prompt                                               adapter
========================  ===================================================  ==============
``base``                  no persona                                           off
``persona``               the matched persona (category persona for MT-Bench,  off
                          ``safety_monitor`` for safety, the domain's expert
                          for MMLU: ``MMLU_DOMAIN_PERSONAS``)
``random_persona``        a seeded, different built-in persona per item        off
``lora``                  no persona                                           always on
``prism``                 no persona                                           gate decides
``prism_k``               no persona                                           the (K+1)-way gate picks none
                                                                               or one of K adapters (a K-way
                                                                               checkpoint, ``model.adapters``)
========================  ===================================================  ==============

"off" with a checkpoint loaded means the untouched base model (adapter layers skipped), so
``base``/``persona``/``random_persona`` give the same results with or without ``--checkpoint``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from prism_lightning.chat_format import PLACEMENTS
from prism_lightning.contexts import LENGTHS, ContextLibrary, for_category
from prism_lightning.eval.settings import EvalInputError
from prism_lightning.generation import row_seed

__all__ = ["CONDITIONS", "Condition", "matched_persona"]

CONDITIONS: tuple[str, ...] = ("base", "persona", "random_persona", "lora", "prism")
_MODES = {"base": "off", "persona": "off", "random_persona": "off", "lora": "on", "prism": "gated"}
#: conditions that need a K-way checkpoint; not in the default set (a single-adapter run has no K-way gate)
KWAY_CONDITIONS: tuple[str, ...] = ("prism_k",)
_MODES["prism_k"] = "gated_k"

#: benchmark -> persona used by the ``persona`` condition (MT-Bench: the category's own persona; MMLU:
#: the expert of the question's domain, :data:`~prism_lightning.eval.benchmarks.MMLU_DOMAIN_PERSONAS`).
DEFAULT_PERSONAS = {"safety": "safety_monitor"}


def matched_persona(library: ContextLibrary, benchmark: str, category: str) -> str:
    """The name of the persona the ``persona`` condition uses for a benchmark category."""
    if benchmark == "mtbench":
        return for_category(library, category).name
    if benchmark == "mmlu":
        from prism_lightning.eval.benchmarks import MMLU_DOMAIN_PERSONAS

        return MMLU_DOMAIN_PERSONAS[category]
    return DEFAULT_PERSONAS[benchmark]


@dataclass(frozen=True)
class Condition:
    name: str
    persona_length: str = "short"
    placement: str = "system"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in CONDITIONS + KWAY_CONDITIONS:
            choices = ", ".join(CONDITIONS + KWAY_CONDITIONS)
            raise EvalInputError(f"unknown condition {self.name!r}; choose from {choices}.")
        if self.persona_length not in LENGTHS:
            choices = ", ".join(LENGTHS)
            raise EvalInputError(f"unknown persona length {self.persona_length!r}; choose from {choices}.")
        if self.placement not in PLACEMENTS:
            choices = ", ".join(PLACEMENTS)
            raise EvalInputError(f"unknown placement {self.placement!r}; choose from {choices}.")

    @property
    def mode(self) -> str:
        """Routing mode: "off" (base model), "on" (adapter always on) or "gated"."""
        return _MODES[self.name]

    @property
    def needs_checkpoint(self) -> bool:
        return self.mode != "off"

    def config(self) -> dict:
        """What changes this condition's results (part of every row's cache key)."""
        cfg = {"condition": self.name, "mode": self.mode}
        if self.name in ("persona", "random_persona"):
            cfg.update(persona_length=self.persona_length, placement=self.placement)
        if self.name == "random_persona":
            cfg["seed"] = self.seed
        return cfg

    def persona(self, library: ContextLibrary, benchmark: str, category: str, item_id: str) -> str | None:
        """The persona name for one item, or None."""
        if self.name == "persona":
            return matched_persona(library, benchmark, category)
        if self.name == "random_persona":
            matched = matched_persona(library, benchmark, category)
            others = [n for n in library.names if n != matched]
            rng = random.Random(row_seed(self.seed, f"random_persona:{benchmark}:{item_id}"))
            return rng.choice(others)
        return None

    def context(
        self, library: ContextLibrary, benchmark: str, category: str, item_id: str
    ) -> tuple[str | None, str | None]:
        """(persona name, persona text at this condition's length) for one item; (None, None)."""
        name = self.persona(library, benchmark, category, item_id)
        if name is None:
            return None, None
        return name, library.get(name).text(self.persona_length)
