"""`python -m prism_lightning chat`: one answer, or an interactive conversation, from the base model
with an optional persona in the prompt, or from an exported PRISM checkpoint with routing."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from prism_lightning.backbone import DEFAULT_MODEL, BackboneConfig
from prism_lightning.chat_format import PLACEMENTS
from prism_lightning.contexts import LENGTHS, ContextLibrary
from prism_lightning.errors import ConfigError, require


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m prism_lightning chat",
        description="Ask the model one question (MESSAGE given) or chat interactively (no MESSAGE; "
        "/reset clears the conversation, /quit or Ctrl-D leaves).",
    )
    p.add_argument("message", nargs="?", help="the user message; omit for an interactive session")
    p.add_argument(
        "--model", default=None, help=f"HF id, local dir or embedded name (default {DEFAULT_MODEL})"
    )
    p.add_argument("--persona", default=None, help="persona/context name put in the prompt (base model only)")
    p.add_argument(
        "--persona_length",
        "--persona-length",
        default=None,
        choices=LENGTHS,
        help="with --persona (default short)",
    )
    p.add_argument("--placement", default=None, choices=PLACEMENTS, help="with --persona (default system)")
    p.add_argument(
        "--context_file",
        action="append",
        default=[],
        help="extra persona/context file (repeatable) whose contexts --persona can name",
    )
    p.add_argument("--checkpoint", default=None, help="exported PRISM run directory: answer with routing")
    p.add_argument(
        "--route",
        default=None,
        choices=("gated", "on", "off"),
        help="routing mode with --checkpoint (default gated)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="gate threshold with --route gated (default: the checkpoint's)",
    )
    p.add_argument(
        "--merge_weights",
        action="store_true",
        help="with --checkpoint: answer adapter-on turns on merged weights (faster, a second weight copy)",
    )
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument(
        "--dtype", default=None, help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 (default: auto, or "
        "the checkpoint's)"
    )  # fmt: skip
    p.add_argument("--trust_remote_code", action="store_true")
    return p


class _Session:
    """Holds the conversation so follow-up turns see earlier ones."""

    def __init__(self, args: argparse.Namespace) -> None:
        from prism_lightning.generation import SamplingConfig

        self.args = args
        self.sampling = SamplingConfig(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p
        )
        self.turns: list[str] = []
        self.replies: list[str] = []
        self.route: bool | str | None = None  # K-way: the adapter name
        if args.checkpoint:
            from prism_lightning.model.export import load_checkpoint

            self.routed = load_checkpoint(
                args.checkpoint,
                device=args.device,
                backbone_override=checkpoint_backbone(args),
                merge_weights=args.merge_weights,
            )
            if args.threshold is not None:
                self.routed.threshold = args.threshold
            from prism_lightning.engines.hf_stream import RoutedBatchRunner

            self.runner = RoutedBatchRunner(self.routed)  # the hf engine's streaming routed batches
            self.backbone = None
            self.context = None
        else:
            self.routed = None
            self.runner = None
            self.context = None
            if args.persona:  # resolved before the model loads, so a typo fails at once
                library = ContextLibrary.from_config(args.context_file)
                self.context = library.get(args.persona).text(args.persona_length or "short")
            self.backbone = BackboneConfig(
                model=args.model or DEFAULT_MODEL,
                dtype=args.dtype or "auto",
                trust_remote_code=args.trust_remote_code,
            ).load(args.device)

    def ask(self, message: str, write: Callable[[str], object] | None = None) -> str:
        """Answer ``message`` (with the conversation so far); ``write`` gets the answer token by token
        through the serving engine's streaming path (the deltas add up to the returned reply)."""
        from prism_lightning.engines.text_stream import TextStream
        from prism_lightning.generation import generate_batch

        self.turns.append(message)
        tokenizer = self.routed.tokenizer if self.routed is not None else self.backbone.tokenizer
        stream = TextStream(tokenizer)

        def on_step(new_tokens: dict[int, int], finished: dict[int, str]) -> None:
            for token in new_tokens.values():
                delta = stream.add(token)
                if delta and write is not None:
                    write(delta)

        if self.routed is not None:
            self._ask_routed(on_step)
        else:
            prompt = self.backbone.formatter.prompt(
                self.turns, self.context, self.args.placement or "system", self.replies
            )
            generate_batch(
                self.backbone.model, self.backbone.tokenizer, [prompt], self.sampling, on_step=on_step
            )
        tail = stream.finish()
        if tail and write is not None:
            write(tail)
        reply = stream.text
        self.replies.append(reply)
        return reply

    def _ask_routed(self, on_step) -> None:
        """The routed answer: the route is the first user turn's (the paper's rule), kept for the
        whole conversation, unless --route forces it."""
        from prism_lightning.engines.hf_stream import RowRoute, RowSpec

        routed = self.routed
        forced = self.route if self.route is not None else {"on": True, "off": False}.get(self.args.route)

        def encode(prompt: str) -> list[int]:
            return list(routed.tokenizer(prompt, add_special_tokens=False)["input_ids"])

        first = encode(routed.formatter.prompt(self.turns[0])) if len(self.turns) > 1 else None
        row = RowSpec(
            encode(routed.formatter.prompt(self.turns, replies=self.replies)),
            self.sampling,
            route=forced,
            first_turn_ids=first,
        )

        def on_route(routes: list[RowRoute]) -> None:
            route = routes[0]
            self.route = route.adapter or route.route  # K-way: the first turn's adapter holds, by name
            label = route.adapter or ("adapter" if route.route else "base")
            print(f"[route: {label}  gate p={route.gate_prob:.3f}]", file=sys.stderr, flush=True)

        self.runner.run([row], on_route=on_route, on_step=on_step)

    def reset(self) -> None:
        self.turns, self.replies, self.route = [], [], None


def checkpoint_backbone(args: argparse.Namespace) -> BackboneConfig | None:
    """The checkpoint's recorded backbone settings with --model, --dtype and --trust_remote_code applied
    (its base system prompt and the rest kept); None when none is given (the recorded settings)."""
    if not (args.model or args.dtype or args.trust_remote_code):
        return None
    from prism_lightning.model.export import read_meta

    saved = dict(read_meta(args.checkpoint)["base_model"]["backbone"])
    saved.update({key: value for key, value in (("model", args.model), ("dtype", args.dtype)) if value})
    if args.trust_remote_code:
        saved["trust_remote_code"] = True
    return BackboneConfig(**saved)


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be wrong with the arguments, before a model loads; an option that would
    have no effect with the others given is refused rather than ignored."""
    require(args.max_new_tokens >= 1, f"--max_new_tokens must be >= 1, got {args.max_new_tokens}.")
    require(args.temperature >= 0, f"--temperature must be >= 0, got {args.temperature}.")
    require(0 < args.top_p <= 1, f"--top_p must be in (0, 1], got {args.top_p}.")
    require(
        args.top_p == 1 or args.temperature > 0,
        "--top_p acts only with --temperature > 0 (temperature 0 decodes greedily).",
    )
    if args.threshold is not None:
        require(0 < args.threshold < 1, f"--threshold must be in (0, 1), got {args.threshold}.")
    BackboneConfig(dtype=args.dtype or "auto")  # names the valid dtypes
    if args.checkpoint:
        for flag, given in (("--persona", args.persona), ("--context_file", args.context_file)):
            require(
                not given, f"{flag} and --checkpoint exclude each other: PRISM puts no persona in the prompt."
            )
        require(
            args.threshold is None or args.route in (None, "gated"),
            f"--threshold acts only with --route gated; --route {args.route} forces the route.",
        )
        from prism_lightning.model.export import verify_checkpoint

        verify_checkpoint(args.checkpoint)
        return
    for flag, given in (
        ("--route", args.route),
        ("--threshold", args.threshold),
        ("--merge_weights", args.merge_weights),
    ):
        require(given is None or given is False, f"{flag} acts only with --checkpoint (routing).")
    for flag, given in (("--persona_length", args.persona_length), ("--placement", args.placement)):
        require(given is None or args.persona, f"{flag} acts only with --persona.")
    if args.context_file:
        library = ContextLibrary.from_config(args.context_file)  # a missing or unreadable file fails here
        if not args.persona:
            from prism_lightning.contexts import load_context_file

            names = [name for path in args.context_file for name in load_context_file(path)]
            raise ConfigError(
                f"--context_file only adds contexts for --persona to name; add --persona "
                f"{' or '.join(names[:5])} to put one in the prompt."
            )
        library.get(args.persona)


def chat_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    session = _Session(args)
    if args.message is not None:
        session.ask(args.message, write=_write)
        print(flush=True)
        return 0
    print("Interactive chat. /reset clears the conversation, /quit leaves.", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.reset()
            continue
        _write("model> ")
        session.ask(line, write=_write)
        print(flush=True)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
