"""Settings of the bootstrap (stages 1-3 and stage 5's teacher targets); config key ``data.bootstrap``."""

from __future__ import annotations

from dataclasses import dataclass, field

from prism_lightning.backbone import BackboneConfig
from prism_lightning.chat_format import PLACEMENTS
from prism_lightning.contexts import LENGTHS

VERDICT_RULES: tuple[str, ...] = ("logprob", "strict")


@dataclass
class BootstrapConfig:
    """Everything that decides what the bootstrap produces.

    personas: names (list or comma-separated string) or ``"all"``.
    context_files: extra context files (see :func:`prism_lightning.contexts.load_context_file`).
    verdict_rule: ``"logprob"`` (sum of the persona's log-odds over both judge orders > 0; never
        unparsable, cancels position bias) or ``"strict"`` (the paper's rule: the free-text verdict
        prefers the persona in both orders).
    judge: the judging model; ``None`` means the base model.
    query_stop_at_newline: stop a query at its first line break (only the first line is kept
        anyway; saves most of the query-writing time on small models that ramble).
    max_response_tokens: the teacher/student response is truncated to this many tokens.
    batch_size: rows per predict batch (each row may expand to two prompts).
    """

    personas: list[str] | str = "all"
    context_files: list[str] = field(default_factory=list)
    queries_per_persona: int = 4
    persona_length: str = "short"
    placement: str = "system"
    query_temperature: float = 0.9
    query_max_new_tokens: int = 200
    min_query_chars: int = 16
    query_stop_at_newline: bool = True
    answer_temperature: float = 0.7
    answer_max_new_tokens: int = 128
    judge: BackboneConfig | None = None
    judge_max_new_tokens: int = 8
    verdict_rule: str = "logprob"
    teacher_top_k: int = 64
    max_response_tokens: int = 512
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.verdict_rule not in VERDICT_RULES:
            raise ValueError(
                f"Unknown verdict_rule {self.verdict_rule!r}; choose one of {', '.join(VERDICT_RULES)}."
            )
        if self.placement not in PLACEMENTS:
            raise ValueError(f"Unknown placement {self.placement!r}; choose one of {', '.join(PLACEMENTS)}.")
        if self.persona_length not in LENGTHS:
            raise ValueError(
                f"Unknown persona_length {self.persona_length!r}; choose one of {', '.join(LENGTHS)}."
            )
        if isinstance(self.context_files, str):
            self.context_files = [self.context_files]
        positive = (
            "queries_per_persona",
            "query_max_new_tokens",
            "answer_max_new_tokens",
            "judge_max_new_tokens",
            "teacher_top_k",
            "max_response_tokens",
            "batch_size",
        )
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"bootstrap.{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("query_temperature", "answer_temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"bootstrap.{name} must be >= 0, got {getattr(self, name)}.")
        if isinstance(self.judge, dict):  # plain dicts from YAML / kwargs
            self.judge = BackboneConfig(**self.judge)
