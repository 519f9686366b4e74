"""`python -m prism_lightning chat`: one answer, or an interactive conversation, from the base model
with an optional persona in the prompt, or from an exported PRISM checkpoint with routing."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prism_lightning.backbone import DEFAULT_MODEL, BackboneConfig
from prism_lightning.chat_format import PLACEMENTS
from prism_lightning.contexts import LENGTHS, ContextLibrary
from prism_lightning.errors import ConfigError, require
from prism_lightning.settings_args import (
    HelpFormatter,
    add_dataclass_arguments,
    flag,
    settings_from_namespace,
)

if TYPE_CHECKING:
    from prism_lightning.engines.base import RowRoute

__all__ = ["ChatSettings", "build_parser", "chat_command", "chat_main", "check_args", "checkpoint_backbone"]


@dataclass(kw_only=True)
class ChatSettings:
    """``chat``'s options, declared once: the command line is generated from these fields."""

    message: str | None = flag(None, positional=True)
    """the user message; omit for an interactive session"""
    model: str | None = flag(None)
    """HF id, local dir or embedded name (default: the embedded SmolLM2; with --checkpoint, its base)"""
    persona: str | None = flag(None)
    """persona/context name put in the prompt (base model only)"""
    persona_length: str | None = flag(None, choices=LENGTHS)
    """with --persona (default short)"""
    placement: str | None = flag(None, choices=PLACEMENTS)
    """with --persona (default system)"""
    context_file: list[str] = flag(append=True, default_factory=list)
    """extra persona/context file (repeatable) whose contexts --persona can name"""
    checkpoint: str | None = flag(None)
    """exported PRISM run directory: answer with routing"""
    route: str | None = flag(None, choices=("gated", "on", "off"))
    """routing mode with --checkpoint (default gated)"""
    threshold: float | None = flag(None)
    """gate threshold with --route gated (default: the checkpoint's)"""
    merge_weights: bool = flag(False)
    """with --checkpoint: answer adapter-on turns on merged weights (faster, a second weight copy)"""
    max_new_tokens: int = flag(256)
    """the answer's length limit in tokens"""
    temperature: float = flag(0.0)
    """0 = greedy"""
    top_p: float = flag(1.0)
    """nucleus sampling's probability mass (with a temperature above 0)"""
    device: str | None = flag(None)
    """cpu, cuda, cuda:1 ... (default: cuda when available)"""
    dtype: str | None = flag(None)
    """auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 (default: auto, or the checkpoint's)"""
    trust_remote_code: bool = flag(False)
    """let transformers run the model repository's own code"""


def build_parser() -> argparse.ArgumentParser:
    """``chat``'s command line, generated from :class:`ChatSettings`."""
    p = argparse.ArgumentParser(
        prog="python -m prism_lightning chat",
        description="Ask the model one question (MESSAGE given) or chat interactively (no MESSAGE;\n"
        "/reset clears the conversation, /quit or Ctrl-D leaves).",
        formatter_class=HelpFormatter,
    )
    add_dataclass_arguments(p, ChatSettings)
    return p


class _Session:
    """Holds the conversation so follow-up turns see earlier ones."""

    def __init__(self, settings: ChatSettings) -> None:
        from prism_lightning.engines.hf import HFEngine
        from prism_lightning.generation import SamplingConfig

        self.settings = settings
        self.sampling = SamplingConfig(
            max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p
        )
        self.turns: list[str] = []
        self.replies: list[str] = []
        self.route: bool | str | None = None  # K-way: the adapter name
        self.context = None
        if settings.checkpoint:
            from prism_lightning.model.export import load_checkpoint

            routed = load_checkpoint(
                settings.checkpoint,
                device=settings.device,
                backbone_override=checkpoint_backbone(settings),
                merge_weights=settings.merge_weights,
            )
            if settings.threshold is not None:
                routed.threshold = settings.threshold
            self.engine = HFEngine.from_routed(routed)
            self.mode = settings.route or "gated"
            self.seed: int | None = 0  # a routed reply is the same for the same conversation
        else:
            if settings.persona:  # resolved before the model loads, so a typo fails at once
                library = ContextLibrary.from_config(settings.context_file)
                self.context = library.get(settings.persona).text(settings.persona_length or "short")
            backbone = BackboneConfig(
                model=settings.model or DEFAULT_MODEL,
                dtype=settings.dtype or "auto",
                trust_remote_code=settings.trust_remote_code,
            ).load(settings.device)
            self.engine = HFEngine.from_backbone(backbone)
            self.mode = "off"
            self.seed = None

    def ask(self, message: str, write: Callable[[str], object] | None = None) -> str:
        """Answer ``message`` (with the conversation so far); ``write`` gets the answer token by token
        through the engine's streaming path (the deltas add up to the returned reply). With a checkpoint
        the route is the first user turn's (the paper's rule), kept for the whole conversation, unless
        --route forces it."""
        self.turns.append(message)
        fmt = self.engine.formatter
        if self.engine.has_adapter:
            prompt = fmt.prompt(self.turns, replies=self.replies)
            first_turn = fmt.prompt(self.turns[0]) if len(self.turns) > 1 else None
        else:
            prompt = fmt.prompt(self.turns, self.context, self.settings.placement or "system", self.replies)
            first_turn = None
        out = self.engine.stream(
            prompt,
            self.sampling,
            write if write is not None else _discard,
            mode=self.mode,
            seed=self.seed,
            route=self.route,
            first_turn=first_turn,
            on_route=self._heard_route,
        )
        self.replies.append(out.text)
        return out.text

    def _heard_route(self, route: RowRoute) -> None:
        self.route = route.adapter or route.route  # K-way: the first turn's adapter holds, by name
        label = route.adapter or ("adapter" if route.route else "base")
        print(f"[route: {label}  gate p={route.gate_prob:.3f}]", file=sys.stderr, flush=True)

    def reset(self) -> None:
        self.turns, self.replies, self.route = [], [], None


def _discard(text: str) -> None:
    """The writer of a reply nobody watches being written."""


def checkpoint_backbone(settings: ChatSettings) -> BackboneConfig | None:
    """The checkpoint's recorded backbone settings with --model, --dtype and --trust_remote_code applied
    (its base system prompt and the rest kept); None when none is given (the recorded settings)."""
    if not (settings.model or settings.dtype or settings.trust_remote_code):
        return None
    from prism_lightning.model.export import read_meta

    saved = dict(read_meta(settings.checkpoint)["base_model"]["backbone"])
    saved.update(
        {key: value for key, value in (("model", settings.model), ("dtype", settings.dtype)) if value}
    )
    if settings.trust_remote_code:
        saved["trust_remote_code"] = True
    return BackboneConfig(**saved)


def check_args(settings: ChatSettings) -> None:
    """Everything that can be wrong with the arguments, before a model loads; an option that would
    have no effect with the others given is refused rather than ignored."""
    require(settings.max_new_tokens >= 1, f"--max_new_tokens must be >= 1, got {settings.max_new_tokens}.")
    require(settings.temperature >= 0, f"--temperature must be >= 0, got {settings.temperature}.")
    require(0 < settings.top_p <= 1, f"--top_p must be in (0, 1], got {settings.top_p}.")
    require(
        settings.top_p == 1 or settings.temperature > 0,
        "--top_p acts only with --temperature > 0 (temperature 0 decodes greedily).",
    )
    if settings.threshold is not None:
        require(0 < settings.threshold < 1, f"--threshold must be in (0, 1), got {settings.threshold}.")
    BackboneConfig(dtype=settings.dtype or "auto")  # names the valid dtypes
    if settings.checkpoint:
        for flag, given in (("--persona", settings.persona), ("--context_file", settings.context_file)):
            require(
                not given, f"{flag} and --checkpoint exclude each other: PRISM puts no persona in the prompt."
            )
        require(
            settings.threshold is None or settings.route in (None, "gated"),
            f"--threshold acts only with --route gated; --route {settings.route} forces the route.",
        )
        from prism_lightning.model.export import verify_checkpoint

        verify_checkpoint(settings.checkpoint)
        return
    for flag, given in (
        ("--route", settings.route),
        ("--threshold", settings.threshold),
        ("--merge_weights", settings.merge_weights),
    ):
        require(given is None or given is False, f"{flag} acts only with --checkpoint (routing).")
    for flag, given in (("--persona_length", settings.persona_length), ("--placement", settings.placement)):
        require(given is None or settings.persona, f"{flag} acts only with --persona.")
    if settings.context_file:
        library = ContextLibrary.from_config(settings.context_file)  # a missing or unreadable file fails here
        if not settings.persona:
            from prism_lightning.contexts import load_context_file

            names = [name for path in settings.context_file for name in load_context_file(path)]
            raise ConfigError(
                f"--context_file only adds contexts for --persona to name; add --persona "
                f"{' or '.join(names[:5])} to put one in the prompt."
            )
        library.get(settings.persona)


def chat_main(argv: Sequence[str] | None = None) -> int:
    """``chat`` from the command line: its arguments are :class:`ChatSettings`'s fields."""
    ns = build_parser().parse_args(argv)
    chat_command(settings_from_namespace(ChatSettings, ns))
    return 0


def chat_command(settings: ChatSettings) -> str | None:
    """Answer ``settings.message`` (streamed to stdout; the answer is returned), or with no message run
    the interactive session on stdin until /quit or end of input. Every input is checked first."""
    check_args(settings)
    session = _Session(settings)
    if settings.message is not None:
        answer = session.ask(settings.message, write=_write)
        print(flush=True)
        return answer
    print("Interactive chat. /reset clears the conversation, /quit leaves.", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return None
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return None
        if line == "/reset":
            session.reset()
            continue
        _write("model> ")
        session.ask(line, write=_write)
        print(flush=True)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
